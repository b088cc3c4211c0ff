"""The built-in generator (docs/contract.md, "Raw transactions"): determinism, landing layout, formats, scenario rules, scale."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from jobs.common.lake import Dataset, Lake, day_range
from jobs.common.schema import RAW_COLUMNS, RAW_SCHEMA
from jobs.datagen import generate_to_lake, simulator
from jobs.datagen.__main__ import main
from jobs.datagen.simulator import (
    draw_compromises,
    draw_day,
    first_transaction_id,
    generate,
    iter_days,
    make_population,
    neighbour_lists,
)

START = date(2018, 4, 1)
SMALL = {"customers": 400, "terminals": 800, "seed": 7}
DAYS = 45  # longer than both scenario windows, so their ends are inside the range
# The contract's numbers (docs/contract.md), written out here rather than imported from the code under test
SCENARIO1_AMOUNT = 220.0
SCENARIO2_DAYS = 28
SCENARIO3_DAYS = 14
SCENARIO3_FACTOR = 5


@pytest.fixture(scope="module")
def small_population():
    return make_population(SMALL["customers"], SMALL["terminals"], SMALL["seed"])


@pytest.fixture(scope="module")
def small_days(small_population) -> list[tuple[date, pa.Table]]:
    return list(iter_days(small_population, START, DAYS, SMALL["seed"]))


def read_landing(lake: Lake, day: date) -> pa.Table:
    files = lake.landing_files(day)
    assert len(files) == 1, files
    return pq.read_table(files[0].path, filesystem=lake.fs, partitioning=None)


def landing_bytes(lake: Lake, days: list[date]) -> list[bytes]:
    return [lake.read_bytes(info.path) for day in days for info in lake.landing_files(day)]


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    lakes = {name: Lake.from_uri((tmp_path / name).as_uri()) for name in ("a", "b", "c")}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_to_lake(lakes[name], START, 5, customers=200, terminals=400, seed=seed)
    days = day_range(START, START + timedelta(days=4))
    a, b, c = (landing_bytes(lakes[n], days) for n in ("a", "b", "c"))
    assert len(a) == 5
    assert a == b
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_tables_have_exactly_the_raw_schema(small_days, lake):
    assert all(table.schema.equals(RAW_SCHEMA, check_metadata=True) for _, table in small_days)
    generate_to_lake(lake, START, 2, customers=100, terminals=200, seed=0)
    assert read_landing(lake, START).schema.equals(RAW_SCHEMA)


def test_days_times_order_and_ids(small_days):
    assert [day for day, _ in small_days] == day_range(START, START + timedelta(days=DAYS - 1))
    ids = []
    for day, table in small_days:
        assert table.num_rows > 0
        times = table["TX_DATETIME"].to_numpy().astype("datetime64[us]")
        midnight = np.datetime64(day.isoformat(), "us")
        assert (times >= midnight).all() and (times < midnight + np.timedelta64(1, "D")).all()
        assert (times.astype("datetime64[s]") == times).all()  # whole seconds
        day_ids = table["TRANSACTION_ID"].to_numpy()
        key = np.lexsort((day_ids, times))
        assert (key == np.arange(len(key))).all(), "rows not sorted by TX_DATETIME, TRANSACTION_ID"
        assert (table["TX_AMOUNT"].to_numpy() >= 0).all()
        ids.append(day_ids)
    ids = np.concatenate(ids)
    assert (np.diff(ids) > 0).all(), "ids must be unique and increase in time order over the range"
    # ids come from the date: day k's ids start at first_transaction_id(day k), whatever the range
    for (day, table) in small_days:
        first = table["TRANSACTION_ID"].to_numpy().min()
        assert first == first_transaction_id(day)


def test_success_marker_is_written_after_the_day_data(lake, monkeypatch):
    events: list[tuple[str, date, int]] = []
    write_landing, mark_done = lake.write_landing, lake.mark_landing_done

    def spy_write(day, table, fmt="parquet", name="part-00000", dataset=Dataset.LANDING):
        assert not lake.landing_ready(day, dataset)
        path = write_landing(day, table, fmt, name, dataset)
        if dataset == Dataset.LANDING:
            events.append(("data", day, table.num_rows))
        return path

    def spy_mark(day, dataset=Dataset.LANDING):
        if dataset == Dataset.LANDING:
            assert read_landing(lake, day).num_rows == events[-1][2]  # the data is complete already
            events.append(("done", day, 0))
        mark_done(day, dataset)

    monkeypatch.setattr(lake, "write_landing", spy_write)
    monkeypatch.setattr(lake, "mark_landing_done", spy_mark)
    summary = generate_to_lake(lake, START, 3, customers=100, terminals=200, seed=1)
    days = day_range(START, START + timedelta(days=2))
    assert [(kind, day) for kind, day, _ in events] == [(k, d) for d in days for k in ("data", "done")]
    assert all(lake.landing_ready(d) for d in days)
    assert summary["rows"] == sum(n for kind, _, n in events if kind == "data")


def test_csv_round_trips_with_header_and_iso_timestamps(lake):
    generate_to_lake(lake, START, 3, customers=150, terminals=300, seed=2, fmt="csv")
    expected = dict(generate(150, 300, START, 3, 2))
    for day in day_range(START, START + timedelta(days=2)):
        (info,) = lake.landing_files(day)
        assert info.base_name.endswith(".csv")
        text = lake.read_bytes(info.path).decode()
        header, first = text.splitlines()[:2]
        assert [c.strip('"') for c in header.split(",")] == list(RAW_COLUMNS)
        assert re.fullmatch(rf"{day.isoformat()}[ T]\d\d:\d\d:\d\d", first.split(",")[1].strip('"'))
        options = pacsv.ConvertOptions(column_types=RAW_SCHEMA, timestamp_parsers=["%Y-%m-%d %H:%M:%S"])
        table = pacsv.read_csv(info.path, convert_options=options)
        assert table.cast(RAW_SCHEMA).equals(expected[day])


def test_rerun_in_another_format_replaces_the_day(lake):
    generate_to_lake(lake, START, 1, customers=50, terminals=100, seed=0)
    generate_to_lake(lake, START, 1, customers=50, terminals=100, seed=0, fmt="csv")
    assert [i.base_name for i in lake.landing_files(START)] == ["part-00000.csv"]
    assert lake.landing_ready(START)


def test_scenario_rules_hold_on_the_output(small_population, small_days):
    pop, seed = small_population, SMALL["seed"]
    hits = {day: draw_compromises(pop, day, seed)[1] for day, _ in small_days}
    counts = {"1": 0, "2": 0, "3": 0}
    compromised_customer_rows: dict[tuple[date, int], list[int]] = {}
    for day, table in small_days:
        cols = {name: table[name].to_numpy() for name in RAW_COLUMNS if name != "TX_DATETIME"}
        scenario, amount = cols["TX_FRAUD_SCENARIO"], cols["TX_AMOUNT"]
        assert ((scenario > 0).astype(np.int32) == cols["TX_FRAUD"]).all()
        original = draw_day(pop, day, seed)
        assert (original.customer == cols["CUSTOMER_ID"]).all() and (
            original.terminal == cols["TERMINAL_ID"]
        ).all()

        recent = [day - timedelta(days=k) for k in range(SCENARIO2_DAYS) if day - timedelta(days=k) in hits]
        bad_terminals = np.concatenate([hits[d].terminals for d in recent])
        on_bad_terminal = np.isin(cols["TERMINAL_ID"], bad_terminals)
        s3 = scenario == 3
        over_220 = original.amount > SCENARIO1_AMOUNT
        assert over_220[scenario == 1].all() and (scenario[over_220 & ~on_bad_terminal & ~s3] == 1).all()
        assert on_bad_terminal[scenario == 2].all() and (scenario[on_bad_terminal & ~s3] == 2).all()
        assert not (over_220 | on_bad_terminal | s3)[scenario == 0].any()
        # scenario 3: amounts x5 on its rows, untouched elsewhere, and only on compromised customers
        assert np.allclose(amount[s3], np.round(original.amount[s3] * SCENARIO3_FACTOR, 2))
        assert (amount[~s3] == original.amount[~s3]).all()
        recent3 = [day - timedelta(days=k) for k in range(SCENARIO3_DAYS) if day - timedelta(days=k) in hits]
        for c in recent3:
            for customer in hits[c].customers:
                rows = cols["CUSTOMER_ID"] == customer
                compromised_customer_rows.setdefault((c, int(customer)), []).extend(
                    [int(rows.sum()), int((rows & s3).sum())]
                )
        assert np.isin(cols["CUSTOMER_ID"][s3], np.concatenate([hits[c].customers for c in recent3])).all()
        for s in counts:
            counts[s] += int((scenario == int(s)).sum())

    # one third (rounded down) of each compromised customer's window is fraud, when windows don't overlap
    def overlapped(c: date, customer: int) -> bool:
        return any(
            cu == customer and c2 != c and abs((c2 - c).days) < SCENARIO3_DAYS
            for c2, cu in compromised_customer_rows
        )

    singles = [
        (sum(v[0::2]), sum(v[1::2]))
        for (c, customer), v in compromised_customer_rows.items()
        if not overlapped(c, customer)
    ]
    assert len(singles) > 50
    assert all(frauds == n // 3 for n, frauds in singles)
    assert all(v > 0 for v in counts.values()), counts


def test_days_are_yielded_with_a_bounded_look_ahead(small_population, monkeypatch):
    drawn: list[date] = []

    def counting_draw_day(pop, day, seed):
        drawn.append(day)
        return draw_day(pop, day, seed)

    monkeypatch.setattr(simulator, "draw_day", counting_draw_day)
    days = iter_days(small_population, START, 100, seed=0)
    first, _ = next(days)
    assert first == START and len(drawn) == SCENARIO3_DAYS  # day 1 is final once day 14 is drawn
    next(days)
    assert len(drawn) == SCENARIO3_DAYS + 1


def test_neighbour_lists_match_brute_force():
    rng = np.random.default_rng(0)
    customers, terminals = rng.uniform(0, 100, (300, 2)), rng.uniform(0, 100, (900, 2))
    start, neighbours = neighbour_lists(customers, terminals, radius=5.0, chunk=64)
    distance = np.linalg.norm(customers[:, None, :] - terminals[None, :, :], axis=2)
    for i in range(len(customers)):
        assert neighbours[start[i] : start[i + 1]].tolist() == np.flatnonzero(distance[i] <= 5.0).tolist()


def test_cli_prints_a_summary_and_defaults_to_the_configured_lake(tmp_path, monkeypatch, capsys):
    root = tmp_path / "configured"
    monkeypatch.setenv("FRAUD_LAKE_URI", root.as_uri())
    assert main(["--start", "2018-05-01", "--days", "2", "--customers", "60", "--terminals", "120"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.match(r"datagen: 2 days .* \d+ rows, \d+ frauds .* s -> ", line), line
    lake = Lake.from_uri(root.as_uri())
    assert lake.landing_ready(date(2018, 5, 1)) and lake.landing_ready(date(2018, 5, 2))
    assert not lake.landing_ready(date(2018, 5, 3))
    with pytest.raises(SystemExit):
        main(["--days", "0"])


@pytest.mark.slow
def test_reference_scale_distribution():
    """5,000 customers, 10,000 terminals, 183 days (in memory, no writing) is like the reference."""
    began = datetime.now()
    rows, by_scenario = 0, np.zeros(4, dtype=np.int64)
    for _, table in generate(5000, 10000, START, 183, seed=0):
        rows += table.num_rows
        by_scenario += np.bincount(table["TX_FRAUD_SCENARIO"].to_numpy(), minlength=4)
    frauds = int(by_scenario[1:].sum())
    assert 1_720_000 <= rows <= 1_800_000
    assert 0.0074 <= frauds / rows <= 0.0094
    reference = {1: 973, 2: 9077, 3: 4631}  # final scenario mix of the reference set
    for scenario, count in reference.items():
        assert abs(by_scenario[scenario] - count) <= 0.15 * count, (scenario, by_scenario[scenario])
    assert (datetime.now() - began).total_seconds() < 60
