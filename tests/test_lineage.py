"""Lineage in every manifest, and staleness you can see and repair (``python -m jobs.lineage``).

A small world (60 customers, 120 terminals, 14 days from 2018-04-01, training every 3 days on a
2-day window: training days 04-10 and 04-13) is built once with the range commands. Each test
works on a copy: it republishes an input the way a user would (a re-delivered landing file, then
clean rerun), reads ``status``, runs ``repair``, and compares with a fresh run over the changed
input. The expected stale sets are derived from the step contracts, and spelled out as well.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import sys
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.common import commands, contracts
from jobs.common.calendar import calendar, day_range
from jobs.common.lake import MANIFEST, Dataset, Lake
from jobs.lineage import EXIT_MODELS_STALE, EXIT_STALE, LineageView, main, migrate, repair, status
from jobs.torch.registry import Registry

pytestmark = pytest.mark.slow

FIRST, LAST = date(2018, 4, 1), date(2018, 4, 14)
LATE_CHANGE = date(2018, 4, 12)  # read by no training window
EARLY_CHANGE = date(2018, 4, 4)  # inside the window of the 04-13 model
SMALL = {
    "FRAUD_FIRST_DATE": FIRST.isoformat(),
    "FRAUD_TRAIN_WINDOW_DAYS": "2",
    "FRAUD_TRAIN_EVERY_DAYS": "3",
    "FRAUD_ALERT_K": "20",
    "FRAUD_SPARK_SHUFFLE_PARTITIONS": "2",
    "FRAUD_SPARK_DRIVER_MEMORY": "1g",
    "FRAUD_SEED": "0",
}
DATA = (Dataset.CLEAN, Dataset.QUARANTINE, Dataset.FEATURES)
MODEL_OUTPUTS = (Dataset.SCORES, Dataset.ALERTS)


@pytest.fixture(scope="module", autouse=True)
def small_world():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SMALL.items():
            mp.setenv(name, value)
        yield


def _run(step: str, lake_uri: str, start: date, end: date | None = None, ok=(0,)) -> None:
    argv = commands.step_command(step, commands.day_args(lake_uri, start, end),
                                 spark_options=("--master", "local[2]") if step in commands.SPARK_JOBS else ())
    done = commands.run(argv, capture=True)
    assert done.returncode in ok, f"{' '.join(argv)} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def build(lake_uri: str) -> None:
    """The whole pipeline over the landing days, as an operator runs it by hand."""
    _run("clean", lake_uri, FIRST, LAST)
    _run("features", lake_uri, FIRST, LAST)
    for day in calendar().schedule.training_days(FIRST, LAST):
        _run("train", lake_uri, day)
    _run("score", lake_uri, FIRST, LAST, ok=(0, 99))
    _run("report", lake_uri, FIRST, LAST)


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("landing") / "lake"
    done = commands.run([sys.executable, "-m", "jobs.datagen", "--lake", root.as_uri(), "--start", FIRST.isoformat(),
                         "--days", str((LAST - FIRST).days + 1), "--customers", "60", "--terminals", "120",
                         "--seed", "7"], capture=True)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def base(landing, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base") / "lake"
    shutil.copytree(landing, root)
    build(root.as_uri())
    return root


@pytest.fixture
def work(base, tmp_path) -> Lake:
    shutil.copytree(base, tmp_path / "lake")
    return Lake.from_uri((tmp_path / "lake").as_uri())


def redeliver_with_changed_amount(lake: Lake, day: date) -> int:
    """Re-deliver landing day D with one transaction's amount changed (as a source fixing a file does);
    return that transaction's id."""
    folder = lake.partition_path(Dataset.LANDING, day)
    path = posixpath.join(folder, "part-00000.parquet")
    table = pq.read_table(path, filesystem=lake.fs)
    txid = table.column("TRANSACTION_ID")[0].as_py()
    amounts = table.column("TX_AMOUNT").to_numpy().copy()
    amounts[0] += 17.25
    table = table.set_column(table.schema.get_field_index("TX_AMOUNT"), "TX_AMOUNT", pa.array(amounts))
    lake.unmark_landing_done(day)
    lake.write_landing(day, table)
    lake.mark_landing_done(day)
    return txid


def stale_set(result) -> set[tuple[str, date]]:
    return {(f.dataset, f.date) for f in result.stale}


def downstream_by_contract(lake: Lake, changed: set[tuple[str, date]]) -> set[tuple[str, date]]:
    """What the step contracts say reads ``changed``, directly or transitively, among the partitions
    that exist (the expectation, derived from the declarations, not from lineage)."""
    cal = calendar()
    published = {(ds, d) for ds in (*DATA, *MODEL_OUTPUTS, Dataset.REPORTS) for d in lake.published_dates(ds)}
    found: set[tuple[str, date]] = set()
    frontier = set(changed)
    while frontier:
        new = set()
        for dataset, day in published - found:
            s = contracts.writer_of(dataset)
            reads = {(r.dataset, d) for r in s.reads for d in r.days(cal, day)}
            if reads & (frontier | found | changed):
                new.add((dataset, day))
        frontier = new - found
        found |= new
    return found


