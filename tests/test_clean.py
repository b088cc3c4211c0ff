"""The Spark cleaning job (jobs/spark/clean.py): typing, quarantine reasons, dedupe, publishing.

Every test writes its own tiny landing day by hand and runs the job in-process on the shared
SparkSession, through ``main([...])`` exactly as the command line does.
"""

from __future__ import annotations

import json
import math
import posixpath
import subprocess
import sys
from datetime import date, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.common.lake import ATTEMPT_PREFIX, Dataset, Lake
from jobs.common.schema import CLEAN_SCHEMA, QUARANTINE_SCHEMA, RAW_COLUMNS, RAW_SCHEMA, QuarantineReason
from jobs.spark import clean, landing

pytestmark = pytest.mark.spark


@pytest.fixture(autouse=True)
def _transactions_only(monkeypatch):
    """These tests are about the transactions half of the clean step: no label feed to wait for
    (the label half is in test_labels.py)."""
    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")

D = date(2018, 4, 1)
D2 = date(2018, 4, 2)
CSV_HEADER = ",".join(RAW_COLUMNS)
STATS_KEYS = {
    "rows_in",
    "clean",
    "quarantined",
    "quarantined_total",
    "duplicates_collapsed",
    "label_updates",
    "files",
}


def row(
    tx_id: int, when: str = "2018-04-01 10:00:00", amount: float = 10.0, label: int | None = 0, **kw
) -> dict:
    """One valid raw transaction of day D (override any column)."""
    return {
        "TRANSACTION_ID": tx_id,
        "TX_DATETIME": datetime.fromisoformat(when),
        "CUSTOMER_ID": kw.get("customer", 1),
        "TERMINAL_ID": kw.get("terminal", 2),
        "TX_AMOUNT": amount,
        "TX_FRAUD": label,
        "TX_FRAUD_SCENARIO": kw.get("scenario", 0 if label is not None else None),
    }


def write_parquet(
    lake: Lake, day: date, rows: list[dict], name: str = "part-00000", schema=RAW_SCHEMA
) -> str:
    return lake.write_landing(day, pa.Table.from_pylist(rows, schema=schema), name=name)


def write_csv(lake: Lake, day: date, text: str, name: str = "part-00000.csv") -> str:
    """A CSV landing file from raw text (lines are stripped of the indentation of the test)."""
    path = posixpath.join(lake.partition_path(Dataset.LANDING, day), name)
    lake.write_bytes(path, ("\n".join(line.strip() for line in text.strip().splitlines()) + "\n").encode())
    return path


def run(lake: Lake, day: date = D) -> dict:
    """Clean one day through the CLI entry point; return the published clean manifest's stats."""
    assert clean.main(["--lake", lake.uri, "--date", day.isoformat()]) == 0
    return lake.manifest(Dataset.CLEAN, day)["stats"]


def run_failing(lake: Lake, day: date, capsys) -> str:
    assert clean.main(["--lake", lake.uri, "--date", day.isoformat()]) == 1
    return capsys.readouterr().err


def clean_table(lake: Lake, day: date = D) -> pa.Table:
    return lake.read_table(Dataset.CLEAN, day, schema=CLEAN_SCHEMA)


def quarantine(lake: Lake, day: date = D) -> list[dict]:
    return lake.read_table(Dataset.QUARANTINE, day, schema=QUARANTINE_SCHEMA).to_pylist()


def reasons(lake: Lake, day: date = D) -> dict[str, str]:
    """TRANSACTION_ID (as delivered) -> quarantine reason."""
    return {r["TRANSACTION_ID"]: r["reason"] for r in quarantine(lake, day)}


def assert_nothing_published(lake: Lake, day: date = D) -> None:
    assert lake.manifest(Dataset.CLEAN, day) is None
    assert lake.manifest(Dataset.QUARANTINE, day) is None


