"""The SparkSession every job uses, the Arrow-to-Spark schema bridge, and the range-run loop.

Under ``spark-submit`` the master and resources come from the command line (Airflow's
``spark_default`` connection); run directly (``python jobs/spark/clean.py``) the session falls back
to ``FRAUD_SPARK_MASTER`` (default ``local[2]``). The session time zone is UTC so that naive
timestamps (TIMESTAMP_NTZ) keep their wall-clock meaning everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import date

import pyarrow as pa
from pyspark.sql import SparkSession
from pyspark.sql import types as T

from jobs.common.config import settings
from jobs.common.lake import day_range, parse_day

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


def date_args(description: str, argv: Sequence[str] | None = None, extra: Callable | None = None):
    """Parse the CLI contract of SPEC §6: ``--lake URI`` and ``--date D`` or ``--start D1 --end D2``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--lake", default=None, help="lake root URI (default: FRAUD_LAKE_URI)")
    parser.add_argument("--date", type=parse_day, help="the day D to process")
    parser.add_argument("--start", type=parse_day, help="first day of an inclusive range")
    parser.add_argument("--end", type=parse_day, help="last day of an inclusive range")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.date and (args.start or args.end):
        parser.error("give either --date or --start/--end, not both")
    if args.date:
        args.days = [args.date]
    elif args.start and args.end:
        args.days = day_range(args.start, args.end)
    else:
        parser.error("give --date D or --start D1 --end D2")
    args.lake = args.lake or settings().lake_uri
    return args


def run_days(days: Sequence[date], step: Callable[[date], object], label: str) -> int:
    """Run ``step`` for each day in order; report the days not done and return an exit code.

    Each day publishes on its own, so a failure on day k leaves days < k published and names
    days >= k in the error (the range can be rerun from there).
    """
    for i, day in enumerate(days):
        try:
            step(day)
        except Exception as exc:  # noqa: BLE001 - reported with the days not done
            not_done = ", ".join(d.isoformat() for d in days[i:])
            print(f"{label}: failed on {day}: {exc}", file=sys.stderr)
            print(f"{label}: days not done: {not_done}", file=sys.stderr)
            return 1
    return 0
