"""Labels as events: the label feed's cleaning, point-in-time lookups, and what inline labels mean.

The clean step's label half (``jobs.spark.labels``) on hand-written label files; the as-of rule
(``jobs.torch.data.LabelEvents``); the terminal windows' label-as-of-t kernel; and, end to end on
generated data, that inline labels and the same labels delivered as feed events give the same
results, and that an event delivered late reaches only what is computed after it arrived.
"""

from __future__ import annotations

import io
import posixpath
import shutil
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline import FIRST, LAST, SMALL, assert_same, build, by_training_key, generate, rows, run_step

from jobs.common.calendar import MICROS_PER_DAY, Calendar, day_range
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import LABEL_EVENT_SCHEMA, LABEL_QUARANTINE_SCHEMA, RAW_SCHEMA, LabelQuarantineReason
from jobs.spark import clean, labels, windows
from jobs.spark.landing import inspect_landing
from jobs.torch.data import LabelEvents

D1, D2 = date(2018, 4, 1), date(2018, 4, 2)


def tx(tx_id: int, when: str, terminal: int = 2) -> dict:
    return {"TRANSACTION_ID": tx_id, "TX_DATETIME": datetime.fromisoformat(when), "CUSTOMER_ID": 1,
            "TERMINAL_ID": terminal, "TX_AMOUNT": 10.0, "TX_FRAUD": 0, "TX_FRAUD_SCENARIO": 0}


