"""Behavioural features (docs/contract.md, "Features") of day D (or a range), from the clean days D-37 .. D.

    spark-submit jobs/spark/features.py --lake URI --date D          # or --start D1 --end D2

Reads the published clean partitions, computes the 14 features exactly (microsecond window
bounds, same-second peers inside) and publishes ``features/transactions/date=D`` per day. A range
run reads its history once per batch of ``FRAUD_RANGE_BATCH_DAYS`` days, computes the batch's days in
one pass and publishes them in date order before the next batch.

File layout: the days are written straight from the terminal pass, by its Python workers
(``jobs.spark.day_files``, pyarrow through the lake's file system), with no shuffle by date, no
JVM sort and no Spark writer. That pass has as many partitions as Spark runs tasks at once
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

import posixpath
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date
from functools import partial

import pyarrow.parquet as pq
from pyspark import cloudpickle
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common import contracts
from jobs.common.calendar import (
    Calendar,
    calendar,
    epoch_day,
    format_days,
    from_epoch_day,
    micros_at_midnight,
    parse_day,
    shift,
)
from jobs.common.cli import EXIT_OK, EXIT_WAITING, batches, day_parser, not_done, parse_days
from jobs.common.config import settings
from jobs.common.lake import Attempt, Dataset, Lake, NotPublished
from jobs.common.progress import progress
from jobs.common.provenance import InputRecorder, lineage
from jobs.common.schema import (
    CLEAN_SCHEMA,
    FEATURE_SCHEMA,
    ID_COLUMNS,
    LABEL,
    LABEL_EVENT_SCHEMA,
    REPORTED_AT,
    WINDOWS_DAYS,
    customer_avg_amount,
    customer_count,
    terminal_count,
    terminal_risk,
)
from jobs.spark import day_files, windows
from jobs.spark.session import default_parallelism, get_spark, spark_schema

# The window kernels and the day writer travel to the Python workers inside the pickled function, so workers need
# only numpy and pyarrow, not this repository on their path.
cloudpickle.register_pickle_by_value(windows)
cloudpickle.register_pickle_by_value(day_files)

STEP = "features"


class MissingInputs(RuntimeError):
    """Clean partitions the run needs are not published yet (waited for, never taken as empty)."""


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    days: list[date]  # the days to compute
    files: list[str]  # Spark URIs of every published clean file the days read
    label_files: list[str]  # ... and of every clean label-event file
    lineage: dict[date, dict]  # per day: what its partition records (inputs, parameters, code version)


def find_inputs(lake: Lake, days: Sequence[date], cal: Calendar) -> Inputs:
    """The clean files for ``days`` and their history (the step contract); raise :class:`MissingInputs`
    naming gaps. Days before the first date are simply absent (the pipeline did not exist yet); every
    later one, and every day being computed, must be published."""
    recorder = InputRecorder(lake)
    files: dict[str, list[str]] = {Dataset.CLEAN: [], Dataset.CLEAN_LABELS: []}
    missing: list[str] = []
    for dataset, found in files.items():
        absent = []
        for day in sorted({d for target in days for d in contracts.read_days(STEP, dataset, target, cal)}):
            try:
                found += [lake.to_spark_uri(p) for p in lake.partition_files(dataset, day)]
            except NotPublished:
                if day in days or (day >= cal.first_date and lake.abandoned(dataset, day) is None):
                    absent.append(day)  # an abandoned history day is read as absent (lineage names it)
        if absent:
            missing.append(f"{dataset} {format_days(absent)}")
    if missing:
        raise MissingInputs(
            f"clean partitions not published in {lake.uri}: {'; '.join(missing)} "
            f"(needed for features of {format_days(days)}; first date {cal.first_date})"
        )
    parameters = {"windows_days": list(WINDOWS_DAYS), "label_delay_days": cal.label_delay_days}
    per_day = {day: lineage(STEP, recorder.step_inputs(STEP, day, cal), parameters) for day in days}
    return Inputs(sorted(days), files[Dataset.CLEAN], files[Dataset.CLEAN_LABELS], per_day)


def read_clean(spark: SparkSession, files: Sequence[str], schema=CLEAN_SCHEMA) -> DataFrame:
    spark_type = spark_schema(schema)
    if not files:
        return spark.createDataFrame([], spark_type)
    return spark.read.schema(spark_type).parquet(*files)


def label_events(spark: SparkSession, files: Sequence[str]) -> DataFrame:
    """The feed's label events the terminal windows need: which transaction, when it was reported."""
    events = read_clean(spark, files, LABEL_EVENT_SCHEMA)
    return events.select("TRANSACTION_ID", "TX_DATETIME", "TERMINAL_ID",
                         F.col(REPORTED_AT).alias(windows.EVENT_TIME), F.col(LABEL).alias(windows.EVENT_LABEL))


# --- the transform -----------------------------------------------------------------------------

_WORKING_COLUMNS = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", LABEL)


