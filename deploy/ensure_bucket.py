"""``python deploy/ensure_bucket.py``: create the bucket of an ``s3://`` lake if it does not exist.

Run once by a deployment before the first night (docker-compose's ``airflow-init``). The store is
reached the way the tasks reach it: the AWS Connection ``FRAUD_AWS_CONN_ID`` (``fraud_ops.store``),
else the AWS variables of the environment. A ``file://`` lake needs nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]


def main() -> int:
    from fraud_ops.store import is_s3, task_lake

    from jobs.common.config import settings

    uri = settings().lake_uri
    if not is_s3(uri):
        print(f"{uri}: a directory lake, no bucket to create")
        return 0
    lake = task_lake(uri)
    bucket = lake.base.split("/", 1)[0]
    client = lake.boto3_client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket in existing:
        print(f"bucket {bucket} exists")
    else:
        client.create_bucket(Bucket=bucket)
        print(f"bucket {bucket} created")
    return 0


if __name__ == "__main__":
    sys.exit(main())