def land_transactions(lake: Lake, day: date, rows: list[dict]) -> None:
    lake.write_landing(day, pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    lake.mark_landing_done(day)


def land_labels(lake: Lake, day: date, csv: str | None) -> None:
    """A label day as the feed delivers it: a CSV file (or none: a day without events), then _SUCCESS."""
    if csv is not None:
        path = posixpath.join(lake.partition_path(Dataset.LANDING_LABELS, day), "events.csv")
        lake.write_bytes(path, ("\n".join(line.strip() for line in csv.strip().splitlines()) + "\n").encode())
    lake.mark_landing_done(day, Dataset.LANDING_LABELS)


EVENTS = """
    TRANSACTION_ID,TX_FRAUD,REPORTED_AT
    1,1,2018-04-02 10:00:00
    1,1,2018-04-02 10:00:00
    1,0,2018-04-02T12:00:00
    999,1,2018-04-02 10:00:00
    1,1,2018-04-03 00:00:00
    1,2,2018-04-02 10:00:00
    1,x,2018-04-02 10:00:00
    1,1,yesterday
    ,1,2018-04-02 10:00:00
    20,1,2018-04-02 09:00:00
    20,1,2018-04-02 16:00:00
"""


@pytest.fixture
def feed_on(monkeypatch):
    monkeypatch.setenv("FRAUD_LABEL_FEED", "on")
    monkeypatch.setenv("FRAUD_FIRST_DATE", D1.isoformat())


def two_days(lake: Lake) -> None:
    land_transactions(lake, D1, [tx(1, "2018-04-01 08:00:00"), tx(2, "2018-04-01 09:00:00")])
    land_transactions(lake, D2, [tx(20, "2018-04-02 15:00:00", terminal=3)])
    land_labels(lake, D1, None)
    land_labels(lake, D2, EVENTS)


@pytest.mark.spark
def test_every_label_event_is_clean_collapsed_or_quarantined_with_its_reason(spark, lake, feed_on):
    two_days(lake)
    assert clean.clean_days(spark, lake, [D1, D2]) == 0
    stats = lake.manifest(Dataset.CLEAN_LABELS, D2)["stats"]
    assert stats["events_in"] == 11 == stats["clean"] + stats["quarantined_total"] + stats["duplicates_collapsed"]
    assert (stats["clean"], stats["duplicates_collapsed"], stats["quarantined_total"]) == (3, 1, 7)
    quarantined = lake.read_table(Dataset.QUARANTINE_LABELS, D2, schema=LABEL_QUARANTINE_SCHEMA).to_pylist()
    by_reason = {(q["TRANSACTION_ID"], q["TX_FRAUD"], q["REPORTED_AT"]): q["reason"] for q in quarantined}
    assert by_reason == {
        ("999", "1", "2018-04-02 10:00:00"): LabelQuarantineReason.UNKNOWN_TRANSACTION,
        ("1", "1", "2018-04-03 00:00:00"): LabelQuarantineReason.OUTSIDE_DAY,
        ("1", "2", "2018-04-02 10:00:00"): LabelQuarantineReason.BAD_LABEL,
        ("1", "x", "2018-04-02 10:00:00"): LabelQuarantineReason.BAD_NUMBER,
        ("1", "1", "yesterday"): LabelQuarantineReason.BAD_TIMESTAMP,
        (None, "1", "2018-04-02 10:00:00"): LabelQuarantineReason.NULL_REQUIRED,
        ("20", "1", "2018-04-02 09:00:00"): LabelQuarantineReason.BEFORE_TRANSACTION,
    }
    assert all(q["source_file"].endswith("/events.csv") for q in quarantined)
    events = lake.read_table(Dataset.CLEAN_LABELS, D2, schema=LABEL_EVENT_SCHEMA).to_pylist()
    assert [(e["TRANSACTION_ID"], e["TX_FRAUD"], e["REPORTED_AT"].hour, e["TERMINAL_ID"]) for e in events] == [
        (1, 1, 10, 2), (1, 0, 12, 2), (20, 1, 16, 3)]  # ordered by report time; the transaction carried along
    assert lake.manifest(Dataset.CLEAN_LABELS, D1)["rows"] == 0  # no events that day: published, empty
    # lineage: the clean events name the transaction days they reference; rejections every day searched
    clean_inputs = {(i["dataset"], i["date"]) for i in lake.manifest(Dataset.CLEAN_LABELS, D2)["lineage"]["inputs"]}
    assert clean_inputs == {(Dataset.LANDING_LABELS, "2018-04-02"), (Dataset.CLEAN, "2018-04-01"),
                            (Dataset.CLEAN, "2018-04-02")}


@pytest.mark.spark
def test_the_look_back_bounds_the_transactions_an_event_may_name(spark, lake, feed_on, monkeypatch):
    monkeypatch.setenv("FRAUD_LABEL_LOOKBACK_DAYS", "0")
    two_days(lake)
    assert clean.clean_days(spark, lake, [D1, D2]) == 0
    quarantined = lake.read_table(Dataset.QUARANTINE_LABELS, D2, schema=LABEL_QUARANTINE_SCHEMA).to_pylist()
    not_found = {q["TRANSACTION_ID"] for q in quarantined if q["reason"] == LabelQuarantineReason.UNKNOWN_TRANSACTION}
    assert not_found == {"1", "999"}  # transaction 1 is from the day before: outside a 0-day look-back


@pytest.mark.spark
def test_a_range_run_cleans_label_events_as_day_by_day_runs(spark, lake, feed_on, tmp_path):
    two_days(lake)
    other = Lake.from_uri((tmp_path / "other").as_uri())
    shutil.copytree(lake.path(""), tmp_path / "other")
    assert clean.clean_days(spark, lake, [D1, D2]) == 0
    for day in (D1, D2):
        assert clean.clean_days(spark, other, [day]) == 0
    assert [lake.digest(Dataset.CLEAN_LABELS, d) for d in (D1, D2)] == [
        other.digest(Dataset.CLEAN_LABELS, d) for d in (D1, D2)]
    # the rejects name the file they came from, which is in another lake here: compare the rest
    mine, theirs = (lk.read_table(Dataset.QUARANTINE_LABELS, D2).drop_columns(["source_file"]) for lk in (lake, other))
    assert mine.equals(theirs)


@pytest.mark.spark
def test_a_missing_label_day_is_waited_for_and_the_feed_can_be_off(spark, lake, feed_on, monkeypatch, capsys):
    land_transactions(lake, D1, [tx(1, "2018-04-01 08:00:00")])
    assert clean.clean_days(spark, lake, [D1]) == 1  # transactions published, labels not
    assert lake.is_published(Dataset.CLEAN, D1) and not lake.is_published(Dataset.CLEAN_LABELS, D1)
    assert "landing day 2018-04-01 is not complete" in capsys.readouterr().err
    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")
    assert clean.clean_days(spark, lake, [D1]) == 0
    manifest = lake.manifest(Dataset.CLEAN_LABELS, D1)
    assert manifest["rows"] == 0 and manifest["stats"]["label_feed"] == "off"


@pytest.mark.spark
def test_a_day_without_events_is_published_without_spark_as_spark_publishes_it(spark, lake, feed_on, tmp_path):
    """A feed day whose files hold no row (none at all, a 0-byte CSV, a Parquet file of 0 rows) is
    published with no Spark job, with the rows, statistics and lineage the Spark path gives it."""
    empty_days = [D1, D2, date(2018, 4, 3)]
    for day in empty_days:
        land_transactions(lake, day, [tx(int(day.day), f"{day} 08:00:00")])
    land_labels(lake, D1, None)
    lake.write_bytes(posixpath.join(lake.partition_path(Dataset.LANDING_LABELS, D2), "events.csv"), b"")
    lake.mark_landing_done(D2, Dataset.LANDING_LABELS)
    landing = lake.partition_path(Dataset.LANDING_LABELS, empty_days[2])
    no_rows = io.BytesIO()
    pq.write_table(LABEL_EVENT_SCHEMA.empty_table().select(["TRANSACTION_ID", "TX_FRAUD", "REPORTED_AT"]), no_rows)
    lake.write_bytes(posixpath.join(landing, "events.parquet"), no_rows.getvalue())
    lake.mark_landing_done(empty_days[2], Dataset.LANDING_LABELS)
    other = Lake.from_uri((tmp_path / "other").as_uri())
    shutil.copytree(lake.path(""), tmp_path / "other")

    for lk in (lake, other):  # the transactions, on Spark
        assert clean.clean_batch(spark, lk, [inspect_landing(lk, d, clean.TRANSACTIONS) for d in empty_days]) == (3, None)
    assert labels.clean_label_days(None, lake, empty_days) == (3, None)  # no Spark session: none is used
    inspected = [inspect_landing(other, d, labels.LABELS) for d in empty_days]
    assert all(day.known_empty for day in inspected)
    assert labels.label_batch(spark, other, inspected) == (3, None)  # the Spark path, as the reference
    for day in empty_days:
        for dataset in (Dataset.CLEAN_LABELS, Dataset.QUARANTINE_LABELS):
            mine, spark_made = lake.manifest(dataset, day), other.manifest(dataset, day)
            assert mine["rows"] == spark_made["rows"] == 0
            assert mine["stats"] == spark_made["stats"]
            assert mine["lineage"]["inputs"] == spark_made["lineage"]["inputs"]
            assert mine["lineage"]["parameters"] == spark_made["lineage"]["parameters"]
            assert lake.read_table(dataset, day).schema == other.read_table(dataset, day).schema


def test_the_latest_event_reported_at_or_before_t_wins_and_a_fraud_wins_a_tie():
    hour = 3_600_000_000
    events = LabelEvents(np.array([7, 7, 7, 8, 8]), np.array([1, 5, 9, 4, 4]) * hour, np.array([1, 0, 1, 0, 1]))
    ask = np.array([7, 7, 7, 7, 7, 8, 8, 9])
    at = np.array([0, 1, 4, 5, 100, 3, 4, 100]) * hour
    assert events.as_of(ask, at).tolist() == [0, 1, 1, 0, 1, 0, 1, 0]


@pytest.mark.parametrize("one_each", [False, True], ids=["several", "one-each"])  # one each: one search a query
@pytest.mark.parametrize("in_id_order", [False, True], ids=["no-order", "by-id"])  # by id: the index skips its sort
@pytest.mark.parametrize("queries", [40, 20_000], ids=["few", "many"])  # many: the queries are sorted first
def test_label_lookups_agree_with_reading_every_event_in_turn(queries, in_id_order, one_each):
    rng = np.random.default_rng(5)
    n = 3_000  # ids with one event and ids with many, some at one instant, in no order
    ids = rng.permutation(1_500) if one_each else rng.integers(0, 1_500, n)
    n = len(ids)
    events = LabelEvents(ids * 11, rng.integers(0, 50, n) * 1_000, rng.integers(0, 2, n).astype(np.int8))
    if in_id_order:  # ascending ids, an id's events still in no order of time or label
        by = np.argsort(events.txid, kind="stable")
        events = LabelEvents(events.txid[by], events.reported_us[by], events.label[by])
    ask, at = rng.integers(-10, 1_600, queries) * 11, rng.integers(-5, 55, queries) * 1_000
    by_id: dict[int, list[tuple[int, int]]] = {}
    for tx, when, label in zip(events.txid.tolist(), events.reported_us.tolist(), events.label.tolist(), strict=True):
        by_id.setdefault(tx, []).append((when, label))
    expected = [max([e for e in by_id.get(tx, []) if e[0] <= t], default=(0, 0))[1]
                for tx, t in zip(ask.tolist(), at.tolist(), strict=True)]
    assert events.as_of(ask, at).tolist() == expected
    assert 0 < sum(expected) < queries
    label, final = events.as_of_and_final(ask, at)  # final: no event of the id reported after the query's time
    assert label.tolist() == expected
    assert final.tolist() == [all(e[0] <= t for e in by_id.get(tx, [])) for tx, t in zip(ask.tolist(), at.tolist(), strict=True)]
    assert 0 < final.sum() < queries
    assert events._one_each == one_each


def test_terminal_risk_counts_a_label_only_once_reported():
    day = MICROS_PER_DAY
    terminal = np.array([1, 1, 1])
    times = np.array([0, 20 * day, 30 * day])  # a fraud at 0, scored rows at day 20 and 30
    late = windows.LabelChanges(np.array([1]), np.array([0]), np.array([25 * day]), np.array([1]))
    risk = windows.terminal_windows(terminal, times, late, (30,), 7)[30][1]
    assert risk.tolist() == [0.0, 0.0, 0.5]  # day 20: not reported yet; day 30: known (1 of 2 in the window)
    inline = windows.inline_changes(terminal, times, np.array([1, 0, 0]), 7)
    assert windows.terminal_windows(terminal, times, inline, (30,), 7)[30][1].tolist() == [0.0, 1.0, 0.5]


# --- end to end on generated data ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_world():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SMALL.items():
            mp.setenv(name, value)
        yield


def _pipeline(root: Path, labels: str, last: date = LAST) -> Lake:
    generate(root.as_uri(), last, "--labels", labels)
    return build(root.as_uri(), last, report=False)


def _data_only(root: Path, last: date) -> Lake:
    generate(root.as_uri(), last)
    run_step("clean", root.as_uri(), FIRST, last)
    run_step("features", root.as_uri(), FIRST, last)
    return Lake.from_uri(root.as_uri())


@pytest.mark.slow
def test_inline_labels_and_the_same_labels_as_feed_events_give_the_same_results(small_inline_lake, small_world,
                                                                                 tmp_path):
    from jobs.torch.registry import Registry

    inline, feed = Lake.from_uri(small_inline_lake.as_uri()), _pipeline(tmp_path / "feed", "feed")
    landed = pa.concat_tables(pq.read_table(f.path, filesystem=feed.fs) for f in feed.landing_files(FIRST))
    assert landed.column("TX_FRAUD").null_count == landed.num_rows  # no label inline there
    assert sum(feed.manifest(Dataset.CLEAN_LABELS, d)["rows"] for d in day_range(FIRST, LAST)) > 0
    for day in day_range(FIRST, LAST):
        assert inline.digest(Dataset.FEATURES, day) == feed.digest(Dataset.FEATURES, day), day
        for dataset in (Dataset.SCORES, Dataset.ALERTS):
            assert_same(by_training_key(inline, rows(inline, dataset, day)), by_training_key(feed, rows(feed, dataset, day)),
                        f"{dataset} {day}", tolerance=1e-6)
    decisions = [[(d["train_day"], d["outcome"], d["reason"]) for d in Registry(lake).decisions()]
                 for lake in (inline, feed)]
    assert decisions[0] == decisions[1] and decisions[0]


@pytest.mark.slow
def test_a_label_event_delivered_late_reaches_only_what_is_computed_after_it(small_world, tmp_path):
    from jobs.torch.data import attach_targets, read_features

    last = date(2018, 4, 26)
    lake = _data_only(tmp_path / "lake", last)
    day, arrives = date(2018, 4, 4), date(2018, 4, 24)  # a day-D transaction reported as fraud on D+20
    before = {d: lake.digest(Dataset.FEATURES, d) for d in day_range(FIRST, last)}
    clean_d = lake.read_table(Dataset.CLEAN, day).to_pylist()
    later_terminals = {r["TERMINAL_ID"] for d in day_range(arrives, last) for r in lake.read_table(Dataset.CLEAN, d).to_pylist()}
    victim = next(r for r in clean_d if r["TX_FRAUD"] == 0 and r["TERMINAL_ID"] in later_terminals)
    events = pa.table({"TRANSACTION_ID": [victim["TRANSACTION_ID"]], "TX_FRAUD": pa.array([1], pa.int32()),
                       "REPORTED_AT": pa.array([datetime(2018, 4, 24, 9, 30)], pa.timestamp("us"))})
    lake.unmark_landing_done(arrives, Dataset.LANDING_LABELS)
    lake.write_landing(arrives, events, dataset=Dataset.LANDING_LABELS)
    lake.mark_landing_done(arrives, Dataset.LANDING_LABELS)
    run_step("clean", lake.uri, arrives)
    assert lake.manifest(Dataset.CLEAN_LABELS, arrives)["rows"] == 1
    run_step("features", lake.uri, day, last)  # D and every later day recomputed with the event in the lake
    changed = {d for d in day_range(FIRST, last) if lake.digest(Dataset.FEATURES, d) != before[d]}
    assert changed and min(changed) >= arrives  # nothing before the day it arrived moved
    after = lake.read_days(Dataset.FEATURES, day_range(arrives, last)).to_pylist()
    assert any(r["TERMINAL_ID"] == victim["TERMINAL_ID"] for r in after)
    # as training targets: unknown before D+20 began, known after
    cal = Calendar(FIRST)
    frame = read_features(lake, [day])
    events_known = LabelEvents.read(lake, [day], day_range(day, last), cal.label_delay_days)
    row = int(np.flatnonzero(frame.txid == victim["TRANSACTION_ID"])[0])
    assert attach_targets(frame, events_known, arrives).label[row] == 0
    assert attach_targets(frame, events_known, arrives + timedelta(days=1)).label[row] == 1