@dataclass(frozen=True)
class DayFolders:
    """Where the last pass writes each day: the day's attempt folder on the lake's file system."""

    filesystem: object  # the lake's WorkerFilesystem (or a pyarrow file system)
    folders: dict[int, str]  # days since 1970-01-01 -> attempt folder (file-system path)


def compute_features(
    clean: DataFrame,
    start: date,
    end: date,
    windows_days: Sequence[int] = WINDOWS_DAYS,
    partitions: int | None = None,
    terminal_partitions: int | None = None,
    write_to: DayFolders | None = None,
    delay_days: int | None = None,
    events: DataFrame | None = None,
) -> DataFrame:
    """Clean rows of days start-37 .. end -> one feature row per clean row of days start .. end.

    ``events`` are the label feed's events (:func:`label_events`) that arrived up to ``end``; the
    rows' own inline labels are the others. Neither is in the output: a feature row holds no label.

    ``windows_days`` other than the default (1, 7, 30) is for benchmarks: the output then has
    only those window columns, and not the FEATURE_SCHEMA order. The terminal pass has
    ``terminal_partitions`` partitions (default :func:`write_tasks`). With ``write_to`` that pass
    writes the rows itself (``jobs.spark.day_files``) and the frame holds one (day, path, rows)
    record per file written; evaluate it once.
    """
    spark = clean.sparkSession
    partitions = partitions or int(spark.conf.get("spark.sql.shuffle.partitions"))
    terminal_partitions = terminal_partitions or write_tasks(spark)
    customer_names = {n: (customer_count(n), customer_avg_amount(n)) for n in windows_days}
    terminal_names = {n: (terminal_count(n), terminal_risk(n)) for n in windows_days}

    on_weekend: Column = F.dayofweek("TX_DATETIME").isin(1, 7)  # 1 = Sunday, 7 = Saturday
    at_night: Column = F.hour("TX_DATETIME") <= 6
    rows = clean.select(
        *_WORKING_COLUMNS,
        on_weekend.cast("int").alias("TX_DURING_WEEKEND"),
        at_night.cast("int").alias("TX_DURING_NIGHT"),
    )
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
    terminal_pass = partial(
        windows.add_terminal_windows,
        key="TERMINAL_ID",
        time="TX_DATETIME",
        label=LABEL,
        txid="TRANSACTION_ID",
        windows=tuple(windows_days),
        delay_days=calendar().label_delay_days if delay_days is None else delay_days,
        names=terminal_names,
        keep_from_us=micros_at_midnight(start),
        keep_until_us=micros_at_midnight(shift(end, 1)),
    )
    if events is None:
        events = label_events(spark, [])
    mixed = with_customer.unionByName(events, allowMissingColumns=True)
    by_terminal = mixed.repartition(terminal_partitions, "TERMINAL_ID")
    if write_to is not None:
        if tuple(windows_days) != tuple(WINDOWS_DAYS):
            raise ValueError("only the contract's windows are written")
        writer = partial(
            day_files.compute_then_write,
            compute=terminal_pass,
            schema=FEATURE_SCHEMA,
            folders=dict(write_to.folders),
            filesystem=write_to.filesystem,
        )
        return by_terminal.mapInArrow(writer, spark_schema(day_files.RECORD_SCHEMA))
    without_label = T.StructType([f for f in with_customer.schema.fields if f.name != LABEL])
    with_terminal = by_terminal.mapInArrow(terminal_pass, _extend(without_label, terminal_names))
    return with_terminal.select(
        *ID_COLUMNS,
        "TX_DURING_WEEKEND",
        "TX_DURING_NIGHT",
        *(F.col(c) for n in windows_days for c in customer_names[n]),
        *(F.col(c) for n in windows_days for c in terminal_names[n]),
    )


def _extend(schema: T.StructType, names: dict[int, tuple[str, str]]) -> T.StructType:
    fields = list(schema.fields)
    for count_name, value_name in names.values():
        fields += [
            T.StructField(count_name, T.IntegerType(), False),
            T.StructField(value_name, T.DoubleType(), False),
        ]
    return T.StructType(fields)


# --- outputs -----------------------------------------------------------------------------------


