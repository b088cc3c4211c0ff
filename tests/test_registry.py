"""The model registry: decision order, as-of resolution, rollback, and racing writers (file and S3)."""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest

from jobs.common.calendar import TrainingSchedule
from jobs.torch import registry as reg

SCHEDULE = TrainingSchedule(first_date=date(2018, 4, 1), every_days=7, window_days=7)
T1, T2, T3 = date(2018, 4, 15), date(2018, 4, 22), date(2018, 4, 29)


@pytest.fixture(params=["lake", pytest.param("s3_lake", marks=pytest.mark.s3)])
def any_lake(request):
    return request.getfixturevalue(request.param)


def make_version(registry: reg.Registry, name: str, train_day: date = T1) -> str:
    registry.register_version(
        name,
        {reg.CHECKPOINT: name.encode(), reg.METRICS: b"{}", reg.LINEAGE: b"{}"},
        {"train_day": train_day.isoformat(), "model": "mlp"},
    )
    return name


def decision(day: date, champion: str, outcome: str = reg.PROMOTED, candidate: str | None = None) -> dict:
    return {
        "train_day": day.isoformat(),
        "outcome": outcome,
        "champion": champion,
        "candidate": {"version": candidate or champion},
    }


def test_registry_module_imports_no_torch():
    import subprocess

    code = "import sys, jobs.torch.registry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_decisions_are_made_in_date_order(lake):
    r = reg.Registry(lake, SCHEDULE)
    make_version(r, "v1")
    make_version(r, "v2", T2)
    with pytest.raises(reg.WaitingForDecision) as info:
        r.record_decision(decision(T2, "v2"))
    assert info.value.day == T1 and "waiting for decision of 2018-04-15" in str(info.value)
    assert r.record_decision(decision(T1, "v1"))[1] == "created"
    assert r.record_decision(decision(T2, "v2"))[1] == "created"
    with pytest.raises(reg.RegistryError, match="not a scheduled training day"):
        r.record_decision(decision(date(2018, 4, 23), "v2"))
    with pytest.raises(reg.RegistryError, match="unregistered"):
        r.record_decision(decision(T3, "nope"))


def test_rerun_of_a_decision_is_idempotent_and_never_replaces(lake):
    r = reg.Registry(lake, SCHEDULE)
    make_version(r, "v1")
    make_version(r, "v1b")
    assert r.record_decision(decision(T1, "v1"))[1] == "created"
    stored, outcome = r.record_decision(decision(T1, "v1"))
    assert outcome == "same" and stored["champion"] == "v1"
    stored, outcome = r.record_decision(decision(T1, "v1b"))
    assert outcome == "conflict" and stored["champion"] == "v1"
    assert r.decision(T1)["champion"] == "v1"


def test_champion_as_of_is_the_latest_decision_on_or_before_the_day(lake):
    r = reg.Registry(lake, SCHEDULE)
    assert r.champion_as_of(date(2018, 4, 14)) is None  # before the first training day
    with pytest.raises(reg.WaitingForDecision):
        r.champion_as_of(T1)
    make_version(r, "v1")
    r.record_decision(decision(T1, "v1"))
    assert r.champion_as_of(T1)["version"] == "v1"
    assert r.champion_as_of(date(2018, 4, 21))["version"] == "v1"
    with pytest.raises(reg.WaitingForDecision, match="2018-04-22"):
        r.champion_as_of(T2)  # never the merely newest model
    make_version(r, "v2", T2)
    r.record_decision(decision(T2, "v2"))
    # a later model never affects an earlier date
    assert r.champion_as_of(date(2018, 4, 21))["version"] == "v1"
    champion = r.champion_as_of(date(2018, 4, 25))
    assert champion["version"] == "v2" and champion["champion_since"] == "2018-04-22"
    assert champion["path"].endswith("models/versions/v2")
    # a refused candidate keeps the previous champion
    make_version(r, "v3", T3)
    r.record_decision(decision(T3, "v2", outcome=reg.REFUSED, candidate="v3"))
    assert r.champion_as_of(date(2018, 5, 1))["version"] == "v2"
    statuses = {v["version"]: (v["status"], v["champion_from"]) for v in r.versions()}
    assert statuses == {
        "v1": ("retired", ["2018-04-15"]),
        "v2": ("champion", ["2018-04-22"]),
        "v3": ("refused", []),
    }


