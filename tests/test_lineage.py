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
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pipeline import FIRST, LAST, SMALL, assert_same, by_training_key, rows, run_step

from jobs.common import contracts
from jobs.common.calendar import calendar, day_range
from jobs.common.lake import MANIFEST, Dataset, Lake
from jobs.lineage import EXIT_MODELS_STALE, EXIT_STALE, TRACKED, LineageView, main, migrate, repair, status
from jobs.torch.registry import Registry

pytestmark = pytest.mark.slow

LATE_CHANGE = date(2018, 4, 12)  # read by no training window
EARLY_CHANGE = date(2018, 4, 4)  # inside the window of the 04-13 model
DATA = (Dataset.CLEAN, Dataset.QUARANTINE, Dataset.FEATURES)
MODEL_OUTPUTS = (Dataset.SCORES, Dataset.ALERTS)


@pytest.fixture(scope="module", autouse=True)
def small_world():
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SMALL.items():
            mp.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def base(small_inline_lake) -> Path:
    return small_inline_lake


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
    # the clean step's look-back only checks that label events name known transactions: lineage records the
    # days an event names, and these lakes' labels are inline, so clean partitions follow only their landing
    published = {(ds, d) for ds in (Dataset.FEATURES, *MODEL_OUTPUTS, Dataset.REPORTS) for d in lake.published_dates(ds)}
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


def test_every_published_partition_records_its_inputs_and_nothing_is_stale(base):
    lake = Lake.from_uri(base.as_uri())
    result = status(lake)
    assert result.code == 0 and result.unknown == 0 and not result.models, result.to_json()
    assert result.checked == sum(len(lake.published_dates(ds)) for ds in TRACKED)
    cal = calendar()
    for dataset in TRACKED:
        for day in lake.published_dates(dataset):
            manifest = lake.manifest(dataset, day)
            provenance = manifest["lineage"]
            assert manifest["digest"] and all(f["sha256"] for f in manifest["files"]), (dataset, day)
            assert provenance["code_version"].startswith("sha256:"), (dataset, day)
            recorded = {(i["dataset"], i["date"]) for i in provenance["inputs"] if not i["dataset"].startswith("models/")}
            writer = contracts.writer_of(dataset)
            declared = {(r.dataset, d.isoformat()) for r in writer.reads for d in cal.expected(r.days(cal, day))}
            declared |= {(ds, day.isoformat()) for ds in writer.writes}  # the clean labels check this day's rows
            assert recorded <= declared, (dataset, day, recorded - declared)
            if dataset in (Dataset.FEATURES, Dataset.REPORTS):
                assert recorded == {x for x in declared if x[0] not in writer.writes}, (dataset, day)
    scored = lake.manifest(Dataset.SCORES, LAST)["lineage"]
    champion = [i for i in scored["inputs"] if i["dataset"] == "models/champion"]
    assert champion == [{"dataset": "models/champion", "date": LAST.isoformat(),
                         "digest": Registry(lake).champion_as_of(LAST)["version"]}]


def test_rerun_on_unchanged_input_changes_nothing_downstream(work):
    before = {ds: work.manifest(ds, LATE_CHANGE) for ds in (*DATA, *MODEL_OUTPUTS, Dataset.REPORTS)}
    for step in ("clean", "features", "score", "report"):  # one day at a time, where the base ran ranges
        run_step(step, work.uri, LATE_CHANGE)
    for dataset, manifest in before.items():
        now = work.manifest(dataset, LATE_CHANGE)
        assert now["attempt"] != manifest["attempt"], dataset
        assert now["digest"] == manifest["digest"], f"{dataset}: an identical recompute changed the digest"
    assert status(work).code == 0


def _rebuilt_from(base: Path, redelivered: Lake, first: date, root: Path) -> Lake:
    """The unchanged lake with every day from ``first`` on built afresh by the range commands over
    the redelivered landing (days before ``first`` never read a later day, so they stay as built)."""
    shutil.copytree(base, root)
    fresh = Lake.from_uri(root.as_uri())
    later = day_range(first, LAST)
    shutil.rmtree(fresh.partition_path(Dataset.LANDING, first))
    shutil.copytree(redelivered.partition_path(Dataset.LANDING, first), fresh.partition_path(Dataset.LANDING, first))
    steps = ("clean", "features", "score", "report")  # every step of a day but training (models stay)
    for dataset in (ds for name in steps for ds in contracts.step(name).writes):
        for day in later:
            shutil.rmtree(fresh.partition_path(dataset, day), ignore_errors=True)
    for day in calendar().schedule.training_days(first, LAST):  # models trained then read nothing that moved
        assert max(contracts.upstream([("train", day)], calendar())[Dataset.FEATURES]) < first, day
    for step in ("clean", "features"):
        run_step(step, fresh.uri, first, LAST)
    run_step("score", fresh.uri, first, LAST, ok=(0, 99))
    run_step("report", fresh.uri, first, LAST)
    return fresh


def test_republished_clean_makes_downstream_stale_and_repair_equals_a_fresh_run(base, work, tmp_path):
    txid = redeliver_with_changed_amount(work, LATE_CHANGE)
    redelivered = status(work)
    assert stale_set(redelivered) >= {(Dataset.CLEAN, LATE_CHANGE), (Dataset.QUARANTINE, LATE_CHANGE)}
    assert {str(r) for r in next(f for f in redelivered.stale if f.dataset == Dataset.CLEAN).roots} == {
        f"{Dataset.LANDING} {LATE_CHANGE} republished"}

    run_step("clean", work.uri, LATE_CHANGE)  # the clean partition of D republished with the changed amount
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

    fresh = _rebuilt_from(base, work, LATE_CHANGE, tmp_path / "fresh")
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
    run_step("clean", work.uri, EARLY_CHANGE)
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
