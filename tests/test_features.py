"""Exactness of the features job (docs/contract.md, "Features") on small hand-built clean partitions.

Every boundary case lives on its own customer or terminal, all on one lake, computed by one
range run and by day-by-day runs. T is Monday 2018-05-14 12:00:00; the query transaction of
each case is at T and the expected values are written next to the rows that make them.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common.calendar import Calendar
from jobs.common.cli import EXIT_WAITING
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import (
    CLEAN_SCHEMA,
    FEATURE_SCHEMA,
    LABEL_EVENT_SCHEMA,
    WINDOWS_DAYS,
    customer_avg_amount,
    customer_count,
    terminal_count,
    terminal_risk,
)
from jobs.spark import features, windows

pytestmark = pytest.mark.spark

US = timedelta(microseconds=1)
DAY = timedelta(days=1)
T = datetime(2018, 5, 14, 12, 0, 0)
FIRST_DATE = date(2018, 4, 7)  # days before it (2018-04-04 .. 04-06 for D = 05-11) are absent
TARGET_DAYS = [date(2018, 5, 11), date(2018, 5, 12), date(2018, 5, 13), date(2018, 5, 14)]
OTHER = 999  # a customer / terminal id that takes part in no assertion


def clean_table(rows: list[tuple]) -> pa.Table:
    """Rows ``(id, datetime, customer, terminal, amount, fraud)`` as a clean partition."""
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in range(6)]
    return pa.table(
        {
            "TRANSACTION_ID": pa.array(columns[0], pa.int64()),
            "TX_DATETIME": pa.array(columns[1], pa.timestamp("us")),
            "CUSTOMER_ID": pa.array(columns[2], pa.int64()),
            "TERMINAL_ID": pa.array(columns[3], pa.int64()),
            "TX_AMOUNT": pa.array(columns[4], pa.float64()),
            "TX_FRAUD": pa.array(columns[5], pa.int32()),
            "TX_FRAUD_SCENARIO": pa.nulls(len(rows), pa.int32()),
        },
        schema=CLEAN_SCHEMA,
    )


def publish_clean(lake: Lake, rows: list[tuple], days: list[date], seed: int = 0) -> None:
    """Publish each day of ``days`` (an empty partition when it has no rows), rows shuffled."""
    rng = np.random.default_rng(seed)
    for day in days:
        todays = [r for r in rows if r[1].date() == day]
        todays = [todays[i] for i in rng.permutation(len(todays))]
        lake.write_table(Dataset.CLEAN, day, clean_table(todays))
        lake.write_table(Dataset.CLEAN_LABELS, day, LABEL_EVENT_SCHEMA.empty_table())  # inline labels only


def days_between(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def read_features(lake: Lake, days: list[date]) -> pd.DataFrame:
    table = lake.read_days(Dataset.FEATURES, days, schema=FEATURE_SCHEMA)
    return table.to_pandas().set_index("TRANSACTION_ID", drop=False)


def _read_file(lake: Lake, path: str) -> pa.Table:
    """One Parquet file as written (no columns made up from its folder names)."""
    return pq.read_table(path, filesystem=lake.fs, partitioning=None)


def run_cli(lake: Lake, *args: str) -> int:
    return features.main(["--lake", lake.uri, "--first-date", FIRST_DATE.isoformat(), *args])


# --- the scenario ----------------------------------------------------------------------------------

# customers
C1, C7, C30, C_PEERS, C_FLAGS = 1, 7, 30, 40, 50
# terminals
T_DELAY, T_EMPTY = 100, 200

ROWS = [
    # customer windows (t - w(n), t]: exactly w(n) before T is out, one microsecond later is in
    (101, T - 1 * DAY, C1, OTHER, 10.0, 0),
    (102, T - 1 * DAY + US, C1, OTHER, 20.0, 0),
    (103, T, C1, T_EMPTY, 30.0, 0),  # 1 day: {20, 30}; 7 and 30 days: {10, 20, 30}
    (701, T - 7 * DAY, C7, OTHER, 100.0, 0),
    (702, T - 7 * DAY + US, C7, OTHER, 50.0, 0),
    (703, T, C7, OTHER, 10.0, 0),  # 1 day: {10}; 7 days: {50, 10}; 30 days: {100, 50, 10}
    (3001, T - 30 * DAY, C30, OTHER, 1000.0, 0),
    (3002, T - 30 * DAY + US, C30, OTHER, 7.0, 0),
    (3003, T, C30, OTHER, 3.0, 0),  # 1 and 7 days: {3}; 30 days: {7, 3}
    # three transactions in the same second: each one sees all three
    (4001, datetime(2018, 5, 14, 9, 30, 15), C_PEERS, OTHER, 1.0, 0),
    (4002, datetime(2018, 5, 14, 9, 30, 15), C_PEERS, OTHER, 2.0, 0),
    (4003, datetime(2018, 5, 14, 9, 30, 15), C_PEERS, OTHER, 6.0, 0),
    # terminal windows (t - w(n+7), t - w(7)]: labels of the last 7 days are not used yet
    (5001, T - 7 * DAY, OTHER, T_DELAY, 1.0, 1),  # near end, included in n = 1, 7, 30
    (5002, T - 7 * DAY + US, OTHER, T_DELAY, 1.0, 1),  # too recent: in no window
    (5003, T - 8 * DAY + US, OTHER, T_DELAY, 1.0, 0),  # in n = 1, 7, 30
    (5004, T - 8 * DAY, OTHER, T_DELAY, 1.0, 1),  # far end of n = 1 (out); in n = 7, 30
    (5005, T - 14 * DAY, OTHER, T_DELAY, 1.0, 0),  # far end of n = 7 (out); in n = 30
    (5006, T - 37 * DAY + US, OTHER, T_DELAY, 1.0, None),  # in n = 30, null label counts as 0
    (5007, T - 37 * DAY, OTHER, T_DELAY, 1.0, 1),  # far end of n = 30 (out)
    (5008, T, OTHER, T_DELAY, 1.0, None),  # the query; its own label stays null in the output
    # calendar flags
    (6001, datetime(2018, 5, 11, 23, 59, 59, 999999), C_FLAGS, OTHER, 1.0, 0),  # Friday
    (6002, datetime(2018, 5, 12, 0, 0, 0), C_FLAGS, OTHER, 1.0, 0),  # Saturday
    (6003, datetime(2018, 5, 13, 23, 59, 59), C_FLAGS, OTHER, 1.0, 0),  # Sunday
    (6004, datetime(2018, 5, 14, 0, 0, 0), C_FLAGS, OTHER, 1.0, 0),  # Monday, night
    (6005, datetime(2018, 5, 14, 6, 59, 59), C_FLAGS, OTHER, 1.0, 0),  # night
    (6006, datetime(2018, 5, 14, 7, 0, 0), C_FLAGS, OTHER, 1.0, 0),  # day
]


@pytest.fixture(scope="module")
def scenario(spark, tmp_path_factory):
    """One lake, computed as a range run and as day-by-day runs: (lake, range rows, daily rows)."""
    lake = Lake.from_uri((tmp_path_factory.mktemp("features") / "lake").as_uri())
    publish_clean(lake, ROWS, days_between(FIRST_DATE, TARGET_DAYS[-1]))
    assert run_cli(lake, "--start", "2018-05-11", "--end", "2018-05-14") == 0
    by_range = read_features(lake, TARGET_DAYS)
    range_files = {d: lake.partition_files(Dataset.FEATURES, d) for d in TARGET_DAYS}
    range_tables = {d: [_read_file(lake, p) for p in range_files[d]] for d in TARGET_DAYS}
    for day in TARGET_DAYS:
        assert run_cli(lake, "--date", day.isoformat()) == 0
    by_day = read_features(lake, TARGET_DAYS)
    return lake, by_range, by_day, range_tables


def feature_values(frame: pd.DataFrame, tx: int, name: str, n: int) -> tuple:
    row = frame.loc[tx]
    if name == "customer":
        return row[customer_count(n)], row[customer_avg_amount(n)]
    return row[terminal_count(n)], row[terminal_risk(n)]


@pytest.mark.parametrize(
    "tx, n, expected",
    [
        (103, 1, (2, 25.0)),
        (103, 7, (3, 20.0)),
        (103, 30, (3, 20.0)),
        (703, 1, (1, 10.0)),
        (703, 7, (2, 30.0)),
        (703, 30, (3, 160.0 / 3)),
        (3003, 1, (1, 3.0)),
        (3003, 7, (1, 3.0)),
        (3003, 30, (2, 5.0)),
    ],
)
def test_customer_window_excludes_exactly_w_and_includes_one_microsecond_inside(scenario, tx, n, expected):
    _, out, _, _ = scenario
    count, mean = feature_values(out, tx, "customer", n)
    assert count == expected[0]
    assert mean == pytest.approx(expected[1], abs=1e-12)


def test_same_second_transactions_all_see_each_other(scenario):
    _, out, _, _ = scenario
    for tx in (4001, 4002, 4003):
        for n in WINDOWS_DAYS:
            assert feature_values(out, tx, "customer", n) == (3, 3.0)


@pytest.mark.parametrize("n, expected", [(1, (2, 1 / 2)), (7, (3, 2 / 3)), (30, (5, 2 / 5))])
def test_terminal_window_is_delayed_by_seven_days(scenario, n, expected):
    _, out, _, _ = scenario
    count, risk = feature_values(out, 5008, "terminal", n)
    assert count == expected[0]
    assert risk == pytest.approx(expected[1], abs=1e-12)
    assert "TX_FRAUD" not in out.columns  # a feature row holds no label


def test_empty_terminal_window_has_count_zero_and_risk_zero(scenario):
    _, out, _, _ = scenario
    for n in WINDOWS_DAYS:
        assert feature_values(out, 103, "terminal", n) == (0, 0.0)


@pytest.mark.parametrize(
    "tx, weekend, night",
    [(6001, 0, 0), (6002, 1, 1), (6003, 1, 0), (6004, 0, 1), (6005, 0, 1), (6006, 0, 0)],
)
def test_weekend_and_night_flags(scenario, tx, weekend, night):
    _, out, _, _ = scenario
    assert (out.loc[tx, "TX_DURING_WEEKEND"], out.loc[tx, "TX_DURING_NIGHT"]) == (weekend, night)


def test_output_schema_rows_order_and_files_per_day(scenario, spark):
    lake, out, _, range_tables = scenario
    for day in TARGET_DAYS:
        daily = [_read_file(lake, p) for p in lake.partition_files(Dataset.FEATURES, day)]
        # a few files a day (one per write task), the same files in the range run and the daily run
        assert 1 <= len(daily) <= features.write_tasks(spark)
        assert [t.to_pylist() for t in range_tables[day]] == [t.to_pylist() for t in daily]
        for written in daily:  # each file: exactly FEATURE_SCHEMA's types, sorted by time then id
            assert [(f.name, f.type) for f in written.schema] == [(f.name, f.type) for f in FEATURE_SCHEMA]
            frame = written.to_pandas()
            ordered = frame.sort_values(["TX_DATETIME", "TRANSACTION_ID"], kind="stable")
            assert frame["TRANSACTION_ID"].tolist() == ordered["TRANSACTION_ID"].tolist()
        table = lake.read_table(Dataset.FEATURES, day, schema=FEATURE_SCHEMA)
        assert table.schema == FEATURE_SCHEMA
        expected_ids = sorted(r[0] for r in ROWS if r[1].date() == day)
        assert sorted(table.column("TRANSACTION_ID").to_pylist()) == expected_ids
        assert lake.manifest(Dataset.FEATURES, day)["stats"] == {"rows": len(expected_ids)}


def test_range_run_equals_day_by_day_runs(scenario):
    _, by_range, by_day, _ = scenario
    pd.testing.assert_frame_equal(by_range.sort_index(), by_day.sort_index(), check_exact=True)


# --- inputs that are not there -----------------------------------------------------------------


def test_day_itself_not_published_waits_and_nothing_is_written(lake, capsys):
    publish_clean(lake, [], days_between(FIRST_DATE, date(2018, 4, 9)))
    assert run_cli(lake, "--date", "2018-04-10") == EXIT_WAITING
    err = capsys.readouterr().err
    assert "not published" in err and "2018-04-10" in err and "days not done: 2018-04-10" in err
    assert not lake.is_published(Dataset.FEATURES, date(2018, 4, 10))


def test_missing_history_after_first_date_waits_naming_the_days(lake, capsys):
    days = [
        d
        for d in days_between(FIRST_DATE, date(2018, 4, 20))
        if d not in (date(2018, 4, 9), date(2018, 4, 10))
    ]
    publish_clean(lake, [], days)
    assert run_cli(lake, "--start", "2018-04-19", "--end", "2018-04-20") == EXIT_WAITING
    err = capsys.readouterr().err
    assert "2018-04-09..2018-04-10" in err and "days not done: 2018-04-19..2018-04-20" in err
    assert not lake.is_published(Dataset.FEATURES, date(2018, 4, 19))


def test_script_runs_as_a_file_and_says_clearly_what_it_waits_for(lake):
    done = subprocess.run(
        [sys.executable, "jobs/spark/features.py", "--lake", lake.uri, "--date", "2018-04-10"],
        capture_output=True,
        text=True,
        cwd=features.__file__.rsplit("/jobs/", 1)[0],
        timeout=120,
    )
    assert done.returncode == EXIT_WAITING
    assert "clean partitions not published" in done.stderr and "2018-04-10" in done.stderr


def test_history_before_first_date_is_absent_not_missing(lake):
    # first date 2018-04-07: 2018-03-31 .. 04-06 are simply absent for D = 2018-04-07
    publish_clean(lake, [(1, datetime(2018, 4, 7, 8), 1, 1, 5.0, 0)], [FIRST_DATE])
    inputs = features.find_inputs(lake, [FIRST_DATE], Calendar(FIRST_DATE))
    assert len(inputs.files) == 1


# --- the kernels, without Spark -------------------------------------------------------------------


def test_kernel_does_not_depend_on_row_order_or_on_key_chunking(monkeypatch):
    rng = np.random.default_rng(3)
    n = 2_000
    keys = rng.integers(0, 30, n)
    times = rng.integers(0, 40, n) * 6 * 3_600_000_000  # six-hour grid: many ties and exact bounds
    amounts = rng.uniform(0, 100, n)
    frauds = rng.integers(0, 2, n)
    base_c = windows.customer_windows(keys, times, amounts, WINDOWS_DAYS)
    base_t = windows.terminal_windows(keys, times, windows.inline_changes(keys, times, frauds, 7), WINDOWS_DAYS, 7)
    perm = rng.permutation(n)
    monkeypatch.setattr(windows, "_INT64_HEADROOM", 3 * windows.window_us(80))  # a few keys per chunk
    shuffled_c = windows.customer_windows(keys[perm], times[perm], amounts[perm], WINDOWS_DAYS)
    shuffled_t = windows.terminal_windows(keys[perm], times[perm],
                                          windows.inline_changes(keys[perm], times[perm], frauds[perm], 7), WINDOWS_DAYS, 7)
    for w in WINDOWS_DAYS:
        for got, want in ((shuffled_c[w], base_c[w]), (shuffled_t[w], base_t[w])):
            np.testing.assert_array_equal(got[0], want[0][perm])
            np.testing.assert_array_equal(got[1], want[1][perm])  # bit for bit


def test_window_sums_stay_exact_after_a_huge_running_total():
    # A float cumsum would lose ~1e-2 here: the running total reaches 1e14 before the small values
    # (and the integer prefix wraps around int64, which cancels in the difference).
    amounts = np.array([1e9] * 100_000 + [0.1, 0.2, 0.3])
    sums = windows.FixedPointPrefix(amounts)
    got = sums.between(np.array([100_000, 0]), np.array([100_003, 2]))
    assert got.tolist() == [0.6, 2e9]  # 0.6 is the double nearest the exact sum


# --- randomized cross-check against brute force ---------------------------------------------------


def brute_force(frame: pd.DataFrame) -> pd.DataFrame:
    """O(n^2) reference: for each row, scan every row of the same key with a boolean mask."""
    t = frame["TX_DATETIME"].to_numpy().astype("datetime64[us]").astype(np.int64)
    cust = frame["CUSTOMER_ID"].to_numpy()
    term = frame["TERMINAL_ID"].to_numpy()
    amount = frame["TX_AMOUNT"].to_numpy()
    fraud = frame["TX_FRAUD"].fillna(0).to_numpy() == 1
    out: dict[str, list] = {}
    for i in range(len(frame)):
        for n in WINDOWS_DAYS:
            w, d = windows.window_us(n), windows.window_us(7)
            inside = (cust == cust[i]) & (t > t[i] - w) & (t <= t[i])
            out.setdefault(customer_count(n), []).append(inside.sum())
            out.setdefault(customer_avg_amount(n), []).append(amount[inside].mean())
            inside = (term == term[i]) & (t > t[i] - windows.window_us(n + 7)) & (t <= t[i] - d)
            out.setdefault(terminal_count(n), []).append(inside.sum())
            out.setdefault(terminal_risk(n), []).append(fraud[inside].mean() if inside.any() else 0.0)
    ts = frame["TX_DATETIME"]
    out["TX_DURING_WEEKEND"] = (ts.dt.dayofweek >= 5).astype(int).tolist()
    out["TX_DURING_NIGHT"] = (ts.dt.hour <= 6).astype(int).tolist()
    return pd.DataFrame(out, index=frame["TRANSACTION_ID"])


def test_randomized_against_brute_force(spark, lake):
    rng = np.random.default_rng(7)
    n = 400
    start = datetime(2018, 4, 7)
    on_grid = rng.random(n) < 0.6  # hour grid: same-second peers and rows exactly w(n) apart
    seconds = np.where(on_grid, rng.integers(0, 40 * 24, n) * 3600, rng.integers(0, 40 * 86400, n))
    micros = np.where(on_grid, 0, rng.integers(0, 1_000_000, n))
    labels = rng.choice([0, 1, -1], size=n, p=[0.6, 0.3, 0.1])
    rows = [
        (
            i,
            start + timedelta(seconds=int(s), microseconds=int(u)),
            int(rng.integers(0, 8)),
            int(rng.integers(0, 6)),
            round(float(rng.uniform(0, 300)), 2),
            None if lab == -1 else int(lab),
        )
        for i, (s, u, lab) in enumerate(zip(seconds, micros, labels, strict=True))
    ]
    days = days_between(start.date(), start.date() + timedelta(days=39))
    publish_clean(lake, rows, days)
    cal = Calendar(start.date())
    inputs = features.find_inputs(lake, days, cal)
    assert features.run(spark, lake, inputs, cal) == 0
    got = read_features(lake, days).sort_index()
    want = brute_force(clean_table(rows).to_pandas()).sort_index()
    assert got.index.tolist() == want.index.tolist()
    for column in want.columns:
        if got[column].dtype.kind == "i":
            np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy(), err_msg=column)
        else:
            np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-9, err_msg=column)