def test_rollback_takes_effect_from_its_date_only(lake):
    r = reg.Registry(lake, SCHEDULE)
    for name, day in (("v1", T1), ("v2", T2), ("v3", T3)):
        make_version(r, name, day)
    r.record_decision(decision(T1, "v1"))
    r.record_decision(decision(T2, "v2"))
    r.add_event("rollback", "v1", "2018-04-25", "v2 alerts look wrong")
    assert r.champion_as_of(date(2018, 4, 24))["version"] == "v2"
    rolled = r.champion_as_of(date(2018, 4, 25))
    assert rolled["version"] == "v1" and "rollback" in rolled["source"]
    assert r.champion_before(T3)["version"] == "v1"  # what T3's candidate is compared with
    r.record_decision(decision(T3, "v3"))
    assert r.champion_as_of(T3)["version"] == "v3"
    assert r.champion_as_of(date(2018, 4, 26))["version"] == "v1"
    # an event on a decision day wins over that day's decision
    r.add_event("promote", "v2", T3, "manual override")
    assert r.champion_as_of(T3)["version"] == "v2"
    with pytest.raises(reg.RegistryError, match="unknown version"):
        r.add_event("rollback", "nope", T3, "x")


def test_versions_are_immutable(lake):
    r = reg.Registry(lake, SCHEDULE)
    make_version(r, "v1")
    make_version(r, "v1")  # same bytes: fine
    with pytest.raises(reg.RegistryError, match="other checkpoint bytes"):
        r.register_version("v1", {reg.CHECKPOINT: b"different"}, {"train_day": T1.isoformat()})


def _race(n: int, fn):
    barrier = threading.Barrier(n)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_concurrent_writers_of_one_decision_exactly_one_wins(any_lake):
    r = reg.Registry(any_lake, SCHEDULE)
    names = [make_version(r, f"v{i}") for i in range(6)]
    for _ in range(3):  # a few rounds: same-date races on a fresh record each time
        day = SCHEDULE.training_days(T1, date(2018, 6, 30))[len(r.decisions())]
        results = _race(len(names), lambda i, day=day: r.record_decision(decision(day, names[i])))
        outcomes = [o for _, o in results]
        assert outcomes.count("created") == 1 and outcomes.count("conflict") == len(names) - 1
        winner = next(rec for rec, o in results if o == "created")
        assert all(rec == winner for rec, _ in results)  # losers see the winner's record
        assert r.decision(day) == winner  # and it is stored whole
        raw = any_lake.read_bytes(r._decision_path(day))
        assert json.loads(raw) == winner


def test_concurrent_manual_events_get_distinct_numbers(any_lake):
    r = reg.Registry(any_lake, SCHEDULE)
    make_version(r, "v1")
    events = _race(4, lambda i: r.add_event("promote", "v1", T1, f"writer {i}"))
    assert sorted(e["seq"] for e in events) == [0, 1, 2, 3]
    assert sorted(e["reason"] for e in r.events()) == [f"writer {i}" for i in range(4)]


def test_cli_list_promote_rollback_show(lake, lake_uri, capsys):
    r = reg.Registry(lake, SCHEDULE)
    make_version(r, "v1")
    make_version(r, "v2")
    assert reg.main(["--lake", lake_uri, "promote", "v1", "--from", "2018-04-10", "--reason", "bootstrap"]) == 0
    assert reg.main(["--lake", lake_uri, "rollback", "--to", "v2", "--from", "2018-04-12", "--reason", "x"]) == 0
    assert reg.main(["--lake", lake_uri, "list"]) == 0
    out = capsys.readouterr().out
    assert "v2" in out and "champion" in out
    assert reg.main(["--lake", lake_uri, "show", "v1"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert reg.main(["--lake", lake_uri, "show", "nope"]) == 2
