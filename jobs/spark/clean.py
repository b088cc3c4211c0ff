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
   ragged_line (a CSV line with more or fewer fields than its header), null_required_field, unparseable_number, unparseable_timestamp, non_finite_amount,
   negative_amount, amount_above_bound (FRAUD_MAX_AMOUNT), timestamp_outside_day, label_not_0_1_or_null;
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

import sys
import time
from collections.abc import Sequence
from datetime import date
from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs.common.cli import EXIT_OK, batches, day_parser, error_summary, not_done, parse_days
from jobs.common.config import settings
from jobs.common.lake import Attempt, Dataset, Lake
from jobs.common.progress import progress
from jobs.common.provenance import lineage
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
from jobs.spark import labels
from jobs.spark.landing import (
    DAY,
    RAGGED,
    RAW,
    REASON,
    SOURCE_FILE,
    CleanError,
    LandingDay,
    Source,
    days_label,
    inspect_landing,
    is_blank,
    is_unparsed,
    publish_days,
    read_landing,
    typed,
    write_partitions,
)
from jobs.spark.session import get_spark, spark_schema

STEP = "clean"
OUTCOME = "outcome"
TRANSACTIONS = Source(Dataset.LANDING, RAW_COLUMNS, REQUIRED_RAW_COLUMNS)

# Where each landing row ends up (the ``outcome`` column).
CLEAN = "clean"
QUARANTINED = "quarantined"
COLLAPSED = "collapsed"
LABEL_UPDATE = "label_update"

CLEAN_SPARK_SCHEMA = spark_schema(CLEAN_SCHEMA)
LABEL_COLUMNS = OPTIONAL_RAW_COLUMNS  # TX_FRAUD and TX_FRAUD_SCENARIO: filled in when confirmed
TIMESTAMP_COLUMN = "TX_DATETIME"
AMOUNT_COLUMN = "TX_AMOUNT"
INTEGER_COLUMNS = tuple(
    f.name for f in CLEAN_SPARK_SCHEMA if isinstance(f.dataType, T.LongType | T.IntegerType)
)
NUMBER_COLUMNS = (*INTEGER_COLUMNS, AMOUNT_COLUMN)
CLEAN_ORDER = (TIMESTAMP_COLUMN, KEY)  # row order within a clean file
QUARANTINE_ORDER = (SOURCE_FILE, *RAW_COLUMNS, REASON)


# --- transforms ---------------------------------------------------------------------------------
def type_rows(raw: DataFrame) -> DataFrame:
    """RAW columns cast to their clean types (null where unparseable), originals kept in ``raw``."""
    return raw.select(
        F.struct(*RAW_COLUMNS).alias(RAW),
        F.col(SOURCE_FILE),
        F.col(RAGGED),
        F.col(DAY),
        *[typed(field).alias(field.name) for field in CLEAN_SPARK_SCHEMA],
    )


