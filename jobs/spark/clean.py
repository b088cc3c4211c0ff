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
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("jobs") is None:  # run as a file (spark-submit, python jobs/spark/clean.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from datetime import date  # noqa: E402
from functools import reduce  # noqa: E402

import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from pyspark import StorageLevel  # noqa: E402
from pyspark.sql import Column, DataFrame, SparkSession, Window  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402

from jobs.common.lake import Attempt, Dataset, Lake  # noqa: E402
from jobs.common.schema import (  # noqa: E402
    CLEAN_SCHEMA,
    KEY,
    LABEL,
    OPTIONAL_RAW_COLUMNS,
    QUARANTINE_SCHEMA,
    RAW_COLUMNS,
    REQUIRED_RAW_COLUMNS,
    QuarantineReason,
)
from jobs.spark.session import date_args, get_spark, run_days, spark_schema  # noqa: E402

SOURCE_FILE = "source_file"
REASON = "reason"
OUTCOME = "outcome"
RAW = "raw"  # struct of the original string values

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


class CleanError(RuntimeError):
    """The day cannot be cleaned as delivered; nothing was published for it."""


# --- reading ------------------------------------------------------------------------------------
def read_landing(spark: SparkSession, lake: Lake, day: date) -> tuple[DataFrame, int]:
    """All rows of landing day D as strings (RAW columns + ``source_file``), and the file count."""
    folder = lake.to_uri(lake.partition_path(Dataset.LANDING, day))
    if not lake.landing_ready(day):
        raise CleanError(f"landing day {day} is not complete: no _SUCCESS marker in {folder}")
    files = lake.landing_files(day)
    frames = [read_landing_file(spark, lake, info) for info in files]
    empty = spark.createDataFrame([], RAW_STRING_SCHEMA)
    return reduce(DataFrame.unionByName, frames, empty), len(files)


def read_landing_file(spark: SparkSession, lake: Lake, info: pafs.FileInfo) -> DataFrame:
    """One landing file with every RAW column as a string; names match case-insensitively."""
    uri = lake.to_uri(info.path)
    if info.base_name.lower().endswith(".csv"):
        header = _csv_header(lake, info.path)
        if not header:  # a 0-byte file: no header, no rows
            return spark.createDataFrame([], RAW_STRING_SCHEMA)
        positional = T.StructType([T.StructField(f"_c{i}", T.StringType(), True) for i in range(len(header))])
        frame = (
            spark.read.schema(positional)
            .option("header", True)
            .option("enforceSchema", True)  # the schema *is* the header, by position
            .option("mode", "PERMISSIVE")
            .csv(lake.to_spark_uri(info.path))
        )
        names, columns = header, positional.names
    else:
        try:
            names = pq.ParquetFile(info.path, filesystem=lake.fs).schema_arrow.names
            frame = spark.read.parquet(lake.to_spark_uri(info.path))
        except Exception as exc:
            raise CleanError(f"cannot read Parquet file {uri}: {_first_line(exc)}") from exc
        columns = names
    position = _match_columns(names, uri)
    return frame.select(
        *[
            F.col(_quoted(columns[position[name]])).cast("string").alias(name)
            if name in position
            else F.lit(None).cast("string").alias(name)
            for name in RAW_COLUMNS
        ],
        F.lit(uri).alias(SOURCE_FILE),
    )


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


def classify(typed: DataFrame, day: date) -> DataFrame:
    """Add ``reason``: the first row-level rule the row breaks (null when it breaks none)."""
    amount = F.col(AMOUNT_COLUMN)
    label = F.col(LABEL)
    has_null_required = reduce(Column.__or__, [_is_blank(name) for name in REQUIRED_RAW_COLUMNS])
    has_bad_number = reduce(Column.__or__, [_is_unparsed(name) for name in NUMBER_COLUMNS])
    has_bad_timestamp = _is_unparsed(TIMESTAMP_COLUMN)
    is_non_finite_amount = F.isnan(amount) | (F.abs(amount) == float("inf"))
    is_negative_amount = amount < 0
    is_outside_day = F.to_date(F.col(TIMESTAMP_COLUMN)) != F.lit(day)
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
    """Add ``outcome`` (clean / quarantined / collapsed / label_update) and the final ``reason``."""
    is_rejected = F.col(REASON).isNotNull()
    by_id = Window.partitionBy(is_rejected, KEY)  # rejected rows are never compared with valid ones
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
    """The clean partition: CLEAN_SCHEMA, one row per transaction."""
    return resolved.filter(F.col(OUTCOME) == CLEAN).select(
        *[F.col(f.name).cast(f.dataType) for f in CLEAN_SPARK_SCHEMA]
    )


def quarantine_rows(resolved: DataFrame) -> DataFrame:
    """The quarantine partition: QUARANTINE_SCHEMA, original strings plus reason and source file."""
    return resolved.filter(F.col(OUTCOME) == QUARANTINED).select(
        *[
            F.col(f"{RAW}.{name}" if name in RAW_COLUMNS else name).alias(name)
            for name in QUARANTINE_SCHEMA.names
        ]
    )


def day_stats(resolved: DataFrame, files: int) -> dict:
    """The manifest stats of one day (one small aggregate; at most a dozen rows come back)."""
    counts = resolved.groupBy(OUTCOME, REASON).count().collect()
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


# --- one day ------------------------------------------------------------------------------------
def _write(frame: DataFrame, attempt: Attempt, order: Sequence[str]) -> None:
    frame.coalesce(1).sortWithinPartitions(*order).write.mode("overwrite").parquet(attempt.spark_uri)


def clean_day(spark: SparkSession, lake: Lake, day: date) -> dict:
    """Clean landing day D and publish quarantine, then clean; return the stats."""
    started = time.time()
    raw, files = read_landing(spark, lake, day)
    resolved = deduplicate(classify(type_rows(raw), day)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        try:
            stats = day_stats(resolved, files)
        except Exception as exc:
            folder = lake.to_uri(lake.partition_path(Dataset.LANDING, day))
            raise CleanError(f"cleaning {folder} failed: {_first_line(exc)}") from exc
        attempts = [lake.new_attempt(Dataset.QUARANTINE, day), lake.new_attempt(Dataset.CLEAN, day)]
        try:
            _write(quarantine_rows(resolved), attempts[0], [SOURCE_FILE, *RAW_COLUMNS, REASON])
            _write(clean_rows(resolved), attempts[1], [TIMESTAMP_COLUMN, KEY])
        except Exception:
            for attempt in attempts:
                lake.delete_dir(attempt.path)
            raise
    finally:
        resolved.unpersist()
    for attempt in attempts:  # quarantine first: a published clean day implies its quarantine
        lake.publish(attempt, stats=stats)
    lake.write_run_record(
        "clean",
        day,
        attempts[1].attempt_id,
        {"date": day.isoformat(), "seconds": round(time.time() - started, 3), "stats": stats},
    )
    print(json.dumps({"step": "clean", "date": day.isoformat(), **stats}, sort_keys=True), flush=True)
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    args = date_args("Clean landing transactions into the clean and quarantine partitions.", argv)
    lake = Lake.from_uri(args.lake)
    spark = get_spark("fraud-clean")
    return run_days(args.days, lambda day: clean_day(spark, lake, day), "clean")


if __name__ == "__main__":
    sys.exit(main())
