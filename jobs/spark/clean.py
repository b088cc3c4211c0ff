"""Clean one landing day (or a range): typed, deduplicated rows to ``clean``, rejects to ``quarantine``.

    spark-submit jobs/spark/clean.py --lake URI --date D          # or --start D1 --end D2

For day D the job reads every data file of ``landing/transactions/date=D/`` (Parquet or CSV with a
header, possibly mixed), once the source's ``_SUCCESS`` marker is there. Every column is read as a
string first, so that a rejected row keeps its original values; then:

1. ``type_rows``  casts with Spark built-ins (``try_cast``: a bad value becomes null, never a failure);
   integers may be written as whole decimals ("12.0", as pandas writes a column with gaps);
   timestamps must carry a date and a time (ISO-8601, ``T`` or space, optional fraction; an
   explicit offset is converted to UTC, a naive value is UTC);
2. ``classify``   gives each row at most one reason, the first that applies in this order:
   null_required_field, unparseable_number, unparseable_timestamp, non_finite_amount,
   negative_amount, timestamp_outside_day, label_not_0_1_or_null;
3. ``deduplicate`` resolves the rows that passed, by ``TRANSACTION_ID``:
   copies equal in every typed column collapse into one (``duplicates_collapsed``). The label is
   ``TX_FRAUD`` together with its ``TX_FRAUD_SCENARIO``: copies that differ only there, where some
   have ``TX_FRAUD`` null and the others all carry the same label, are a label update (the
   labelled copy wins; one ``label_updates`` per transaction, further copies are collapsed). Any
   other difference, two different labels included, sends every row of that id to quarantine as
   conflicting_duplicate_id. Rejected rows take no part in deduplication.

Every landing row ends in exactly one place:
``rows_in = clean + quarantined_total + duplicates_collapsed + label_updates``.
The quarantine partition is published first and the clean one last, both carrying the day's stats,
so a published clean partition implies its quarantine; the gate reads the clean manifest's stats.

A range run (``--start/--end``) is one batch, not a loop of one-day runs: every landing day is
first inspected on the driver (marker, headers, Parquet footers, required columns); the days up
to the first bad one are read together (one scan per file layout, the day as a column), resolved
per ``(day, TRANSACTION_ID)`` in one cached pass, counted in one aggregate, and written with one
partitioned write per dataset into the days' attempt folders; then each day is published in date
order. A one-day run is the same batch with one day, so a range gives every day the same rows,
values and stats as day-by-day runs. When a day is bad, the good days before it are published
and the run fails naming the bad day and every later one (published days are always a prefix of
the range, so it can be rerun from the first day named).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import partial, reduce

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark import StorageLevel, cloudpickle
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.calendar import epoch_day, from_epoch_day
from jobs.common.cli import EXIT_OK, day_parser, not_done, parse_days
from jobs.common.lake import Attempt, Dataset, Lake
from jobs.common.provenance import input_record, lineage
from jobs.common.schema import (
    CLEAN_SCHEMA,
    KEY,
    LABEL,
    OPTIONAL_RAW_COLUMNS,
    QUARANTINE_SCHEMA,
    RAW_COLUMNS,
    REQUIRED_RAW_COLUMNS,
    QuarantineReason,
)
from jobs.spark import day_files
from jobs.spark.session import get_spark, spark_schema

cloudpickle.register_pickle_by_value(day_files)  # the workers write the files: no repository needed there

STEP = "clean"
SOURCE_FILE = "source_file"
REASON = "reason"
OUTCOME = "outcome"
RAW = "raw"  # struct of the original string values
DAY = "date"  # the landing day of a row

# Where each landing row ends up (the ``outcome`` column).
CLEAN = "clean"
QUARANTINED = "quarantined"
COLLAPSED = "collapsed"
LABEL_UPDATE = "label_update"

RAW_STRING_SCHEMA = T.StructType(
    [T.StructField(name, T.StringType(), True) for name in RAW_COLUMNS]
    + [T.StructField(SOURCE_FILE, T.StringType(), True)]
)
CLEAN_SPARK_SCHEMA = spark_schema(CLEAN_SCHEMA)
LABEL_COLUMNS = OPTIONAL_RAW_COLUMNS  # TX_FRAUD and TX_FRAUD_SCENARIO: filled in when confirmed
TIMESTAMP_COLUMN = "TX_DATETIME"
AMOUNT_COLUMN = "TX_AMOUNT"
INTEGER_COLUMNS = tuple(
    f.name for f in CLEAN_SPARK_SCHEMA if isinstance(f.dataType, T.LongType | T.IntegerType)
)
NUMBER_COLUMNS = (*INTEGER_COLUMNS, AMOUNT_COLUMN)
# ISO-8601 date and time (seconds, fraction and zone optional); Spark's cast alone would also take
# "2018" or a bare date and make a midnight of it.
ISO_TIMESTAMP = r"^\d{4}-\d{2}-\d{2}[T ]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)?$"
CSV_HEADER_BYTES = 1 << 16
CLEAN_ORDER = (TIMESTAMP_COLUMN, KEY)  # row order within a clean file
QUARANTINE_ORDER = (SOURCE_FILE, *RAW_COLUMNS, REASON)


class CleanError(RuntimeError):
    """The day cannot be cleaned as delivered; nothing was published for it."""


# --- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LandingFile:
    """One data file of a landing day, as inspected on the driver before Spark reads it."""

    path: str  # file-system path (what ``lake.fs`` takes)
    uri: str  # file:// or s3:// (what ``source_file`` holds)
    spark_uri: str  # file:// or s3a:// (what Spark reads)
    fmt: str  # "csv" or "parquet"
    names: tuple[str, ...]  # header / column names; () for a 0-byte CSV (no header, no rows)
    layout: tuple[str, ...]  # names and types: files with equal layouts are read by one scan


@dataclass(frozen=True)
class LandingDay:
    day: date
    files: tuple[LandingFile, ...]
    source: dict  # the landing day as lineage names it (its digest: the delivered files)


def inspect_landing(lake: Lake, day: date) -> LandingDay:
    """Check landing day D on the driver: marker, readable headers / footers, required columns.

    Everything that makes a day bad as delivered is found here, before any Spark job, so a range
    run knows its bad day up front. Raises :class:`CleanError`.
    """
    folder = lake.to_uri(lake.partition_path(Dataset.LANDING, day))
    if not lake.landing_ready(day):
        raise CleanError(f"landing day {day} is not complete: no _SUCCESS marker in {folder}")
    files = []
    for info in lake.landing_files(day):
        uri = lake.to_uri(info.path)
        if info.base_name.lower().endswith(".csv"):
            fmt, names = "csv", tuple(_csv_header(lake, info.path))
            layout = names
        else:
            try:
                schema = pq.ParquetFile(info.path, filesystem=lake.fs).schema_arrow
            except Exception as exc:
                raise CleanError(f"cannot read Parquet file {uri}: {_first_line(exc)}") from exc
            fmt, names = "parquet", tuple(schema.names)
            layout = tuple(f"{f.name}:{f.type}" for f in schema)
        if names:
            _match_columns(names, uri)
        files.append(LandingFile(info.path, uri, lake.to_spark_uri(info.path), fmt, names, layout))
    return LandingDay(day, tuple(files), input_record(lake, Dataset.LANDING, day))


def read_landing(spark: SparkSession, days: Sequence[LandingDay]) -> DataFrame:
    """All rows of the landing days as strings (RAW columns + ``source_file``) plus their ``date``.

    Files of the same format and layout are read by one scan whatever their day (Spark names the
    file each row comes from, which gives back its day and URI), so a range of days costs a
    handful of scans, not one per file.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[tuple[date, LandingFile]]] = {}
    for landing in days:
        for f in landing.files:
            if f.names:  # a 0-byte CSV has no rows
                groups.setdefault((f.fmt, f.layout), []).append((landing.day, f))
    empty = spark.createDataFrame([], RAW_STRING_SCHEMA).withColumn(DAY, F.lit(None).cast(T.DateType()))
    frames = [_read_group(spark, members) for members in groups.values()]
    return reduce(DataFrame.unionByName, frames) if frames else empty