def rows(lake: Lake, dataset: str, day: date) -> list[dict] | None:
    if not lake.is_published(dataset, day):
        return None
    table = lake.read_table(dataset, day)
    keys = [c for c in ("TRANSACTION_ID", "rank", "CUSTOMER_ID", "reason") if c in table.column_names][:1]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist() if keys else table.to_pylist()


def by_training_key(lake: Lake, table: list[dict] | None) -> list[dict] | None:
    """Model outputs with the version replaced by its training key (recipe + exact inputs): two lakes
    that trained the same model on the same inputs name it alike even if a float32 ulp apart."""
    if table is None:
        return None
    registry = Registry(lake)
    for row in table:
        row["model_version"] = registry.version(row["model_version"])["training_key"]
    return table


def assert_same(got: list[dict] | None, want: list[dict] | None, what: str, tolerance: float = 0.0) -> None:
    assert (got is None) == (want is None), what
    if got is None:
        return
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        for column, value in g.items():
            if isinstance(value, float) and tolerance:
                assert abs(value - w[column]) <= tolerance, f"{what}: {column} {value} vs {w[column]}"
            else:
                assert value == w[column], f"{what}: {column} {value!r} vs {w[column]!r}"


def test_every_published_partition_records_its_inputs_and_nothing_is_stale(base):
    lake = Lake.from_uri(base.as_uri())
    result = status(lake)
    assert result.code == 0 and result.unknown == 0 and not result.models, result.to_json()
    assert result.checked == sum(len(lake.published_dates(ds)) for ds in (*DATA, *MODEL_OUTPUTS, Dataset.REPORTS))
    cal = calendar()
    for dataset in (*DATA, *MODEL_OUTPUTS, Dataset.REPORTS):
        for day in lake.published_dates(dataset):
            manifest = lake.manifest(dataset, day)
            provenance = manifest["lineage"]
            assert manifest["digest"] and all(f["sha256"] for f in manifest["files"]), (dataset, day)
            assert provenance["code_version"].startswith("sha256:"), (dataset, day)
            recorded = {(i["dataset"], i["date"]) for i in provenance["inputs"]}
            writer = contracts.writer_of(dataset)
            declared = {(r.dataset, d.isoformat()) for r in writer.reads for d in cal.expected(r.days(cal, day))
                        if r.dataset != Dataset.MODELS}
            assert recorded - {(i["dataset"], i["date"]) for i in provenance["inputs"]
                               if i["dataset"].startswith("models/")} == declared, (dataset, day)
    scored = lake.manifest(Dataset.SCORES, LAST)["lineage"]
    champion = [i for i in scored["inputs"] if i["dataset"] == "models/champion"]
    assert champion == [{"dataset": "models/champion", "date": LAST.isoformat(),
                         "digest": Registry(lake).champion_as_of(LAST)["version"]}]


def test_rerun_on_unchanged_input_changes_nothing_downstream(work):
    before = {ds: work.manifest(ds, LATE_CHANGE) for ds in (*DATA, *MODEL_OUTPUTS, Dataset.REPORTS)}
    for step in ("clean", "features", "score", "report"):  # one day at a time, where the base ran ranges
        _run(step, work.uri, LATE_CHANGE)
    for dataset, manifest in before.items():
        now = work.manifest(dataset, LATE_CHANGE)
        assert now["attempt"] != manifest["attempt"], dataset
        assert now["digest"] == manifest["digest"], f"{dataset}: an identical recompute changed the digest"
    assert status(work).code == 0


