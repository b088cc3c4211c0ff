"""Behavioural features of SPEC §4 for day D (or a range), from the clean days D-37 .. D.

    spark-submit jobs/spark/features.py --lake URI --date D          # or --start D1 --end D2

Reads the published clean partitions, computes the 14 features exactly (microsecond window
bounds, same-second peers inside) and publishes ``features/transactions/date=D`` per day. A range
run reads its history once, computes every day in one pass and publishes the days in date order.

File layout: the days are written straight from the terminal pass (no shuffle by date: it would
move every row once more). That pass has as many partitions as Spark runs tasks at once
(:func:`write_tasks`, 2 in local[2]), so a day has up to that many files, each sorted by
``TX_DATETIME, TRANSACTION_ID`` and listed by the manifest in partition order. Which file a row
goes to depends only on the hash of its ``TERMINAL_ID`` and that count, so a range run and
day-by-day runs (same settings) write the same rows in the same files in the same order.

Cost grows like sorting, not like rows x rows-in-window: rows are hash-partitioned by customer
(then by terminal) and each partition is handed to ``jobs.spark.windows`` as one Arrow table,
which sorts it once and answers every window with two binary searches and a prefix-sum
difference (see that module). A bounded ``rangeBetween`` frame would re-aggregate the whole frame
for every row instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # spark-submit runs this as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import partial

import pyarrow.parquet as pq
from pyspark import cloudpickle
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.config import settings
from jobs.common.lake import ATTEMPT_PREFIX, Attempt, Dataset, Lake, NotPublished, parse_day
from jobs.common.schema import (
    CLEAN_SCHEMA,
    FEATURE_SCHEMA,
    HISTORY_DAYS,
    ID_COLUMNS,
    LABEL,
    LABEL_DELAY_DAYS,
    WINDOWS_DAYS,
    customer_avg_amount,
    customer_count,
    terminal_count,
    terminal_risk,
)
from jobs.spark import windows
from jobs.spark.session import date_args, get_spark, spark_schema

# The window kernels travel to the Python workers inside the pickled function, so workers need
# only numpy and pyarrow, not this repository on their path (spark-submit ships just this file).
cloudpickle.register_pickle_by_value(windows)

STEP = "features"
DATE_COLUMN = "date"  # partitionBy names folders <column>=<value>: the lake's date=D/attempt=ID
ATTEMPT_COLUMN = ATTEMPT_PREFIX.rstrip("=")


class MissingInputs(RuntimeError):
    """Clean partitions the run needs are not published yet (waited for, never taken as empty)."""


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    days: list[date]  # the days to compute
    files: list[str]  # Spark URIs of every published clean file of days[0]-37 .. days[-1]


def history_days(days: Sequence[date]) -> list[date]:
    first = min(days) - timedelta(days=HISTORY_DAYS)
    return [first + timedelta(days=i) for i in range((max(days) - first).days + 1)]


def find_inputs(lake: Lake, days: Sequence[date], first_date: date) -> Inputs:
    """The clean files for ``days`` and their history; raise :class:`MissingInputs` naming gaps.

    A day before ``first_date`` that is not published is simply absent (the pipeline did not
    exist yet); any other unpublished day - and every day being computed - must be there.
    """
    wanted = set(days)
    files: list[str] = []
    missing: list[date] = []
    for day in history_days(days):
        try:
            files += [lake.to_spark_uri(p) for p in lake.partition_files(Dataset.CLEAN, day)]
        except NotPublished:
            if day >= first_date or day in wanted:
                missing.append(day)
    if missing:
        raise MissingInputs(
            f"clean partitions not published in {lake.uri}: {format_days(missing)} "
            f"(needed for features of {format_days(days)}; first date {first_date})"
        )
    return Inputs(sorted(days), files)


def format_days(days: Sequence[date]) -> str:
    """``2018-04-01..2018-04-03, 2018-04-07``: consecutive days collapsed into ranges."""
    runs: list[list[date]] = []
    for day in sorted(days):
        if runs and day - runs[-1][-1] == timedelta(days=1):
            runs[-1].append(day)
        else:
            runs.append([day])
    return ", ".join(r[0].isoformat() if len(r) == 1 else f"{r[0]}..{r[-1]}" for r in runs)


def read_clean(spark: SparkSession, files: Sequence[str]) -> DataFrame:
    schema = spark_schema(CLEAN_SCHEMA)
    if not files:
        return spark.createDataFrame([], schema)
    return spark.read.schema(schema).parquet(*files)


# --- the transform -----------------------------------------------------------------------------

_WORKING_COLUMNS = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", LABEL)


def _micros_since_epoch(day: date) -> int:
    return (datetime(day.year, day.month, day.day) - datetime(1970, 1, 1)) // timedelta(microseconds=1)


def compute_features(
    clean: DataFrame,
    start: date,
    end: date,
    windows_days: Sequence[int] = WINDOWS_DAYS,
    partitions: int | None = None,
    terminal_partitions: int | None = None,
) -> DataFrame:
    """Clean rows of days start-37 .. end -> one feature row per clean row of days start .. end.

    ``windows_days`` other than the default (1, 7, 30) is for benchmarks: the output then has
    only those window columns, and not the FEATURE_SCHEMA order. The terminal pass has
    ``terminal_partitions`` partitions (default :func:`write_tasks`): its output is what is written.
    """
    spark = clean.sparkSession
    partitions = partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    terminal_partitions = terminal_partitions or write_tasks(spark)
    customer_names = {n: (customer_count(n), customer_avg_amount(n)) for n in windows_days}
    terminal_names = {n: (terminal_count(n), terminal_risk(n)) for n in windows_days}

    rows = clean.select(*_WORKING_COLUMNS)
    with_customer = rows.repartition(partitions, "CUSTOMER_ID").mapInArrow(
        partial(
            windows.add_customer_windows,
            key="CUSTOMER_ID",
            time="TX_DATETIME",
            amount="TX_AMOUNT",
            windows=tuple(windows_days),
            names=customer_names,
        ),
        _extend(rows.schema, customer_names),
    )
    with_terminal = with_customer.repartition(terminal_partitions, "TERMINAL_ID").mapInArrow(
        partial(
            windows.add_terminal_windows,
            key="TERMINAL_ID",
            time="TX_DATETIME",
            label=LABEL,
            windows=tuple(windows_days),
            delay_days=LABEL_DELAY_DAYS,
            names=terminal_names,
            keep_from_us=_micros_since_epoch(start),
            keep_until_us=_micros_since_epoch(end + timedelta(days=1)),
        ),
        _extend(with_customer.schema, terminal_names),
    )
    on_weekend: Column = F.dayofweek("TX_DATETIME").isin(1, 7)  # 1 = Sunday, 7 = Saturday
    at_night: Column = F.hour("TX_DATETIME") <= 6
    computed = [
        on_weekend.cast("int").alias("TX_DURING_WEEKEND"),
        at_night.cast("int").alias("TX_DURING_NIGHT"),
        *(F.col(c) for n in windows_days for c in customer_names[n]),
        *(F.col(c) for n in windows_days for c in terminal_names[n]),
    ]
    return with_terminal.select(*ID_COLUMNS, *computed, LABEL)


def _extend(schema: T.StructType, names: dict[int, tuple[str, str]]) -> T.StructType:
    fields = list(schema.fields)
    for count_name, value_name in names.values():
        fields += [
            T.StructField(count_name, T.IntegerType(), False),
            T.StructField(value_name, T.DoubleType(), False),
        ]
    return T.StructType(fields)


# --- outputs -----------------------------------------------------------------------------------


def write_days(lake: Lake, features: DataFrame, days: Sequence[date]) -> dict[date, Attempt]:
    """Write every day into its own fresh attempt folder in one Spark job; return the attempts.

    Rows stay in the partitions of the terminal pass (a shuffle by date would move every row once
    more) and are sorted within them by day, then ``TX_DATETIME, TRANSACTION_ID``; Spark's
    ``partitionBy(date, attempt)`` puts each partition's rows of a day into one file in the
    attempt folder the lake made for that day. The terminal pass has few partitions
    (:func:`write_tasks`) so that a day has few files: a file costs more to open, commit and
    publish than its rows cost to sort. Dynamic partition overwrite stages the job's files in a folder of
    their own, so concurrent runs for other days do not meet, and touches no other folder.
    Nothing is visible until :func:`publish_in_order`.
    """
    attempts = {day: lake.new_attempt(Dataset.FEATURES, day) for day in days}
    expected_folders = {
        lake.path(Dataset.FEATURES, f"{DATE_COLUMN}={day.isoformat()}", f"{ATTEMPT_COLUMN}={a.attempt_id}")
        for day, a in attempts.items()
    }
    if expected_folders != {a.path for a in attempts.values()}:
        raise RuntimeError("the lake's partition layout is not date=D/attempt=ID any more")
    attempt_of_day = F.create_map(*[F.lit(x) for day, a in attempts.items() for x in (day, a.attempt_id)])
    (
        features.withColumn(DATE_COLUMN, F.to_date("TX_DATETIME"))
        .withColumn(ATTEMPT_COLUMN, attempt_of_day[F.col(DATE_COLUMN)])
        .sortWithinPartitions(DATE_COLUMN, ATTEMPT_COLUMN, "TX_DATETIME", "TRANSACTION_ID")
        .write.mode("overwrite")
        .option("partitionOverwriteMode", "dynamic")
        .partitionBy(DATE_COLUMN, ATTEMPT_COLUMN)
        .parquet(lake.to_spark_uri(lake.path(Dataset.FEATURES)))
    )
    return attempts


def write_tasks(spark: SparkSession) -> int:
    """Partitions of the terminal pass, so the most files a day has: the tasks Spark runs at once."""
    partitions = int(spark.conf.get("spark.sql.shuffle.partitions"))
    return max(1, min(partitions, spark.sparkContext.defaultParallelism))


def publish_in_order(lake: Lake, attempts: dict[date, Attempt]) -> int:
    """Publish the written days in date order; 0, or 1 naming the days not done.

    A day without transactions gets an empty file with the schema (Spark writes nothing for it).
    """
    days = sorted(attempts)
    for i, day in enumerate(days):
        try:
            rows = check_files(lake, attempts[day].path)
            if rows is None:
                lake.write_table(Dataset.FEATURES, day, FEATURE_SCHEMA.empty_table(), stats={"rows": 0})
                lake.delete_dir(attempts[day].path)
            else:
                lake.publish(attempts[day], stats={"rows": rows})
        except Exception as exc:  # noqa: BLE001 - reported with the days not done
            print(f"{STEP}: failed on {day}: {exc}", file=sys.stderr)
            print(f"{STEP}: days not done: {format_days(days[i:])}", file=sys.stderr)
            return 1
    return 0


def check_files(lake: Lake, folder: str) -> int | None:
    """Rows in the folder's Parquet files (None if there are none); refuse a schema other than FEATURE_SCHEMA."""
    expected = [(f.name, f.type) for f in FEATURE_SCHEMA]
    parts = [i for i in lake.list_files(folder) if i.base_name.endswith(".parquet")]
    if not parts:
        return None
    rows = 0
    for info in parts:
        metadata = pq.ParquetFile(info.path, filesystem=lake.fs)
        got = [(f.name, f.type) for f in metadata.schema_arrow]
        if got != expected:
            raise RuntimeError(f"{info.path}: schema {got} differs from FEATURE_SCHEMA {expected}")
        rows += metadata.metadata.num_rows
    return rows


