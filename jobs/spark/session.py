"""The SparkSession every job uses, and the Arrow-to-Spark schema bridge.

Under ``spark-submit`` the master and resources come from the command line (Airflow's
``spark_default`` connection); run directly (``python jobs/spark/clean.py``) the session falls back
to ``FRAUD_SPARK_MASTER`` (default ``local[2]``). The session time zone is UTC so that naive
timestamps (TIMESTAMP_NTZ) keep their wall-clock meaning everywhere.
"""

from __future__ import annotations

import os
import sys

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from jobs.common.config import S3Settings, settings
from jobs.common.lake import S3_CONNECT_TIMEOUT_S, S3_MAX_ATTEMPTS, S3_REQUEST_TIMEOUT_S

_ARROW_TO_SPARK: dict[pa.DataType, T.DataType] = {
    pa.int64(): T.LongType(),
    pa.int32(): T.IntegerType(),
    pa.int8(): T.ByteType(),
    pa.float64(): T.DoubleType(),
    pa.string(): T.StringType(),
    pa.bool_(): T.BooleanType(),
    pa.timestamp("us"): T.TimestampNTZType(),
    pa.date32(): T.DateType(),
}


def spark_schema(schema: pa.Schema) -> T.StructType:
    """The Spark StructType of an Arrow schema from ``jobs.common.schema``."""
    return T.StructType([T.StructField(f.name, _ARROW_TO_SPARK[f.type], f.nullable) for f in schema])


def get_spark(app_name: str) -> SparkSession:
    cfg = settings()
    # A plain `python jobs/spark/x.py`: Python workers use this interpreter (its venv), not `python3`.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    remote = connect_url()
    builder = SparkSession.builder.remote(remote) if remote else SparkSession.builder
    for key, value in session_conf(cfg.spark_shuffle_partitions).items():
        builder = builder.config(key, value)
    if remote:  # a warm Spark Connect server: the JVM, its static conf and the store's settings are its own
        return builder.appName(app_name).getOrCreate()
    builder = (
        builder.config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", "false")
    )
    for key, value in s3a_conf(cfg.s3).items():
        builder = builder.config(key, value)
    # Under spark-submit the master, the driver's memory and the application's name are the command
    # line's (the driver JVM is already running); a plain `python` run gets the configured local
    # master and memory, and the job's own name.
    if not launched_by_spark_submit():
        builder = builder.appName(app_name).master(cfg.spark_master).config("spark.driver.memory", cfg.spark_driver_memory)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def session_conf(shuffle_partitions: int) -> dict[str, str]:
    """The SQL settings every job's session has, a classic one or a Spark Connect one alike."""
    return {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.legacy.parquet.nanosAsLong": "true",  # landing Parquet from pandas (jobs.spark.landing)
        # Jobs name their input files one by one (a day's published files); listing a few hundred
        # of them on the driver is quicker than the Spark job Spark starts from 32 paths up.
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "1024",
    }


def connect_url() -> str | None:
    """The Spark Connect server the jobs run on (``SPARK_REMOTE``, ``sc://host:port``), if any: a
    warm Spark shared by the runs. Unset, each job starts its own Spark (spark-submit or local)."""
    return os.environ.get("SPARK_REMOTE") or None


def default_parallelism(spark: SparkSession) -> int:
    """The cores Spark runs tasks on. A Spark Connect session has no SparkContext: its server names
    them in ``spark.default.parallelism`` (``deploy/spark_connect.py`` sets it)."""
    if connect_url():
        return int(spark.conf.get("spark.default.parallelism", spark.conf.get("spark.sql.shuffle.partitions")))
    return spark.sparkContext.defaultParallelism


def s3a_conf(s3: S3Settings) -> dict[str, str]:
    """Spark's ``s3a://`` settings for the store the lake's own client uses (``FRAUD_S3_ENDPOINT_URL``,
    ``AWS_REGION``): the same endpoint, path-style addressing for S3-compatible servers, and
    timeouts and retries as bounded as the lake's. The keys are never in the conf: with keys in the
    environment the driver and every executor read them from their own environment (a cluster's
    workers are started with them), as the lake's client and the Python workers do; without, the
    AWS SDK's default chain (an instance or pod role) applies."""
    conf = {
        "spark.hadoop.fs.s3a.endpoint.region": s3.region,
        # S3A's floor for the connect timeout is 15 s (it raises anything lower, with a warning)
        "spark.hadoop.fs.s3a.connection.establish.timeout": f"{max(S3_CONNECT_TIMEOUT_S, 15)}s",
        "spark.hadoop.fs.s3a.connection.timeout": f"{S3_REQUEST_TIMEOUT_S}s",
        "spark.hadoop.fs.s3a.attempts.maximum": str(S3_MAX_ATTEMPTS),
        "spark.hadoop.fs.s3a.retry.limit": str(S3_MAX_ATTEMPTS),
        "spark.hadoop.fs.s3a.retry.interval": "500ms",
    }
    if s3.endpoint_url:
        conf.update({
            "spark.hadoop.fs.s3a.endpoint": s3.endpoint_url,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": str(s3.endpoint_url.startswith("https://")).lower(),
        })
    if s3.access_key and s3.secret_key:
        conf["spark.hadoop.fs.s3a.aws.credentials.provider"] = (
            "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider")
    return conf


def launched_by_spark_submit() -> bool:
    """True in a driver that spark-submit (or the pyspark shell) started: the JVM, with the submitted
    master and conf, is already up and hands this process its gateway. A conf object made before the
    session exists cannot tell: it is not backed by the JVM yet and holds nothing."""
    return "PYSPARK_GATEWAY_PORT" in os.environ
