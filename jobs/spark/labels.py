"""The label half of the clean step: label events of arrival day A to ``clean/labels``, rejects to
``quarantine/labels`` (docs/contract.md, "Labels as events").

``landing/labels/date=A/`` holds the events that arrived on A (chargebacks, claims, analysts'
dispositions): ``TRANSACTION_ID``, ``TX_FRAUD`` (1 reports a fraud, 0 clears an earlier report),
``REPORTED_AT`` (a time within A). Each event gets at most one reason, the first that applies:
ragged_line, null_required_field, unparseable_number, unparseable_timestamp, label_not_0_1,
reported_outside_day, transaction_not_found (no clean transaction with that id in the
``FRAUD_LABEL_LOOKBACK_DAYS`` days up to A), reported_before_transaction. Identical events
collapse into one; distinct events of one transaction all stay (readers take the latest reported
at or before the time they ask about; at the same instant a fraud report wins over a clearance).
A clean event carries its transaction's time, card and terminal, so readers need no join.

``events_in = clean + quarantined_total + duplicates_collapsed`` for every day. With the label
feed off (``FRAUD_LABEL_FEED=off``) every day gets empty label partitions: only the labels inline
in the transactions exist.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import date
from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from jobs.common.calendar import Calendar, calendar, format_days
from jobs.common.cli import error_summary
from jobs.common.lake import Attempt, Dataset, Lake, NotPublished
from jobs.common.provenance import InputRecorder, lineage
from jobs.common.schema import (
    KEY,
    LABEL,
    LABEL_EVENT_SCHEMA,
    LABEL_QUARANTINE_SCHEMA,
    RAW_LABEL_COLUMNS,
    RAW_LABEL_SCHEMA,
    REPORTED_AT,
    LabelQuarantineReason,
)
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
from jobs.spark.session import spark_schema

STEP = "clean"
LABELS = Source(Dataset.LANDING_LABELS, RAW_LABEL_COLUMNS, RAW_LABEL_COLUMNS)
RAW_LABEL_SPARK = spark_schema(RAW_LABEL_SCHEMA)
OUTCOME = "outcome"
CLEAN, QUARANTINED, COLLAPSED = "clean", "quarantined", "collapsed"
TX_DAY = "tx_day"  # the day of the transaction an event names
TRANSACTION = ("TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID")
EVENT_ORDER = (REPORTED_AT, KEY, LABEL)
QUARANTINE_ORDER = (SOURCE_FILE, *RAW_LABEL_COLUMNS, REASON)
DATASETS = (Dataset.QUARANTINE_LABELS, Dataset.CLEAN_LABELS)  # publish order: quarantine first


# --- transforms ---------------------------------------------------------------------------------
def type_events(raw: DataFrame) -> DataFrame:
    return raw.select(
        F.struct(*RAW_LABEL_COLUMNS).alias(RAW), F.col(SOURCE_FILE), F.col(RAGGED), F.col(DAY),
        *[typed(field).alias(field.name) for field in RAW_LABEL_SPARK],
    )


def classify(events: DataFrame, history: DataFrame, lookback_days: int) -> DataFrame:
    """``reason`` for each event (null when it breaks no rule), and the transaction it names."""
    label = F.col(LABEL)
    has_null = reduce(Column.__or__, [is_blank(name) for name in RAW_LABEL_COLUMNS])
    has_bad_number = is_unparsed(KEY) | is_unparsed(LABEL)
    has_bad_timestamp = is_unparsed(REPORTED_AT)
    has_bad_label = ~label.isin(0, 1)
    is_outside_day = F.to_date(F.col(REPORTED_AT)) != F.col(DAY)
    matched = events.join(history, KEY, "left")
    is_unknown = (F.col(TX_DAY).isNull() | (F.col(TX_DAY) > F.col(DAY))
                  | (F.col(TX_DAY) < F.date_sub(F.col(DAY), lookback_days)))
    is_before = F.col(REPORTED_AT) < F.col("TX_DATETIME")
    reason = (
        F.when(F.col(RAGGED), LabelQuarantineReason.RAGGED)
        .when(has_null, LabelQuarantineReason.NULL_REQUIRED)
        .when(has_bad_number, LabelQuarantineReason.BAD_NUMBER)
        .when(has_bad_timestamp, LabelQuarantineReason.BAD_TIMESTAMP)
        .when(has_bad_label, LabelQuarantineReason.BAD_LABEL)
        .when(is_outside_day, LabelQuarantineReason.OUTSIDE_DAY)
        .when(is_unknown, LabelQuarantineReason.UNKNOWN_TRANSACTION)
        .when(is_before, LabelQuarantineReason.BEFORE_TRANSACTION)
    )
    return matched.withColumn(REASON, reason)


def resolve(classified: DataFrame) -> DataFrame:
    """``outcome``: quarantined (a reason), collapsed (a copy of an identical earlier event) or clean."""
    same_event = Window.partitionBy(DAY, KEY, LABEL, REPORTED_AT).orderBy(SOURCE_FILE, F.col(RAW).cast("string"))
    copy = F.row_number().over(same_event) > 1
    valid = classified.filter(F.col(REASON).isNull()).withColumn(
        OUTCOME, F.when(copy, F.lit(COLLAPSED)).otherwise(F.lit(CLEAN)))
    rejected = classified.filter(F.col(REASON).isNotNull()).withColumn(OUTCOME, F.lit(QUARANTINED))
    return valid.unionByName(rejected)


def clean_events(resolved: DataFrame) -> DataFrame:
    return resolved.filter(F.col(OUTCOME) == CLEAN).select(
        *[F.col(f.name).cast(t.dataType) for f, t in zip(LABEL_EVENT_SCHEMA, spark_schema(LABEL_EVENT_SCHEMA),
                                                         strict=True)],
        F.col(DAY),
    )


def quarantined_events(resolved: DataFrame) -> DataFrame:
    return resolved.filter(F.col(OUTCOME) == QUARANTINED).select(
        *[F.col(f"{RAW}.{name}" if name in RAW_LABEL_COLUMNS else name).alias(name)
          for name in LABEL_QUARANTINE_SCHEMA.names],
        F.col(DAY),
    )


def day_stats(rows: Sequence[Row], files: int) -> dict:
    by_outcome = dict.fromkeys((CLEAN, QUARANTINED, COLLAPSED), 0)
    by_reason = dict.fromkeys(LabelQuarantineReason.ALL, 0)
    for row in rows:
        by_outcome[row[OUTCOME]] += row["count"]
        if row[OUTCOME] == QUARANTINED:
            by_reason[row[REASON]] += row["count"]
    return {
        "events_in": sum(by_outcome.values()),
        "clean": by_outcome[CLEAN],
        "quarantined": by_reason,
        "quarantined_total": by_outcome[QUARANTINED],
        "duplicates_collapsed": by_outcome[COLLAPSED],
        "files": files,
    }


# --- the transactions events are checked against ------------------------------------------------------
def history_days(days: Sequence[date], cal: Calendar) -> list[date]:
    """The clean days a batch's events may name: the look-back before the first day, through the last."""
    return sorted({d for day in days for d in (*cal.label_lookback(day), day)})