def classify(typed: DataFrame) -> DataFrame:
    """Add ``reason``: the first row-level rule the row breaks (null when it breaks none).

    The day a row must fall on is its ``date`` column (the landing day it was delivered in).
    """
    amount = F.col(AMOUNT_COLUMN)
    label = F.col(LABEL)
    has_null_required = reduce(Column.__or__, [is_blank(name) for name in REQUIRED_RAW_COLUMNS])
    has_bad_number = reduce(Column.__or__, [is_unparsed(name) for name in NUMBER_COLUMNS])
    has_bad_timestamp = is_unparsed(TIMESTAMP_COLUMN)
    is_non_finite_amount = F.isnan(amount) | (F.abs(amount) == float("inf"))
    is_negative_amount = amount < 0
    is_above_bound = amount > F.lit(settings().max_amount)
    is_outside_day = F.to_date(F.col(TIMESTAMP_COLUMN)) != F.col(DAY)
    has_bad_label = label.isNotNull() & ~label.isin(0, 1)
    reason = (
        F.when(F.col(RAGGED), QuarantineReason.RAGGED)
        .when(has_null_required, QuarantineReason.NULL_REQUIRED)
        .when(has_bad_number, QuarantineReason.BAD_NUMBER)
        .when(has_bad_timestamp, QuarantineReason.BAD_TIMESTAMP)
        .when(is_non_finite_amount, QuarantineReason.NON_FINITE_AMOUNT)
        .when(is_negative_amount, QuarantineReason.NEGATIVE_AMOUNT)
        .when(is_above_bound, QuarantineReason.AMOUNT_ABOVE_BOUND)
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

    def differ(value: Column) -> Column:
        """Whether the id's rows hold more than one distinct non-null ``value``: its least and its
        greatest differ. Constant memory a row whatever the copies (a set of them per row is not)."""
        return ~F.min(value).over(by_id).eqNullSafe(F.max(value).over(by_id))

    n_labelled = F.count(LABEL).over(by_id)
    position = F.row_number().over(labelled_first)

    # another transaction under the id; two different labels; two unlabelled versions of the label
    is_conflict = differ(transaction) | differ(F.when(is_labelled, label)) | differ(F.when(~is_labelled, label))
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
            raise CleanError(f"rows of an unexpected day {row[DAY]} (landing files of {days_label(days)})")
        by_day[row[DAY]].append(row)
    return {landing.day: day_stats(by_day[landing.day], len(landing.files)) for landing in days}


# --- writing and publishing ------------------------------------------------------------------------
def clean_batch(spark: SparkSession, lake: Lake, days: Sequence[LandingDay]) -> tuple[int, Exception | None]:
    """Clean inspected landing days together and publish them in date order.

    One read of every file, one cached resolve, one stats aggregate and one partitioned write per
    output dataset, whatever the number of days. Raises if the Spark part fails (nothing is
    published then); returns ``(days published, None)``, or the count published before a publish
    failed and its error (the attempts of the days not published are removed).
    """
    started = time.time()
    resolved = deduplicate(classify(type_rows(read_landing(spark, days, TRANSACTIONS)))).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    attempts: dict[str, dict[date, Attempt]] = {}
    try:
        try:
            stats = batch_stats(resolved, days)
        except CleanError:
            raise
        except Exception as exc:
            raise CleanError(f"cleaning landing of {days_label(days)} failed: {error_summary(exc)}") from exc
        for dataset in (Dataset.QUARANTINE, Dataset.CLEAN):
            attempts[dataset] = {landing.day: lake.new_attempt(dataset, landing.day) for landing in days}
        files = {
            Dataset.QUARANTINE: write_partitions(lake, quarantine_rows(resolved), attempts[Dataset.QUARANTINE],
                                                 QUARANTINE_ORDER, QUARANTINE_SCHEMA),
            Dataset.CLEAN: write_partitions(lake, clean_rows(resolved), attempts[Dataset.CLEAN], CLEAN_ORDER,
                                            CLEAN_SCHEMA),
        }
    except Exception:
        lake.discard(a for by_day in attempts.values() for a in by_day.values())
        raise
    finally:
        resolved.unpersist()
    seconds = round(time.time() - started, 3)
    provenance = {d.day: lineage(STEP, [d.source]) for d in days}
    # quarantine first: a published clean day implies its quarantine
    return publish_days(lake, STEP, [d.day for d in days], (Dataset.QUARANTINE, Dataset.CLEAN), attempts, files,
                        stats, {ds: provenance for ds in attempts}, seconds)


def clean_days(spark: SparkSession, lake: Lake, days: Sequence[date]) -> int:
    """Clean ``days`` (in date order) with as few Spark jobs as possible; 0, or 1 naming the days not done.

    Transactions first: every day is inspected on the driver; the days before the first bad one
    (no ``_SUCCESS``, an unreadable file, a missing column) are cleaned in batches of
    ``FRAUD_RANGE_BATCH_DAYS`` and published in date order, each batch's transactions and then the
    label events of its published days (``jobs.spark.labels``: they are checked against the clean
    transactions, these days' included) before the next batch: memory does not grow with the range.
    The run fails naming the first day not done and every later one: published days are always a
    prefix of the range, so it can be rerun from the day named. If a batch fails inside Spark (a file
    whose damage only shows when read), the same days are cleaned one by one to find the bad one.
    """
    ready: list[LandingDay] = []
    failure: tuple[date, Exception] | None = None
    for day in days:
        try:
            ready.append(inspect_landing(lake, day, TRANSACTIONS))
        except CleanError as exc:
            failure = (day, exc)
            break
    cfg = settings()
    with progress(STEP, total=len(days)) as advance:  # on a terminal: the days published of the range
        for batch in batches(ready, cfg.range_batch_days):  # transactions, then their label events, a batch at a time
            advance.doing(days_label(batch))
            count, error = _batch_or_each(spark, lake, batch, clean_batch)
            done = [d.day for d in batch[:count]]
            if error is not None:
                failure = (batch[count].day, error)
            if done:
                count, error = labels.clean_label_days(spark, lake, done, feed=cfg.label_feed)
                if error is not None:
                    failure = (done[count], error)
                    done = done[:count]
            advance(len(done))
            if failure is not None and failure[0] <= batch[-1].day:
                break
    if failure is None:
        return EXIT_OK
    day, exc = failure
    return not_done(STEP, [d for d in days if d >= day], exc, failed_on=day, lake=lake)


def _batch_or_each(spark: SparkSession, lake: Lake, days: list, batch) -> tuple[int, Exception | None]:
    """``batch(spark, lake, days)``; if the whole batch fails in Spark, day by day to find the bad one."""
    try:
        return batch(spark, lake, days)
    except Exception as exc:  # noqa: BLE001 - reported, or narrowed down day by day
        if len(days) == 1:
            return 0, exc
        print(
            f"clean: cleaning {days_label(days)} together failed ({error_summary(exc)}); cleaning day by day",
            file=sys.stderr,
        )
    for i, landing in enumerate(days):
        try:
            done, error = batch(spark, lake, [landing])
        except Exception as exc:  # noqa: BLE001 - reported with the days not done
            done, error = 0, exc
        if error is not None:
            return i + done, error
    return len(days), None


def main(argv: Sequence[str] | None = None) -> int:
    parser = day_parser("spark-submit jobs/spark/clean.py",
                        "Clean landing transactions and label events into the clean and quarantine partitions.")
    args = parse_days(parser, argv)
    lake = Lake.from_uri(args.lake)
    spark = get_spark("fraud-clean")
    return clean_days(spark, lake, args.days)


if __name__ == "__main__":
    sys.exit(main())
