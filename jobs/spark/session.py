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

from jobs.common.config import settings

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
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.spark_shuffle_partitions))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.sql.legacy.parquet.nanosAsLong", "true")  # landing Parquet from pandas (jobs.spark.landing)
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.ui.enabled", "false")
        # Jobs name their input files one by one (a day's published files); listing a few hundred
        # of them on the driver is quicker than the Spark job Spark starts from 32 paths up.
        .config("spark.sql.sources.parallelPartitionDiscovery.threshold", "1024")
    )
    # spark-submit sets spark.master; a plain `python` run gets the configured local master.
    if "spark.master" not in SparkSession.builder._options and not _submitted_with_master():
        builder = builder.master(cfg.spark_master).config("spark.driver.memory", cfg.spark_driver_memory)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _submitted_with_master() -> bool:
    from pyspark import SparkConf

    return SparkConf().contains("spark.master")