def read_history(spark: SparkSession, lake: Lake, days: Sequence[date], cal: Calendar) -> DataFrame:
    """(id, time, card, terminal, day) of the clean transactions of the look-back; one row per id
    (the latest day's, should an id repeat across days). A missing day on or after the first date is
    an error: events naming it would be rejected for the wrong reason."""
    files, missing = [], []
    for d in history_days(days, cal):
        try:
            files += [lake.to_spark_uri(p) for p in lake.partition_files(Dataset.CLEAN, d)]
        except NotPublished:
            if d >= cal.first_date:
                missing.append(d)
    if missing:
        raise CleanError(f"clean transactions not published for the label look-back: {format_days(missing)}")
    columns = [KEY, *TRANSACTION]
    schema = spark_schema(LABEL_EVENT_SCHEMA.empty_table().select(columns).schema)
    frame = spark.read.schema(schema).parquet(*files) if files else spark.createDataFrame([], schema)
    latest = F.max_by(F.struct(*TRANSACTION), "TX_DATETIME")
    return (frame.groupBy(KEY).agg(latest.alias("t"))
            .select(KEY, *[F.col(f"t.{c}").alias(c) for c in TRANSACTION])
            .withColumn(TX_DAY, F.to_date("TX_DATETIME")))


# --- the batch --------------------------------------------------------------------------------------
def label_batch(spark: SparkSession, lake: Lake, days: Sequence[LandingDay]) -> tuple[int, Exception | None]:
    """Clean inspected label days together and publish them in date order (as ``clean.clean_batch``)."""
    started = time.time()
    cal = calendar()
    raw = read_landing(spark, days, LABELS)
    events = type_events(raw)
    ids = events.select(KEY).where(F.col(KEY).isNotNull()).distinct()
    history = read_history(spark, lake, [d.day for d in days], cal).join(F.broadcast(ids), KEY, "left_semi")
    resolved = resolve(classify(events, history, cal.label_lookback_days)).persist(StorageLevel.MEMORY_AND_DISK)
    attempts: dict[str, dict[date, Attempt]] = {}
    try:
        try:
            counts = resolved.groupBy(DAY, OUTCOME, REASON).count().collect()
            named = resolved.filter(F.col(TX_DAY).isNotNull()).select(DAY, TX_DAY).distinct().collect()
        except Exception as exc:
            raise CleanError(f"cleaning label events of {days_label(days)} failed: {error_summary(exc)}") from exc
        by_day: dict[date, list[Row]] = {d.day: [] for d in days}
        for row in counts:
            by_day[row[DAY]].append(row)
        stats = {d.day: day_stats(by_day[d.day], len(d.files)) for d in days}
        for dataset in DATASETS:
            attempts[dataset] = {d.day: lake.new_attempt(dataset, d.day) for d in days}
        files = {
            Dataset.QUARANTINE_LABELS: write_partitions(lake, quarantined_events(resolved),
                                                        attempts[Dataset.QUARANTINE_LABELS], QUARANTINE_ORDER,
                                                        LABEL_QUARANTINE_SCHEMA),
            Dataset.CLEAN_LABELS: write_partitions(lake, clean_events(resolved), attempts[Dataset.CLEAN_LABELS],
                                                   EVENT_ORDER, LABEL_EVENT_SCHEMA),
        }
    except Exception:
        lake.discard(a for by_dataset in attempts.values() for a in by_dataset.values())
        raise
    finally:
        resolved.unpersist()
    recorder = InputRecorder(lake)
    parameters = {"label_lookback_days": cal.label_lookback_days}
    referenced: dict[date, set[date]] = {d.day: set() for d in days}
    for row in named:
        referenced[row[DAY]].add(row[TX_DAY])
    searched_in_vain = {d.day for d in days if stats[d.day]["quarantined"][LabelQuarantineReason.UNKNOWN_TRANSACTION]}

    def inputs(landing: LandingDay) -> list[dict]:
        # an event depends on the transaction it names; "not found" on every day it was looked for in
        looked = ([*recorder.step_inputs(STEP, landing.day, cal, datasets=[Dataset.CLEAN]),
                   recorder.record(Dataset.CLEAN, landing.day)] if landing.day in searched_in_vain else [])
        named_days = recorder.days(Dataset.CLEAN, referenced[landing.day])
        unique = {(i["dataset"], i["date"]): i for i in (*looked, *named_days)}
        return [landing.source, *(unique[k] for k in sorted(unique))]

    same = {d.day: lineage(STEP, inputs(d), parameters) for d in days}
    provenance = {Dataset.CLEAN_LABELS: same, Dataset.QUARANTINE_LABELS: same}
    return publish_days(lake, STEP, [d.day for d in days], DATASETS, attempts, files, stats, provenance,
                        round(time.time() - started, 3))