def test_republished_clean_makes_downstream_stale_and_repair_equals_a_fresh_run(work, tmp_path):
    txid = redeliver_with_changed_amount(work, LATE_CHANGE)
    redelivered = status(work)
    assert stale_set(redelivered) >= {(Dataset.CLEAN, LATE_CHANGE), (Dataset.QUARANTINE, LATE_CHANGE)}
    assert {str(r) for r in next(f for f in redelivered.stale if f.dataset == Dataset.CLEAN).roots} == {
        f"{Dataset.LANDING} {LATE_CHANGE} republished"}

    _run("clean", work.uri, LATE_CHANGE)  # the clean partition of D republished with the changed amount
    changed = work.read_table(Dataset.CLEAN, LATE_CHANGE)
    assert txid in changed.filter(pc.greater(changed.column("TX_AMOUNT"), 0)).column("TRANSACTION_ID").to_pylist()
    result = status(work)
    assert result.code == EXIT_STALE
    later = day_range(LATE_CHANGE, LAST)
    expected = ({(Dataset.FEATURES, d) for d in later} | {(Dataset.SCORES, d) for d in later}
                | {(Dataset.ALERTS, d) for d in later} | {(Dataset.REPORTS, d) for d in later})
    assert stale_set(result) == expected
    assert expected == downstream_by_contract(work, {(Dataset.CLEAN, LATE_CHANGE)})
    for finding in result.stale:
        assert [str(r) for r in finding.roots] == [f"{Dataset.CLEAN} {LATE_CHANGE} republished"], finding.line()
    assert not result.models  # no training window reads 04-12

    code = main(["status", "--lake", work.uri, "--json"])
    assert code == EXIT_STALE

    repaired = repair(work, None, None, calendar())
    assert repaired.code == 0, repaired.to_json()

    fresh_root = tmp_path / "fresh"
    shutil.copytree(Path(work.path(Dataset.LANDING)).parent.parent, fresh_root,
                    ignore=shutil.ignore_patterns("clean", "quarantine", "features", "models", "scores",
                                                  "alerts", "reports", "_runs"))
    fresh = Lake.from_uri(fresh_root.as_uri())
    build(fresh.uri)
    for day in day_range(FIRST, LAST):
        for dataset in DATA:
            assert_same(rows(work, dataset, day), rows(fresh, dataset, day), f"{dataset} {day}")
            assert work.digest(dataset, day) == fresh.digest(dataset, day), (dataset, day)
        for dataset in MODEL_OUTPUTS:
            assert_same(by_training_key(work, rows(work, dataset, day)),
                        by_training_key(fresh, rows(fresh, dataset, day)), f"{dataset} {day}", tolerance=1e-6)
        mine, theirs = (json.loads(lk.read_bytes(posixpath.join(
            lk.partition_path(Dataset.REPORTS, day), f"attempt={lk.manifest(Dataset.REPORTS, day)['attempt']}",
            "report.json"))) for lk in (work, fresh))
        assert mine["counts"] == theirs["counts"] and mine["matured_performance"] == theirs["matured_performance"], day


def test_a_change_inside_a_training_window_reports_the_model_stale_and_what_a_retrain_touches(work):
    redeliver_with_changed_amount(work, EARLY_CHANGE)
    _run("clean", work.uri, EARLY_CHANGE)
    result = status(work)
    assert result.code == EXIT_STALE
    assert (Dataset.FEATURES, EARLY_CHANGE) in stale_set(result) and (Dataset.FEATURES, LAST) in stale_set(result)
    later_training = date(2018, 4, 13)
    stale_versions = {m.train_day for m in result.models}
    assert stale_versions == {later_training.isoformat()}, [m.line() for m in result.models]

    repaired = repair(work, None, None, calendar())
    assert repaired.code == EXIT_MODELS_STALE, repaired.to_json()
    (model,) = repaired.models
    roots = [str(r) for r in model.roots]
    window_and_history = day_range(FIRST, date(2018, 4, 5))  # the 04-13 model: window 04-04..04-05, history before
    assert roots[0] == f"{Dataset.FEATURES} {EARLY_CHANGE} republished"  # the card's later windows moved too
    assert set(roots) <= {f"{Dataset.FEATURES} {d} republished" for d in window_and_history}, roots
    assert model.touches == ("the decisions of 2018-04-13 .. 2018-04-13; "
                             "the scores, alerts and reports of 2018-04-13..2018-04-14 (where it is champion)")
    assert main(["status", "--lake", work.uri]) == EXIT_MODELS_STALE


def test_a_rollback_effective_from_a_past_date_makes_the_scores_it_changes_stale(work):
    registry = Registry(work)
    first_champion = registry.champion_as_of(date(2018, 4, 10))["version"]
    since = date(2018, 4, 13)
    assert registry.champion_as_of(since)["version"] != first_champion
    registry.add_event("rollback", first_champion, since, "labels of 04-04 were wrong")
    result = status(work)
    changed = day_range(since, LAST)
    assert stale_set(result) == ({(Dataset.SCORES, d) for d in changed} | {(Dataset.ALERTS, d) for d in changed}
                                 | {(Dataset.REPORTS, d) for d in changed})
    for finding in result.stale:
        assert any(r.dataset == "models/champion" and r.date == finding.date.isoformat() for r in finding.roots)
    assert repair(work, None, None, calendar()).code == 0
    for day in changed:
        assert {r["model_version"] for r in rows(work, Dataset.SCORES, day)} == {first_champion}
    assert {r["model_version"] for r in rows(work, Dataset.SCORES, since - timedelta(days=1))} == {first_champion}


def test_partitions_without_lineage_are_unknown_and_migrate_restores_digests(work):
    path = posixpath.join(work.partition_path(Dataset.CLEAN, FIRST), MANIFEST)
    manifest = work.read_json(path)
    digest = manifest["digest"]
    for key in ("digest", "lineage"):
        manifest.pop(key)
    for f in manifest["files"]:
        f.pop("sha256")
    work.write_json(path, manifest)
    result = LineageView(work, calendar()).status()
    assert result.unknown == 1 and result.code == 0
    assert work.digest(Dataset.CLEAN, FIRST) == digest  # computed from the files when the manifest lacks it
    assert migrate(work) == 1
    assert work.manifest(Dataset.CLEAN, FIRST)["digest"] == digest


def test_status_exit_3_on_an_error(capsys):
    assert main(["status", "--lake", "ftp://nowhere/lake"]) == 3
    assert "error" in capsys.readouterr().err
