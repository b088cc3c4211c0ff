"""The lake contract (docs/contract.md, "The lake") on a local directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import threading
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from jobs.common import lake as lake_mod
from jobs.common.lake import Dataset, Lake, NotPublished, day_range

D = date(2018, 4, 1)


@pytest.fixture(params=["file", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])])
def any_lake(request) -> Lake:
    """The same tests run against a directory and against S3."""
    return request.getfixturevalue("lake" if request.param == "file" else "s3_lake")


def test_layout_paths_are_hive_day_partitions(lake: Lake):
    assert lake.partition_path(Dataset.CLEAN, D).endswith("/clean/transactions/date=2018-04-01")
    assert lake.partition_path(Dataset.ALERTS, D).endswith("/alerts/cards/date=2018-04-01")
    assert lake.partition_path(Dataset.REPORTS, D).endswith("/reports/date=2018-04-01")


def test_bad_uris_are_refused():
    for uri in ("/tmp/lake", "file://relative/lake", "s3://", "gs://bucket/x"):
        with pytest.raises(ValueError):
            Lake.from_uri(uri)


def test_write_then_read_round_trips(any_lake: Lake):
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64()), "b": ["x", "y", "z"]})
    manifest = any_lake.write_table(Dataset.CLEAN, D, table, stats={"clean": 3})
    assert manifest["rows"] == 3 and manifest["stats"] == {"clean": 3}
    assert any_lake.read_table(Dataset.CLEAN, D).equals(table)  # no hive columns leak in
    assert any_lake.published_dates(Dataset.CLEAN) == [D]


def test_unpublished_is_not_empty(any_lake: Lake):
    with pytest.raises(NotPublished):
        any_lake.read_table(Dataset.CLEAN, D)
    empty = pa.table({"a": pa.array([], pa.int64())})
    any_lake.write_table(Dataset.CLEAN, D, empty)
    assert any_lake.read_table(Dataset.CLEAN, D).num_rows == 0
    assert any_lake.is_published(Dataset.CLEAN, D)


def test_rerun_replaces_partition_whole_and_nothing_else(any_lake: Lake, monkeypatch):
    other = date(2018, 4, 2)
    any_lake.write_table(Dataset.FEATURES, other, pa.table({"a": [9]}))
    any_lake.write_table(Dataset.FEATURES, D, pa.table({"a": [1, 2]}))
    first_files = any_lake.partition_files(Dataset.FEATURES, D)
    any_lake.write_table(Dataset.FEATURES, D, pa.table({"a": [5]}))
    assert any_lake.read_table(Dataset.FEATURES, D).column("a").to_pylist() == [5]
    assert any_lake.read_table(Dataset.FEATURES, other).column("a").to_pylist() == [9]
    # the superseded attempt stays for a reader still in it, marked; once the grace is over it goes
    assert all(any_lake.exists(p) for p in first_files)
    monkeypatch.setattr(lake_mod, "SUPERSEDED_GRACE_SECONDS", -60)
    assert any_lake.collect_garbage(Dataset.FEATURES, D) and not any(any_lake.exists(p) for p in first_files)
    assert any_lake.read_table(Dataset.FEATURES, D).column("a").to_pylist() == [5]


def test_unfinished_attempt_is_invisible(any_lake: Lake):
    any_lake.write_table(Dataset.CLEAN, D, pa.table({"a": [1]}))
    attempt = any_lake.new_attempt(Dataset.CLEAN, D)
    # a writer that crashed after writing its files, before publishing
    with any_lake.fs.open_output_stream(f"{attempt.path}/part-00000.parquet") as f:
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [7, 7, 7]}), f)
    assert any_lake.read_table(Dataset.CLEAN, D).column("a").to_pylist() == [1]


def test_stale_attempts_are_collected(lake: Lake, monkeypatch):
    attempt = lake.new_attempt(Dataset.CLEAN, D)
    with lake.fs.open_output_stream(f"{attempt.path}/part-00000.parquet") as f:
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [7]}), f)
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [1]}))
    assert lake.exists(attempt.path), "a young unpublished attempt may be a live writer: kept"
    monkeypatch.setattr(lake_mod, "STALE_ATTEMPT_SECONDS", -1)
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [2]}))
    assert not lake.exists(attempt.path)


@pytest.mark.parametrize("round_", range(5))
def test_concurrent_writers_last_complete_write_wins_whole(any_lake: Lake, round_: int):
    # Several rounds: writers that superseded the same attempt race to remove it (a CI failure).
    day = D + timedelta(days=round_)
    tables = {i: pa.table({"writer": [i] * (100 + i)}) for i in range(4)}
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            any_lake.write_table(Dataset.SCORES, day, tables[i])
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in tables]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    result = any_lake.read_table(Dataset.SCORES, day)
    writers = set(result.column("writer").to_pylist())
    assert len(writers) == 1, "partition mixes writers"
    (winner,) = writers
    assert result.num_rows == tables[winner].num_rows
    folder = any_lake.partition_path(Dataset.SCORES, day)
    attempts = [i for i in any_lake.list_dir(folder) if i.type == pafs.FileType.Directory]
    assert attempts and all(any_lake.list_files(i.path) for i in attempts), "no empty leftovers"


def test_removing_a_folder_someone_else_just_removed_is_not_an_error(any_lake: Lake, monkeypatch):
    gone = any_lake.path("scores", "transactions", "date=2018-04-01", "attempt=0000000000000000")
    real_exists = any_lake.exists
    calls = []

    def exists_then_gone(path: str) -> bool:
        calls.append(path)
        return True if len(calls) == 1 else real_exists(path)  # it was there when we looked

    monkeypatch.setattr(any_lake, "exists", exists_then_gone)
    any_lake.delete_dir(gone)
    assert len(calls) >= 2, "the folder's absence was checked again after the failed removal"


def test_put_if_absent_has_exactly_one_winner(any_lake: Lake):
    path = any_lake.path("models", "registry", "decision.json")
    results: dict[int, bool] = {}

    def put(i: int) -> None:
        results[i] = any_lake.put_if_absent(path, f"writer {i}".encode())

    threads = [threading.Thread(target=put, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(winners) == 1
    assert any_lake.read_bytes(path) == f"writer {winners[0]}".encode()


def test_landing_marker_and_files(any_lake: Lake):
    assert not any_lake.landing_ready(D)
    any_lake.write_landing(D, pa.table({"a": [1]}), fmt="parquet")
    any_lake.write_landing(D, pa.table({"a": [2]}), fmt="csv", name="part-00001")
    assert not any_lake.landing_ready(D), "files alone do not make a day ready"
    any_lake.mark_landing_done(D)
    assert any_lake.landing_ready(D)
    names = [i.base_name for i in any_lake.landing_files(D)]
    assert names == ["part-00000.parquet", "part-00001.csv"]


def test_json_objects_and_run_records(any_lake: Lake):
    any_lake.write_run_record("clean", D, "abc", {"seconds": 1.5})
    stored = any_lake.read_json(any_lake.run_record_path("clean", D, "abc"))
    assert stored.pop("recorded_at").startswith("20") and stored == {"seconds": 1.5}
    assert any_lake.latest_run_record("clean", D)["seconds"] == 1.5


def test_day_range_is_inclusive():
    assert day_range(D, date(2018, 4, 3)) == [D, date(2018, 4, 2), date(2018, 4, 3)]
    with pytest.raises(ValueError):
        day_range(date(2018, 4, 3), D)