def _read_group(spark: SparkSession, members: list[tuple[date, LandingFile]]) -> DataFrame:
    first = members[0][1]
    paths = [f.spark_uri for _, f in members]
    if first.fmt == "csv":
        positional = T.StructType(
            [T.StructField(f"_c{i}", T.StringType(), True) for i in range(len(first.names))]
        )
        frame = (
            spark.read.schema(positional)
            .option("header", True)  # every file's own first line is its header
            .option("enforceSchema", True)  # the schema *is* the header, by position
            .option("mode", "PERMISSIVE")
            .csv(paths)
        )
        columns = positional.names
    else:
        try:
            frame = spark.read.parquet(*paths)
        except Exception as exc:
            raise CleanError(f"cannot read Parquet file {first.uri}: {_first_line(exc)}") from exc
        columns = list(first.names)
    position = _match_columns(first.names, first.uri)
    source, day = _file_of_row(members)
    return frame.select(
        *[
            F.col(_quoted(columns[position[name]])).cast("string").alias(name)
            if name in position
            else F.lit(None).cast("string").alias(name)
            for name in RAW_COLUMNS
        ],
        source.alias(SOURCE_FILE),
        day.alias(DAY),
    )


def _file_of_row(members: list[tuple[date, LandingFile]]) -> tuple[Column, Column]:
    """The landing URI and day of the file a row was read from (a failing job if Spark names another)."""
    by_path = F.create_map(
        *[
            x
            for day, f in members
            for x in (F.lit(f.path.lstrip("/")), F.struct(F.lit(f.uri).alias("uri"), F.lit(day).alias("day")))
        ]
    )
    spark_path = F.col("_metadata.file_path")
    # Spark names files as URIs (file:/p, file:///p, s3a://bucket/key), possibly %-encoded.
    found = F.coalesce(by_path[_strip_scheme(spark_path)], by_path[_strip_scheme(F.url_decode(spark_path))])
    unknown = F.raise_error(F.concat(F.lit("clean: Spark read a file it was not given: "), spark_path))
    return F.coalesce(found["uri"], unknown), found["day"]