def run(spark: SparkSession, lake: Lake, inputs: Inputs) -> int:
    """Compute and publish ``inputs.days`` (in date order); 0 on success, 1 naming the days not done."""
    days = inputs.days
    try:
        partitions = int(spark.conf.get("spark.sql.shuffle.partitions"))
        features = compute_features(read_clean(spark, inputs.files), days[0], days[-1], partitions=partitions)
        attempts = write_days(lake, features, days)
    except Exception as exc:  # noqa: BLE001 - reported with the days not done
        print(f"{STEP}: failed: {exc}", file=sys.stderr)
        print(f"{STEP}: days not done: {format_days(days)}", file=sys.stderr)
        return 1
    return publish_in_order(lake, attempts)


def main(argv: Sequence[str] | None = None) -> int:
    args = date_args(
        "Compute the SPEC §4 features of day D (or a range) from the clean days D-37 .. D.",
        argv,
        extra=lambda p: p.add_argument(
            "--first-date",
            type=parse_day,
            default=None,
            help="the pipeline's first date: older history may be absent (default FRAUD_FIRST_DATE)",
        ),
    )
    lake = Lake.from_uri(args.lake)
    try:  # before starting Spark: a run that must wait for its inputs fails fast
        inputs = find_inputs(lake, args.days, args.first_date or settings().first_date)
    except MissingInputs as exc:
        print(f"{STEP}: {exc}", file=sys.stderr)
        print(f"{STEP}: days not done: {format_days(args.days)}; nothing written", file=sys.stderr)
        return 1
    return run(get_spark(f"{STEP} {format_days(args.days)}"), lake, inputs)


if __name__ == "__main__":
    sys.exit(main())