def _publish_no_events(lake: Lake, days: Sequence[date], stats: dict[date, dict], lineage_of: dict[date, dict],
                       seconds: float) -> tuple[int, Exception | None]:
    """Publish both label datasets of ``days`` empty, with the given statistics and lineage."""
    schemas = {Dataset.QUARANTINE_LABELS: LABEL_QUARANTINE_SCHEMA, Dataset.CLEAN_LABELS: LABEL_EVENT_SCHEMA}
    attempts = {ds: {d: lake.new_attempt(ds, d) for d in days} for ds in DATASETS}
    try:
        files = {ds: {d: [lake.write_parquet(attempts[ds][d], schemas[ds].empty_table())] for d in days}
                 for ds in DATASETS}
    except Exception:
        lake.discard(a for by_day in attempts.values() for a in by_day.values())
        raise
    provenance = {ds: lineage_of for ds in DATASETS}
    return publish_days(lake, STEP, list(days), DATASETS, attempts, files, stats, provenance, seconds)


def publish_empty(lake: Lake, days: Sequence[LandingDay]) -> tuple[int, Exception | None]:
    """Publish label days whose files hold no event (known from their footers) as :func:`label_batch`
    would (empty partitions, the same statistics and lineage), without a Spark job: most days of a
    feed bring nothing, and a nightly run or a backfill would otherwise pay a Spark job per day."""
    started = time.time()
    parameters = {"label_lookback_days": calendar().label_lookback_days}
    stats = {d.day: day_stats([], len(d.files)) for d in days}
    lineage_of = {d.day: lineage(STEP, [d.source], parameters) for d in days}
    return _publish_no_events(lake, [d.day for d in days], stats, lineage_of, round(time.time() - started, 3))


def publish_without_feed(lake: Lake, days: Sequence[date]) -> tuple[int, Exception | None]:
    """No label feed: every day's label partitions are published empty (its inline labels are the only ones)."""
    stats = {d: {**day_stats([], 0), "label_feed": "off"} for d in days}
    return _publish_no_events(lake, days, stats, {d: lineage(STEP, [], {"label_feed": "off"}) for d in days}, 0.0)


def clean_label_days(spark: SparkSession, lake: Lake, days: Sequence[date], feed: bool = True
                     ) -> tuple[int, Exception | None]:
    """Clean and publish the label events of ``days`` (whose transactions are published), in date
    order; return (days done, the error that stopped the rest or None)."""
    if not feed:
        return publish_without_feed(lake, days)
    from jobs.spark.clean import _batch_or_each

    ready: list[LandingDay] = []
    failure: Exception | None = None
    for day in days:
        try:
            ready.append(inspect_landing(lake, day, LABELS))
        except CleanError as exc:
            failure = exc
            break
    if ready and all(landing.known_empty for landing in ready):
        done, error = publish_empty(lake, ready)  # nothing to check or write: no Spark job at all
        if error is not None:
            return done, error
    elif ready:
        done, error = _batch_or_each(spark, lake, ready, label_batch)
        if error is not None:
            return done, error
    return len(ready), failure