def _strip_scheme(path: Column) -> Column:
    return F.regexp_replace(path, r"^[A-Za-z][A-Za-z0-9+.\-]*:/*", "")


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _csv_header(lake: Lake, fs_path: str) -> list[str]:
    with lake.fs.open_input_stream(fs_path) as f:
        head = f.read(CSV_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    return [name.strip() for name in next(csv.reader(io.StringIO(head)), [])]


def _match_columns(names: Sequence[str], uri: str) -> dict[str, int]:
    """RAW column -> position of the file's column of that name (any case); others are ignored."""
    matched = {}
    for column in RAW_COLUMNS:
        found = [i for i, name in enumerate(names) if name.lower() == column.lower()]
        if len(found) > 1:
            spelled = ", ".join(names[i] for i in found)
            raise CleanError(f"column {column} appears more than once ({spelled}) in {uri}")
        if found:
            matched[column] = found[0]
        elif column in REQUIRED_RAW_COLUMNS:
            raise CleanError(f"required column {column} is missing from {uri} (columns: {', '.join(names)})")
    return matched


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- transforms ---------------------------------------------------------------------------------
def type_rows(raw: DataFrame) -> DataFrame:
    """RAW columns cast to their clean types (null where unparseable), originals kept in ``raw``."""
    return raw.select(
        F.struct(*RAW_COLUMNS).alias(RAW),
        F.col(SOURCE_FILE),
        F.col(DAY),
        *[_typed(field).alias(field.name) for field in CLEAN_SPARK_SCHEMA],
    )


def _typed(field: T.StructField) -> Column:
    text = F.trim(F.col(field.name))
    if isinstance(field.dataType, T.TimestampNTZType):
        # Through a zoned timestamp so that an explicit offset is honoured; the session time zone is
        # UTC (jobs.spark.session), so a naive value keeps its wall-clock time.
        is_iso = text.rlike(ISO_TIMESTAMP)
        return F.when(is_iso, text.try_cast(T.TimestampType()).cast(T.TimestampNTZType()))
    if isinstance(field.dataType, T.LongType | T.IntegerType):
        # "12" or a whole number written as a decimal ("12.0", as pandas writes a column with gaps).
        as_decimal = text.try_cast(T.DecimalType(38, 9))
        is_whole = as_decimal == F.floor(as_decimal)
        return F.coalesce(
            text.try_cast(field.dataType), F.when(is_whole, as_decimal.try_cast(field.dataType))
        )
    return text.try_cast(field.dataType)


def _is_blank(name: str) -> Column:
    value = F.col(f"{RAW}.{name}")
    return value.isNull() | (F.trim(value) == "")


def _is_unparsed(name: str) -> Column:
    return ~_is_blank(name) & F.col(name).isNull()


def classify(typed: DataFrame) -> DataFrame:
    """Add ``reason``: the first row-level rule the row breaks (null when it breaks none).

    The day a row must fall on is its ``date`` column (the landing day it was delivered in).
    """
    amount = F.col(AMOUNT_COLUMN)
    label = F.col(LABEL)
    has_null_required = reduce(Column.__or__, [_is_blank(name) for name in REQUIRED_RAW_COLUMNS])
    has_bad_number = reduce(Column.__or__, [_is_unparsed(name) for name in NUMBER_COLUMNS])
    has_bad_timestamp = _is_unparsed(TIMESTAMP_COLUMN)
    is_non_finite_amount = F.isnan(amount) | (F.abs(amount) == float("inf"))
    is_negative_amount = amount < 0
    is_outside_day = F.to_date(F.col(TIMESTAMP_COLUMN)) != F.col(DAY)
    has_bad_label = label.isNotNull() & ~label.isin(0, 1)
    reason = (
        F.when(has_null_required, QuarantineReason.NULL_REQUIRED)
        .when(has_bad_number, QuarantineReason.BAD_NUMBER)
        .when(has_bad_timestamp, QuarantineReason.BAD_TIMESTAMP)
        .when(is_non_finite_amount, QuarantineReason.NON_FINITE_AMOUNT)
        .when(is_negative_amount, QuarantineReason.NEGATIVE_AMOUNT)
        .when(is_outside_day, QuarantineReason.OUTSIDE_DAY)
        .when(has_bad_label, QuarantineReason.BAD_LABEL)
    )
    return typed.withColumn(REASON, reason)


def deduplicate(classified: DataFrame) -> DataFrame:
    """Add ``outcome`` (clean / quarantined / collapsed / label_update) and the final ``reason``.

    Rows are compared within their landing day only: a range run resolves each day exactly as a
    run of that day alone does.
    """
    is_rejected = F.col(REASON).isNotNull()
    by_id = Window.partitionBy(DAY, is_rejected, KEY)  # rejected rows are never compared with valid ones
    labelled_first = by_id.orderBy(F.col(LABEL).isNull())
    is_labelled = F.col(LABEL).isNotNull()
    transaction = F.struct(*[name for name in RAW_COLUMNS if name not in LABEL_COLUMNS])
    label = F.struct(*LABEL_COLUMNS)
    transactions = F.size(F.collect_set(transaction).over(by_id))
    labels = F.size(F.collect_set(F.when(is_labelled, label)).over(by_id))  # collect_set skips nulls
    unlabelled_versions = F.size(F.collect_set(F.when(~is_labelled, label)).over(by_id))
    n_labelled = F.count(LABEL).over(by_id)
    position = F.row_number().over(labelled_first)

    is_conflict = (transactions > 1) | (labels > 1) | (unlabelled_versions > 1)
    is_kept = position == 1
    is_superseded_unlabelled = ~is_labelled & (n_labelled > 0) & (position == n_labelled + 1)
    outcome = (
        F.when(is_rejected | is_conflict, QUARANTINED)
        .when(is_kept, CLEAN)
        .when(is_superseded_unlabelled, LABEL_UPDATE)
        .otherwise(COLLAPSED)
    )
    reason = F.when(is_rejected, F.col(REASON)).when(is_conflict, QuarantineReason.CONFLICTING_DUPLICATE)
    return classified.withColumns({OUTCOME: outcome, REASON: reason})


def clean_rows(resolved: DataFrame) -> DataFrame:
    """The clean partitions: CLEAN_SCHEMA, one row per transaction, plus the ``date`` column."""
    return resolved.filter(F.col(OUTCOME) == CLEAN).select(
        *[F.col(f.name).cast(f.dataType) for f in CLEAN_SPARK_SCHEMA], F.col(DAY)
    )


def quarantine_rows(resolved: DataFrame) -> DataFrame:
    """The quarantine partition: QUARANTINE_SCHEMA, original strings plus reason and source file."""
    return resolved.filter(F.col(OUTCOME) == QUARANTINED).select(
        *[
            F.col(f"{RAW}.{name}" if name in RAW_COLUMNS else name).alias(name)
            for name in QUARANTINE_SCHEMA.names
        ],
        F.col(DAY),
    )


def day_stats(counts: Sequence[Row], files: int) -> dict:
    """The manifest stats of one day from its ``(outcome, reason, count)`` rows."""
    by_outcome = {outcome: 0 for outcome in (CLEAN, QUARANTINED, COLLAPSED, LABEL_UPDATE)}
    by_reason = dict.fromkeys(QuarantineReason.ALL, 0)
    for row in counts:
        by_outcome[row[OUTCOME]] += row["count"]
        if row[OUTCOME] == QUARANTINED:
            by_reason[row[REASON]] += row["count"]
    return {
        "rows_in": sum(by_outcome.values()),
        "clean": by_outcome[CLEAN],
        "quarantined": by_reason,
        "quarantined_total": by_outcome[QUARANTINED],
        "duplicates_collapsed": by_outcome[COLLAPSED],
        "label_updates": by_outcome[LABEL_UPDATE],
        "files": files,
    }


def batch_stats(resolved: DataFrame, days: Sequence[LandingDay]) -> dict[date, dict]:
    """Every day's stats from one small aggregate (a dozen rows a day at most come back)."""
    rows = resolved.groupBy(DAY, OUTCOME, REASON).count().collect()
    by_day: dict[date, list[Row]] = {landing.day: [] for landing in days}
    for row in rows:
        if row[DAY] not in by_day:
            raise CleanError(f"rows of an unexpected day {row[DAY]} (landing files of {_days(days)})")
        by_day[row[DAY]].append(row)
    return {landing.day: day_stats(by_day[landing.day], len(landing.files)) for landing in days}


# --- writing and publishing ------------------------------------------------------------------------
def write_partitions(
    lake: Lake, frame: DataFrame, attempts: dict[date, Attempt], order: Sequence[str], schema: pa.Schema
) -> dict[date, list[dict]]:
    """Write every day of ``frame`` into its own attempt folder in one Spark job (one file a day).

    Rows are hash-partitioned by day and sorted within partitions by day, then ``order``; each task
    writes its days' files itself (``jobs.spark.day_files``, pyarrow through the lake's file
    system: no rename, so the same on S3). A day without rows gets an empty file with the schema.
    Returns each day's file records for ``Lake.publish``; nothing is visible until then.
    """
    folders = {epoch_day(day): attempt.path for day, attempt in attempts.items()}
    writer = partial(day_files.write_grouped_days, schema=schema, day_column=DAY, folders=folders,
                     filesystem=lake.fs)
    records = (
        _one_partition_a_day(frame, len(attempts))
        .sortWithinPartitions(DAY, *order)
        .mapInArrow(writer, spark_schema(day_files.RECORD_SCHEMA))
        .collect()
    )
    written: dict[date, list[dict]] = {day: [] for day in attempts}
    for record in records:
        day = from_epoch_day(record["day"])
        written[day].append({"name": posixpath.basename(record["path"]), "rows": record["rows"],
                             "bytes": record["bytes"], "sha256": record["sha256"]})
    for day, attempt in attempts.items():
        if not written[day]:
            written[day] = [lake.write_parquet(attempt, schema.empty_table())]
    return written


def _one_partition_a_day(frame: DataFrame, days: int) -> DataFrame:
    """Every day's rows in one partition: no shuffle for one day, a hash shuffle by day for more."""
    return frame.coalesce(1) if days == 1 else frame.repartition(days, DAY)


def clean_batch(spark: SparkSession, lake: Lake, days: Sequence[LandingDay]) -> tuple[int, Exception | None]:
    """Clean inspected landing days together and publish them in date order.

    One read of every file, one cached resolve, one stats aggregate and one partitioned write per
    output dataset, whatever the number of days. Raises if the Spark part fails (nothing is
    published then); returns ``(days published, None)``, or the count published before a publish
    failed and its error (the attempts of the days not published are removed).
    """
    started = time.time()
    resolved = deduplicate(classify(type_rows(read_landing(spark, days)))).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    attempts: dict[str, dict[date, Attempt]] = {}
    try:
        try:
            stats = batch_stats(resolved, days)
        except CleanError:
            raise
        except Exception as exc:
            raise CleanError(f"cleaning landing of {_days(days)} failed: {_first_line(exc)}") from exc
        for dataset in (Dataset.QUARANTINE, Dataset.CLEAN):
            attempts[dataset] = {landing.day: lake.new_attempt(dataset, landing.day) for landing in days}
        files = {
            Dataset.QUARANTINE: write_partitions(lake, quarantine_rows(resolved), attempts[Dataset.QUARANTINE],
                                                 QUARANTINE_ORDER, QUARANTINE_SCHEMA),
            Dataset.CLEAN: write_partitions(lake, clean_rows(resolved), attempts[Dataset.CLEAN], CLEAN_ORDER,
                                            CLEAN_SCHEMA),
        }
    except Exception:
        for by_day in attempts.values():
            for attempt in by_day.values():
                lake.delete_dir(attempt.path)
        raise
    finally:
        resolved.unpersist()
    seconds = round(time.time() - started, 3)
    for i, landing in enumerate(days):
        day = landing.day
        try:
            # quarantine first: a published clean day implies its quarantine
            provenance = lineage(STEP, [landing.source])
            for dataset in (Dataset.QUARANTINE, Dataset.CLEAN):
                lake.publish(attempts[dataset][day], stats=stats[day], lineage=provenance, files=files[dataset][day])
            record = {"date": day.isoformat(), "seconds": seconds, "batch": _days(days), "stats": stats[day]}
            lake.write_run_record("clean", day, attempts[Dataset.CLEAN][day].attempt_id, record)
        except Exception as exc:  # noqa: BLE001 - the caller names the days not done
            for later in days[i:]:
                for dataset in (Dataset.QUARANTINE, Dataset.CLEAN):
                    attempt = attempts[dataset][later.day]
                    if (lake.manifest(dataset, later.day) or {}).get("attempt") != attempt.attempt_id:
                        lake.delete_dir(attempt.path)
            return i, exc
        print(
            json.dumps({"step": "clean", "date": day.isoformat(), **stats[day]}, sort_keys=True), flush=True
        )
    return len(days), None


def clean_days(spark: SparkSession, lake: Lake, days: Sequence[date]) -> int:
    """Clean ``days`` (in date order) with as few Spark jobs as possible; 0, or 1 naming the days not done.

    Every day is inspected on the driver first; the days before the first bad one (no
    ``_SUCCESS``, an unreadable file, a missing column) are cleaned as one batch and published in
    date order, and the run then fails naming the bad day and every later day: the published days
    are always a prefix of the range, so the range can be rerun from the day named first. If the
    batch fails inside Spark (a file whose damage only shows when read), the same days are cleaned
    one by one to find and name the bad one.
    """
    ready: list[LandingDay] = []
    failure: tuple[date, Exception] | None = None
    for day in days:
        try:
            ready.append(inspect_landing(lake, day))
        except CleanError as exc:
            failure = (day, exc)
            break
    if ready:
        done, error = _clean_batch_or_each(spark, lake, ready)
        if error is not None:
            failure = (ready[done].day, error)
    if failure is None:
        return EXIT_OK
    day, exc = failure
    return not_done(STEP, [d for d in days if d >= day], exc, failed_on=day)


def _clean_batch_or_each(
    spark: SparkSession, lake: Lake, days: list[LandingDay]
) -> tuple[int, Exception | None]:
    try:
        return clean_batch(spark, lake, days)
    except Exception as exc:  # noqa: BLE001 - reported, or narrowed down day by day
        if len(days) == 1:
            return 0, exc
        print(
            f"clean: cleaning {_days(days)} together failed ({_first_line(exc)}); cleaning day by day",
            file=sys.stderr,
        )
    for i, landing in enumerate(days):
        try:
            done, error = clean_batch(spark, lake, [landing])
        except Exception as exc:  # noqa: BLE001 - reported with the days not done
            done, error = 0, exc
        if error is not None:
            return i + done, error
    return len(days), None


def _days(days: Sequence[LandingDay]) -> str:
    first, last = days[0].day, days[-1].day
    return first.isoformat() if first == last else f"{first}..{last}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = day_parser("spark-submit jobs/spark/clean.py",
                        "Clean landing transactions into the clean and quarantine partitions.")
    args = parse_days(parser, argv)
    lake = Lake.from_uri(args.lake)
    spark = get_spark("fraud-clean")
    return clean_days(spark, lake, args.days)


if __name__ == "__main__":
    sys.exit(main())