def assert_consistent(stats: dict) -> None:
    assert set(stats) == STATS_KEYS
    assert set(stats["quarantined"]) == set(QuarantineReason.ALL)
    assert stats["quarantined_total"] == sum(stats["quarantined"].values())
    accounted = (
        stats["clean"] + stats["quarantined_total"] + stats["duplicates_collapsed"] + stats["label_updates"]
    )
    assert stats["rows_in"] == accounted


def only(stats: dict, reason: str, count: int) -> None:
    assert stats["quarantined"] == {r: (count if r == reason else 0) for r in QuarantineReason.ALL}


# --- row-level reasons ---------------------------------------------------------------------------
def test_unparseable_number_in_csv_is_quarantined_with_original_strings(spark, lake):
    path = write_csv(
        lake,
        D,
        f"""{CSV_HEADER}
        1,2018-04-01 07:19:05,10,20,12.5,0,0
        2,2018-04-01 07:19:06,abc,20,12.5,0,0
        3,2018-04-01 07:19:07,10,20,12;5,0,0
        4,2018-04-01 07:19:08,10,20,12.5,yes,0
        x5,2018-04-01 07:19:09,10,20,12.5,0,0
        6,2018-04-01 07:19:10,10,20,1.5,0,1.5
        7,2018-04-01 07:19:11,10.0,20,12.5,1.0,0
        """,
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    assert (stats["rows_in"], stats["clean"], stats["files"]) == (7, 2, 1)  # 7: whole numbers as "10.0"
    only(stats, QuarantineReason.BAD_NUMBER, 5)
    by_id = {r["TRANSACTION_ID"]: r for r in quarantine(lake)}
    assert set(by_id) == {"2", "3", "4", "x5", "6"}
    assert by_id["3"] == {
        "TRANSACTION_ID": "3",
        "TX_DATETIME": "2018-04-01 07:19:07",
        "CUSTOMER_ID": "10",
        "TERMINAL_ID": "20",
        "TX_AMOUNT": "12;5",
        "TX_FRAUD": "0",
        "TX_FRAUD_SCENARIO": "0",
        "reason": QuarantineReason.BAD_NUMBER,
        "source_file": lake.to_uri(path),
    }
    assert by_id["2"]["CUSTOMER_ID"] == "abc"


def test_unparseable_timestamp_in_csv(spark, lake):
    write_csv(
        lake,
        D,
        f"""{CSV_HEADER}
        1,2018-04-01 25:00:00,10,20,1.0,0,0
        2,yesterday,10,20,1.0,0,0
        3,2018-04-01,10,20,1.0,0,0
        4,2018-04-01T07:19:05,10,20,1.0,0,0
        5,2018-04-01 07:19:05.250,10,20,1.0,,
        """,
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    only(stats, QuarantineReason.BAD_TIMESTAMP, 3)
    assert reasons(lake) == {k: QuarantineReason.BAD_TIMESTAMP for k in ("1", "2", "3")}
    assert clean_table(lake).to_pylist() == [
        {
            "TRANSACTION_ID": 4,
            "TX_DATETIME": datetime(2018, 4, 1, 7, 19, 5),
            "CUSTOMER_ID": 10,
            "TERMINAL_ID": 20,
            "TX_AMOUNT": 1.0,
            "TX_FRAUD": 0,
            "TX_FRAUD_SCENARIO": 0,
        },
        {
            "TRANSACTION_ID": 5,
            "TX_DATETIME": datetime(2018, 4, 1, 7, 19, 5, 250000),
            "CUSTOMER_ID": 10,
            "TERMINAL_ID": 20,
            "TX_AMOUNT": 1.0,
            "TX_FRAUD": None,  # an empty CSV field is null
            "TX_FRAUD_SCENARIO": None,
        },
    ]


def test_null_required_field_takes_precedence(spark, lake):
    write_csv(
        lake,
        D,
        f"""{CSV_HEADER}
        1,2018-04-01 07:00:00,,20,1.0,0,0
        2,2018-04-01 07:00:00,10,  ,1.0,0,0
        3,,10,20,1.0,0,0
        4,2018-04-01 07:00:00,10,20,,0,0
        5,2018-04-01 07:00:00,,20,-abc,7,0
        ,2018-04-01 07:00:00,10,20,1.0,0,0
        7,2018-04-01 07:00:00,10,20,1.0,,
        """,
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    only(stats, QuarantineReason.NULL_REQUIRED, 6)
    assert reasons(lake) == {k: QuarantineReason.NULL_REQUIRED for k in ("1", "2", "3", "4", "5", None)}
    assert clean_table(lake).column("TRANSACTION_ID").to_pylist() == [7]


def test_negative_amount_and_the_printed_stats_line(spark, lake, capsys):
    write_parquet(lake, D, [row(1, amount=-0.01), row(2, amount=0.0), row(3, amount=5.0)])
    lake.mark_landing_done(D)
    stats = run(lake)
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines() if line.startswith("{")]
    printed = next(p for p in lines if p["dataset"] == "clean/transactions")
    assert printed == {"step": "clean", "dataset": "clean/transactions", "date": "2018-04-01", **stats}
    only(stats, QuarantineReason.NEGATIVE_AMOUNT, 1)
    assert reasons(lake) == {"1": QuarantineReason.NEGATIVE_AMOUNT}
    assert quarantine(lake)[0]["TX_AMOUNT"] == "-0.01"
    assert clean_table(lake).column("TRANSACTION_ID").to_pylist() == [2, 3]


def test_non_finite_amount_in_parquet_and_csv(spark, lake):
    write_parquet(lake, D, [row(1, amount=math.nan), row(2, amount=math.inf), row(3)], name="a")
    write_csv(
        lake,
        D,
        f"""{CSV_HEADER}
        4,2018-04-01 07:00:00,10,20,NaN,0,0
        5,2018-04-01 07:00:00,10,20,-Infinity,0,0
        6,2018-04-01 07:00:00,10,20,inf,0,0
        """,
        name="b.csv",
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert stats["files"] == 2
    only(stats, QuarantineReason.NON_FINITE_AMOUNT, 5)
    assert set(reasons(lake)) == {"1", "2", "4", "5", "6"}
    assert clean_table(lake).column("TRANSACTION_ID").to_pylist() == [3]


def test_timestamp_outside_day_and_the_clean_file_contract(spark, lake):
    write_parquet(
        lake,
        D,
        [
            row(1, "2018-03-31 23:59:59.999999"),
            row(2, "2018-04-02 00:00:00"),
            row(4, "2018-04-01 23:59:59.999999"),
            row(5, "2018-04-01 12:00:00"),
            row(3, "2018-04-01 00:00:00"),
            row(0, "2018-04-01 12:00:00"),
        ],
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    only(stats, QuarantineReason.OUTSIDE_DAY, 2)
    assert reasons(lake) == {"1": QuarantineReason.OUTSIDE_DAY, "2": QuarantineReason.OUTSIDE_DAY}
    (clean_file,) = lake.partition_files(Dataset.CLEAN, D)  # one file, exactly CLEAN_SCHEMA's types
    written = pq.ParquetFile(clean_file).read()
    assert [(f.name, f.type) for f in written.schema] == [(f.name, f.type) for f in CLEAN_SCHEMA]
    assert written.column("TRANSACTION_ID").to_pylist() == [3, 0, 5, 4]  # TX_DATETIME, TRANSACTION_ID
    (quarantine_file,) = lake.partition_files(Dataset.QUARANTINE, D)
    assert pq.ParquetFile(quarantine_file).schema_arrow.names == QUARANTINE_SCHEMA.names


def test_label_not_0_1_or_null(spark, lake):
    write_parquet(lake, D, [row(1, label=2), row(2, label=-1), row(3, label=1), row(4, label=None)])
    lake.mark_landing_done(D)
    stats = run(lake)
    only(stats, QuarantineReason.BAD_LABEL, 2)
    assert reasons(lake) == {"1": QuarantineReason.BAD_LABEL, "2": QuarantineReason.BAD_LABEL}
    assert clean_table(lake).column("TX_FRAUD").to_pylist() == [1, None]


# --- duplicates ----------------------------------------------------------------------------------
def test_identical_redelivery_collapses_and_is_counted(spark, lake):
    write_parquet(lake, D, [row(1, "2018-04-01 07:19:05"), row(2), row(2)], name="a")
    write_csv(  # the same row 1 again, in CSV with a `T`: equal once typed
        lake, D, f"{CSV_HEADER}\n1,2018-04-01T07:19:05,1,2,10.0,0,0\n", name="b.csv"
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    assert (stats["rows_in"], stats["clean"], stats["duplicates_collapsed"], stats["label_updates"]) == (
        4,
        2,
        2,
        0,
    )
    assert stats["quarantined_total"] == 0
    assert clean_table(lake).to_pylist() == [row(1, "2018-04-01 07:19:05"), row(2)]


def test_label_fill_redelivery_is_an_update_and_the_label_wins(spark, lake):
    write_parquet(lake, D, [row(1, label=None), row(2, label=None), row(2, label=None)], name="a")
    write_parquet(lake, D, [row(1, label=1, scenario=None), row(2, label=0, scenario=3)], name="b")
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    assert (stats["clean"], stats["label_updates"], stats["duplicates_collapsed"]) == (2, 2, 1)
    assert stats["quarantined_total"] == 0
    labels = dict(
        zip(*clean_table(lake).select(["TRANSACTION_ID", "TX_FRAUD"]).to_pydict().values(), strict=True)
    )
    assert labels == {1: 1, 2: 0}


def test_conflicting_duplicate_ids_are_all_quarantined(spark, lake):
    write_parquet(
        lake,
        D,
        [
            row(1, amount=10.0),
            row(1, amount=10.5),
            row(1, amount=10.0),
            row(2, label=0),
            row(2, label=1),
            row(2, label=None),
            row(3, customer=7),
            row(3, customer=8, label=None),
            row(5, label=None, scenario=None),
            row(5, label=None, scenario=1),
            row(4),
            row(6),  # its rejected copy takes no part in deduplication
            row(6, amount=-3.0),
        ],
    )
    lake.mark_landing_done(D)
    stats = run(lake)
    assert_consistent(stats)
    assert stats["quarantined"] == {
        **dict.fromkeys(QuarantineReason.ALL, 0),
        QuarantineReason.CONFLICTING_DUPLICATE: 10,
        QuarantineReason.NEGATIVE_AMOUNT: 1,
    }
    assert (stats["clean"], stats["duplicates_collapsed"], stats["label_updates"]) == (2, 0, 0)
    conflicting = [r for r in quarantine(lake) if r["reason"] == QuarantineReason.CONFLICTING_DUPLICATE]
    assert sorted(r["TRANSACTION_ID"] for r in conflicting) == [
        "1",
        "1",
        "1",
        "2",
        "2",
        "2",
        "3",
        "3",
        "5",
        "5",
    ]
    assert clean_table(lake).column("TRANSACTION_ID").to_pylist() == [4, 6]


def test_missing_required_column_is_a_clear_error_and_nothing_is_published(spark, lake, capsys):
    write_parquet(lake, D, [row(1)], name="good")
    bad = write_csv(
        lake, D, "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TX_AMOUNT\n1,2018-04-01 07:00:00,1,2.0\n"
    )
    lake.mark_landing_done(D)
    err = run_failing(lake, D, capsys)
    assert "required column TERMINAL_ID is missing" in err
    assert lake.to_uri(bad) in err
    assert "days not done: 2018-04-01" in err
    assert_nothing_published(lake)


def test_extra_columns_are_ignored_and_optional_columns_may_be_missing(spark, lake):
    write_csv(
        lake,
        D,
        """TRANSACTION_ID,MERCHANT_NAME,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_TIME_SECONDS
        1,"Shop, Inc.",2018-04-01 07:00:00,1,2,3.5,25200
        """,
    )
    extra = pa.schema([*RAW_SCHEMA, pa.field("TX_TIME_DAYS", pa.int64())])
    write_parquet(lake, D, [{**row(2), "TX_TIME_DAYS": 0}], name="extra", schema=extra)
    lake.mark_landing_done(D)
    stats = run(lake)
    assert (stats["clean"], stats["quarantined_total"]) == (2, 0)
    assert clean_table(lake).to_pylist() == [row(1, "2018-04-01 07:00:00", amount=3.5, label=None), row(2)]


def test_a_column_given_twice_is_a_clear_error():
    with pytest.raises(
        landing.CleanError, match=r"column TX_AMOUNT appears more than once \(tx_amount, TX_AMOUNT\)"
    ):
        landing._match_columns([*RAW_COLUMNS[:4], "tx_amount", "TX_AMOUNT"], "file:///x.csv", clean.TRANSACTIONS)


def test_case_insensitive_csv_column_names(spark, lake):
    header = "transaction_id,Tx_Datetime,customer_ID,terminal_id,tx_amount,Tx_Fraud,tx_fraud_scenario"
    write_csv(lake, D, f"{header}\n1,2018-04-01 07:00:00,1,2,10.0,0,0\n")
    lake.mark_landing_done(D)
    stats = run(lake)
    assert stats["clean"] == 1
    assert clean_table(lake).to_pylist() == [row(1, "2018-04-01 07:00:00")]


def test_empty_partition_is_published_with_zero_rows(spark, lake):
    lake.mark_landing_done(D)
    write_parquet(lake, D2, [], name="empty")
    write_csv(lake, D2, CSV_HEADER + "\n")
    lake.mark_landing_done(D2)
    assert clean.main(["--lake", lake.uri, "--start", D.isoformat(), "--end", D2.isoformat()]) == 0
    for day, files in ((D, 0), (D2, 2)):
        stats = lake.manifest(Dataset.CLEAN, day)["stats"]
        assert_consistent(stats)
        assert (stats["rows_in"], stats["clean"], stats["files"]) == (0, 0, files)
        assert clean_table(lake, day).num_rows == 0
        assert quarantine(lake, day) == []
        assert lake.manifest(Dataset.QUARANTINE, day)["rows"] == 0


def test_missing_success_marker_is_a_clear_error(spark, lake, capsys):
    write_parquet(lake, D, [row(1)])
    err = run_failing(lake, D, capsys)
    assert "no _SUCCESS marker" in err and "date=2018-04-01" in err
    assert_nothing_published(lake)


def test_corrupt_parquet_is_a_clear_error_and_the_published_day_is_untouched(spark, lake, capsys):
    write_parquet(lake, D, [row(1), row(2)], name="good")
    lake.mark_landing_done(D)
    run(lake)
    before = lake.manifest(Dataset.CLEAN, D), lake.manifest(Dataset.QUARANTINE, D)
    rows_before = clean_table(lake)

    bad = posixpath.join(lake.partition_path(Dataset.LANDING, D), "late.parquet")
    lake.write_bytes(bad, b"PAR1 this is not a parquet file")
    err = run_failing(lake, D, capsys)
    assert "cannot read Parquet file" in err and lake.to_uri(bad) in err
    assert (lake.manifest(Dataset.CLEAN, D), lake.manifest(Dataset.QUARANTINE, D)) == before
    assert clean_table(lake).equals(rows_before)
    attempts = [
        i
        for i in lake.list_dir(lake.partition_path(Dataset.CLEAN, D))
        if i.base_name.startswith(ATTEMPT_PREFIX)
    ]
    assert [a.base_name for a in attempts] == [f"{ATTEMPT_PREFIX}{before[0]['attempt']}"]


def test_zero_row_file_among_good_ones(spark, lake):
    write_parquet(lake, D, [row(1)], name="a")
    write_parquet(lake, D, [], name="b")
    write_csv(lake, D, CSV_HEADER + "\n", name="c.csv")
    write_csv(lake, D, f"{CSV_HEADER}\n2,2018-04-01 11:00:00,1,2,10.0,0,0\n", name="d.csv")
    lake.mark_landing_done(D)
    stats = run(lake)
    assert (stats["files"], stats["rows_in"], stats["clean"]) == (4, 2, 2)


# --- output contract -----------------------------------------------------------------------------
def test_rerun_gives_identical_clean_table_and_replaces_the_partition_whole(spark, lake):
    write_parquet(lake, D, [row(i, f"2018-04-01 {i:02d}:00:00", amount=i - 1.5) for i in range(1, 6)])
    lake.mark_landing_done(D)
    first_stats = run(lake)
    first = clean_table(lake), quarantine(lake), lake.manifest(Dataset.CLEAN, D)["attempt"]
    first_attempts = {ds: lake.manifest(ds, D)["attempt"] for ds in (Dataset.CLEAN, Dataset.QUARANTINE)}
    second_stats = run(lake)
    second = clean_table(lake), quarantine(lake), lake.manifest(Dataset.CLEAN, D)["attempt"]
    assert first_stats == second_stats
    assert first[0].equals(second[0]) and first[1] == second[1]
    assert first[2] != second[2]
    for dataset in (Dataset.CLEAN, Dataset.QUARANTINE):
        folder = lake.partition_path(dataset, D)
        folders = sorted(i.base_name for i in lake.list_dir(folder) if i.type.name == "Directory")
        live, old = (f"{ATTEMPT_PREFIX}{a}" for a in (lake.manifest(dataset, D)["attempt"], first_attempts[dataset]))
        # the live attempt, and the superseded one, marked, kept for the readers' grace period
        assert folders == sorted([live, old])
        assert lake.exists(posixpath.join(folder, old, "_SUPERSEDED"))


def test_range_run_equals_day_by_day_runs(spark, tmp_path):
    lakes = [Lake.from_uri((tmp_path / name).as_uri()) for name in ("ranged", "daily")]
    for lake in lakes:
        write_parquet(lake, D, [row(1, amount=-1.0), row(2), row(2), row(3, label=None)])
        write_csv(
            lake, D2, f"{CSV_HEADER}\n4,2018-04-02 01:00:00,1,2,3.0,,\n5,2018-04-02 02:00:00,1,2,x,0,0\n"
        )
        write_parquet(lake, D2, [row(4, "2018-04-02 01:00:00", amount=3.0, label=1)], name="late")
        lake.mark_landing_done(D)
        lake.mark_landing_done(D2)
    ranged, daily = lakes
    assert clean.main(["--lake", ranged.uri, "--start", D.isoformat(), "--end", D2.isoformat()]) == 0
    for day in (D, D2):
        run(daily, day)
        assert clean_table(ranged, day).equals(clean_table(daily, day))
        assert ranged.manifest(Dataset.CLEAN, day)["stats"] == daily.manifest(Dataset.CLEAN, day)["stats"]
        strip = [{k: v for k, v in r.items() if k != "source_file"} for r in quarantine(ranged, day)]
        assert strip == [{k: v for k, v in r.items() if k != "source_file"} for r in quarantine(daily, day)]
    assert clean_table(ranged, D2).column("TX_FRAUD").to_pylist() == [1]


def test_range_run_names_the_days_not_done(spark, lake, capsys):
    write_parquet(lake, D, [row(1)])
    lake.mark_landing_done(D)
    code = clean.main(["--lake", lake.uri, "--start", D.isoformat(), "--end", "2018-04-03"])
    err = capsys.readouterr().err
    assert code == 1
    assert "days not done: 2018-04-02..2018-04-03" in err
    assert lake.is_published(Dataset.CLEAN, D) and not lake.is_published(Dataset.CLEAN, D2)


def test_script_runs_as_a_file():
    done = subprocess.run(
        [sys.executable, "jobs/spark/clean.py", "--help"],
        cwd=clean.__file__.rsplit("/jobs/", 1)[0],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--start" in done.stdout
