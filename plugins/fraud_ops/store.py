"""The lake's object store under Airflow: its endpoint, region and keys come from an AWS Connection.

``FRAUD_AWS_CONN_ID`` (default ``aws_default``) names the Connection. The Amazon provider's hook
reads it as it reads any AWS Connection: login and password are the keys (or a role to assume, or
a profile), the extra ``endpoint_url`` is an S3-compatible endpoint and ``region_name`` the region.
Without that Connection the provider's default chain applies (the worker's own AWS variables, an
instance or pod role), and the endpoint and region come from ``FRAUD_S3_ENDPOINT_URL`` and
``AWS_REGION`` as outside Airflow. A ``file://`` lake reads no Connection.

A task resolves the store once, in ``execute``/``poke``, and hands it to what it starts as that
process's environment (``jobs.common.config.s3_environment``): never as a command-line argument,
a templated (rendered) field or a log line. The provider masks the secret key and token in task
logs. Who gets what:

- in-process code (sensors, the quality gate): a ``Lake`` built with these settings;
- a local step process (train, score, report): its environment;
- spark-submit: the driver's environment (in local mode the executors are the driver); on a
  standalone master the executors get the keys as ``spark.executorEnv.*`` from a 0600 properties
  file the task writes and removes (the worker starts each executor with them in its environment;
  they are never in a task Spark pickles). YARN and Kubernetes clusters use their own identity;

- a Docker container: the operator's ``private_environment`` (neither templated nor shown);
- a Kubernetes pod: a Secret the task writes from the Connection and the pod reads with ``envFrom``.
"""

from __future__ import annotations

from urllib.parse import urlparse

from jobs.common.config import S3Settings, settings


def aws_conn_id() -> str:
    from fraud_ops.config import orchestration

    return orchestration().aws_conn_id


def is_s3(lake_uri: str) -> bool:
    return urlparse(lake_uri).scheme in ("s3", "s3a")


def store_settings(lake_uri: str, conn_id: str | None = None) -> S3Settings | None:
    """The store of an ``s3://`` lake as the AWS Connection gives it (None for a directory lake)."""
    if not is_s3(lake_uri):
        return None
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    fallback = settings().s3
    hook = AwsBaseHook(aws_conn_id=conn_id or aws_conn_id(), client_type="s3")
    config = hook.conn_config
    credentials = hook.get_session(region_name=config.region_name or fallback.region).get_credentials()
    keys = credentials.get_frozen_credentials() if credentials is not None else None  # None: no keys anywhere
    if keys is not None:
        from airflow.sdk.log import mask_secret

        mask_secret(keys.secret_key)
        if keys.token:
            mask_secret(keys.token)
    return S3Settings(
        endpoint_url=config.endpoint_url or fallback.endpoint_url,
        region=config.region_name or fallback.region,
        access_key=keys.access_key if keys else None,
        secret_key=keys.secret_key if keys else None,
        session_token=keys.token if keys else None,
    )


def store_environment(lake_uri: str, conn_id: str | None = None) -> dict[str, str]:
    """The environment a step's process needs to reach the lake's store (empty for a directory lake)."""
    from jobs.common.config import s3_environment

    s3 = store_settings(lake_uri, conn_id)
    return s3_environment(s3) if s3 is not None else {}


def task_lake(lake_uri: str, conn_id: str | None = None):
    """The lake as a task's own code reads it, with the store of the Connection."""
    from jobs.common.lake import Lake

    return Lake.from_uri(lake_uri, store_settings(lake_uri, conn_id))
