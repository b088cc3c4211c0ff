"""The Spark steps on a warm Spark Connect server (``deploy/spark_connect.py``) publish exactly what
spark-submit publishes, through the DAG's own operator; a server that is down or a job that fails
says so in the task's error.

The reference is the small world that ``tests/pipeline.py`` builds with spark-submit range runs;
here its landing data is cleaned and featurised again as a Spark Connect client: a range run in
batches of 4 days (``FRAUD_RANGE_BATCH_DAYS``), then the last day through ``SparkJobOperator``
with a ``spark_connect`` Connection, as a nightly run does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import free_port
from pipeline import FIRST, LAST, SMALL, TEST_JAVA_OPTIONS

from jobs.common.calendar import day_range
from jobs.common.lake import Lake, NotPublished

pytestmark = [pytest.mark.slow, pytest.mark.spark]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

DATASETS = ("clean/transactions", "quarantine/transactions", "clean/labels", "features/transactions")
CONN_ID = "spark_connect_test"


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory):
    from spark_connect import SparkConnectServer

    server = SparkConnectServer(tmp_path_factory.mktemp("spark-connect"), port=free_port(),
                                env={**os.environ, **SMALL}, driver_memory="1g",
                                conf={"spark.driver.extraJavaOptions": TEST_JAVA_OPTIONS})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_env(monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)


def _connection(monkeypatch, port: int) -> None:
    import json

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}",
                       json.dumps({"conn_type": "spark_connect", "host": "127.0.0.1", "port": port}))


def _operator(job: str, lake_uri: str, day):
    from fraud_ops.spark import SparkJobOperator

    return SparkJobOperator(task_id=job, job=job, lake=lake_uri, day=day.isoformat(), connect_conn_id=CONN_ID)


def _content(lake: Lake, dataset: str, day):
    try:
        table = lake.read_table(dataset, day)
    except NotPublished:
        return None
    keys = [c for c in ("TRANSACTION_ID", "EVENT_ID", "CUSTOMER_ID") if c in table.column_names][:1]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist() if keys else table.to_pylist()


CLIENT_CHECK = """
import sys
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()
frame = spark.range(4).select(F.col("id").cast("long").alias("x"))
plus_one = F.udf(lambda x: x + 1, T.LongType())
print("UDF", [r.y for r in frame.select(plus_one("x").alias("y")).orderBy("y").collect()])

def doubled(batches):
    for batch in batches:
        yield pa.RecordBatch.from_arrays([pc.multiply(batch.column("x"), 2)], names=["x"])

print("ARROW", [r.x for r in frame.mapInArrow(doubled, "x long").orderBy("x").collect()])
print("CORES", spark.conf.get("spark.default.parallelism"))
"""


def test_python_workers_of_the_server_run_map_in_arrow_and_udfs(connect_server):
    # a client of its own: a process that already holds a classic session (the suite's) cannot open a remote one
    done = subprocess.run([sys.executable, "-c", CLIENT_CHECK, connect_server.url], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ", 1)[0] in ("UDF", "ARROW", "CORES"))
    assert said["UDF"] == "[1, 2, 3, 4]"
    assert said["ARROW"] == "[0, 2, 4, 6]"
    assert said["CORES"] == "2"  # what the jobs ask in place of the SparkContext


def test_jobs_on_the_server_publish_what_spark_submit_publishes(connect_server, small_inline_lake, small_env,
                                                                 tmp_path, monkeypatch):
    lake = Lake.from_uri((tmp_path / "lake").as_uri())
    shutil.copytree(small_inline_lake / "landing", tmp_path / "lake" / "landing")
    env = {**os.environ, "SPARK_REMOTE": connect_server.url, "FRAUD_RANGE_BATCH_DAYS": "4"}
    before = LAST - timedelta(days=1)
    for job in ("clean", "features"):  # the history as one range run, in batches of 4 days
        done = subprocess.run([sys.executable, f"jobs/spark/{job}.py", "--lake", lake.uri, "--start",
                               FIRST.isoformat(), "--end", before.isoformat()], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    _connection(monkeypatch, connect_server.port)
    for job in ("clean", "features"):  # the last day as the nightly task runs it
        _operator(job, lake.uri, LAST).execute({})

    reference = Lake.from_uri(small_inline_lake.as_uri())
    for day in day_range(FIRST, LAST):
        for dataset in DATASETS:
            want = _content(reference, dataset, day)
            assert want is not None, f"{dataset} {day} missing from the reference lake"
            assert _content(lake, dataset, day) == want, f"{dataset} {day} differs from spark-submit's"
            assert len(lake.partition_files(dataset, day)) == len(reference.partition_files(dataset, day))


def test_a_failing_job_fails_the_task_with_its_reason(connect_server, small_env, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowException

    lake = Lake.from_uri((tmp_path / "lake").as_uri())
    (tmp_path / "lake").mkdir()
    _connection(monkeypatch, connect_server.port)
    with pytest.raises(AirflowException, match=r"clean on Spark Connect .* exited 1: .*landing"):
        _operator("clean", lake.uri, FIRST).execute({})


def test_a_server_that_is_down_fails_the_task_at_once(small_env, tmp_path, monkeypatch):
    from airflow.sdk.exceptions import AirflowException

    _connection(monkeypatch, free_port())  # nothing listens there
    started = time.monotonic()
    with pytest.raises(AirflowException, match="not reachable.*FRAUD_SPARK_CONNECT_CONN_ID"):
        _operator("clean", (tmp_path / "lake").as_uri(), FIRST).execute({})
    assert time.monotonic() - started < 15