def write_days(
    lake: Lake, clean: DataFrame, days: Sequence[date], delay_days: int, events: DataFrame | None = None
) -> tuple[dict[date, Attempt], dict[date, list[dict]]]:
    """Compute and write every day into its own fresh attempt folder in one Spark job.

    Returns the attempts and, per day, the records of the files written. The terminal pass writes
    its rows itself (``jobs.spark.day_files``): per task and day one file sorted by ``TX_DATETIME,
    TRANSACTION_ID``, named after the task's partition. Which partition a row is in depends only
    on the hash of its ``TERMINAL_ID`` and the partition count (:func:`write_tasks`, 2 in
    local[2]), so a range run and day-by-day runs (same settings) write the same rows in the same
    files in the same order. Handing the rows back to the JVM for a sort and Spark's Parquet
    writer cost as much as computing them (bench/RESULTS.md). Nothing is visible until
    :func:`publish_in_order`.
    """
    attempts = {day: lake.new_attempt(Dataset.FEATURES, day) for day in days}
    target = DayFolders(lake.worker_filesystem(), {epoch_day(day): a.path for day, a in attempts.items()})
    records = compute_features(clean, days[0], days[-1], write_to=target, delay_days=delay_days,
                               events=events).collect()
    written: dict[date, list[dict]] = {day: [] for day in days}
    for record in records:
        day = from_epoch_day(record["day"])
        if posixpath.dirname(record["path"]) != attempts[day].path:
            raise RuntimeError(f"a task wrote {record['path']} outside the attempt folder of {day}")
        written[day].append({"name": posixpath.basename(record["path"]), "rows": record["rows"],
                             "bytes": record["bytes"], "sha256": record["sha256"]})
    return attempts, written


def write_tasks(spark: SparkSession) -> int:
    """Partitions of the terminal pass, so the most files a day has: the tasks Spark runs at once."""
    partitions = int(spark.conf.get("spark.sql.shuffle.partitions"))
    return max(1, min(partitions, default_parallelism(spark)))


def publish_in_order(lake: Lake, attempts: dict[date, Attempt], written: dict[date, list[dict]],
                     provenance: dict[date, dict]) -> int:
    """Publish the written days in date order; 0, or 1 naming the days not done.

    A day without transactions gets an empty file with the schema (no task had rows for it). A day's
    folder must hold exactly the files the tasks reported writing, with FEATURE_SCHEMA.
    """
    days = sorted(attempts)
    for i, day in enumerate(days):
        try:
            files = written[day]
            check_schema(lake, attempts[day].path, files)
            if not files:
                files = [lake.write_parquet(attempts[day], FEATURE_SCHEMA.empty_table())]
            rows = sum(f["rows"] for f in files)
            lake.publish(attempts[day], stats={"rows": rows}, lineage=provenance[day], files=files)
        except Exception as exc:  # noqa: BLE001 - reported with the days not done
            return not_done(STEP, days[i:], exc, failed_on=day, lake=lake)
    return EXIT_OK


def check_schema(lake: Lake, folder: str, files: list[dict]) -> None:
    """Refuse files whose schema is not FEATURE_SCHEMA."""
    expected = [(f.name, f.type) for f in FEATURE_SCHEMA]
    for f in files:
        path = posixpath.join(folder, f["name"])
        got = [(c.name, c.type) for c in pq.ParquetFile(path, filesystem=lake.fs).schema_arrow]
        if got != expected:
            raise RuntimeError(f"{path}: schema {got} differs from FEATURE_SCHEMA {expected}")


def run(spark: SparkSession, lake: Lake, inputs: Inputs, cal: Calendar) -> int:
    """Compute and publish ``inputs.days`` (in date order); 0 on success, 1 naming the days not done."""
    days = inputs.days
    try:
        attempts, written = write_days(lake, read_clean(spark, inputs.files), days, cal.label_delay_days,
                                       label_events(spark, inputs.label_files))
    except Exception as exc:  # noqa: BLE001 - reported with the days not done
        return not_done(STEP, days, exc, failed_on=days[0], lake=lake)
    return publish_in_order(lake, attempts, written, inputs.lineage)


def main(argv: Sequence[str] | None = None) -> int:
    parser = day_parser("spark-submit jobs/spark/features.py",
                        "Compute the features of day D (or a range) from the clean days the step contract names.")
    parser.add_argument("--first-date", type=parse_day, default=None,
                        help="the pipeline's first date: older history may be absent (default FRAUD_FIRST_DATE)")
    args = parse_days(parser, argv)
    lake, cal = Lake.from_uri(args.lake), calendar()
    if args.first_date:
        cal = replace(cal, first_date=args.first_date)
    try:  # before starting Spark: a run that must wait for its inputs fails fast
        inputs_by_batch = [find_inputs(lake, batch, cal) for batch in batches(args.days, settings().range_batch_days)]
    except MissingInputs as exc:
        return not_done(STEP, args.days, f"{exc}; nothing written", code=EXIT_WAITING)
    spark = get_spark(f"{STEP} {format_days(args.days)}")
    code, batch = EXIT_OK, args.days
    with progress(STEP, total=len(args.days)) as advance:  # on a terminal: the days published of the range
        for inputs in inputs_by_batch:  # memory bounded by a batch
            batch = inputs.days
            advance.doing(format_days(batch))
            code = run(spark, lake, inputs, cal)
            if code != EXIT_OK:
                break
            advance(len(batch))
    if code == EXIT_OK:
        return EXIT_OK
    later = [d for d in args.days if d > batch[-1]]
    if later:
        not_done(STEP, later, f"not started: the batch {format_days(batch)} failed")
    return code


if __name__ == "__main__":
    sys.exit(main())
