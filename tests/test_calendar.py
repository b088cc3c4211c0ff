"""One calendar: every day offset lives in jobs/common/calendar.py, and everything follows it.

The label delay is changed in one place (``FRAUD_LABEL_DELAY_DAYS``, read by the calendar) and the
DAG's sensors, the jobs' windows and the report's look-backs follow; a scan of the code finds no
day-offset literal anywhere else.
"""

from __future__ import annotations

import ast
import sys
from datetime import date
from pathlib import Path

import pytest

from jobs.common import contracts
from jobs.common.calendar import Calendar, calendar, day_range
from jobs.common.lake import Dataset
from jobs.common.schema import CLEAN_SCHEMA, LABEL_EVENT_SCHEMA, SCORES_SCHEMA

REPO = Path(__file__).resolve().parents[1]
D = date(2018, 6, 1)
FIRST = date(2018, 4, 1)


def test_default_offsets_are_the_contract():
    cal = Calendar(FIRST)
    assert cal.feature_inputs(D) == day_range(date(2018, 4, 25), D)  # D-37 .. D
    assert cal.train_window(D, 21) == day_range(date(2018, 5, 4), date(2018, 5, 24))  # 21 days ending D-8
    assert cal.validation_window(D, 21) == day_range(date(2018, 4, 27), date(2018, 5, 17))  # ending D-15
    assert cal.validation_week(D) == day_range(date(2018, 5, 18), date(2018, 5, 24))  # D-14 .. D-8
    assert cal.model_history_days == 14 and cal.terminal_history_days == 14 and cal.card_history_days == 7
    assert cal.gate_trailing(D) == day_range(date(2018, 5, 25), date(2018, 5, 31))
    assert cal.report_matured(D) == day_range(date(2018, 4, 25), date(2018, 5, 24))  # 30 days ending D-8
    assert cal.training_reach(21) == 15 + 21 - 1 + 14


def test_contracts_answer_what_each_step_reads():
    cal = Calendar(FIRST)
    assert contracts.read_days("features", Dataset.CLEAN, D, cal) == cal.feature_inputs(D)
    assert contracts.read_days("score", Dataset.FEATURES, D, cal) == Calendar.span(D, 14)
    assert contracts.read_days("train", Dataset.FEATURES, D, cal, window_days=21) == Calendar.span(D, 49, 8)
    # the sensors never wait for days before the first date
    assert contracts.required_days("features", Dataset.CLEAN, [date(2018, 4, 3)], cal) == day_range(FIRST, date(2018, 4, 3))
    assert contracts.writer_of(Dataset.ALERTS).name == "score"
    assert list(contracts.ORDER) == ["clean", "quality_gate", "features", "train", "score", "report"]


@pytest.fixture
def delay_5(monkeypatch):
    monkeypatch.setenv("FRAUD_LABEL_DELAY_DAYS", "5")
    monkeypatch.setenv("FRAUD_FIRST_DATE", FIRST.isoformat())
    return calendar()


def test_changing_the_label_delay_in_one_place_moves_every_offset(delay_5):
    cal = delay_5
    assert cal.feature_history_days == 35 and cal.last_labelled_offset == 6 and cal.validation_offset == 13
    assert cal.train_window(D, 21)[-1] == date(2018, 5, 26)  # D-6
    assert cal.validation_week(D) == day_range(date(2018, 5, 20), date(2018, 5, 26))  # D-12 .. D-6
    assert cal.terminal_history_days == 12 and cal.model_history_days == 12
    assert cal.report_matured(D)[-1] == date(2018, 5, 26)
    from jobs.torch.train import TrainConfig

    resolved = TrainConfig(date=D.isoformat()).resolved()
    assert resolved.label_delay_days == 5 and resolved.terminal_lookback_days == 12


def test_the_dag_sensors_follow_the_label_delay(delay_5, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from airflow.dag_processing.dagbag import DagBag

    sys.modules.pop("fraud_nightly", None)
    bag = DagBag(dag_folder=str(REPO / "dags" / "fraud_nightly.py"))
    assert bag.import_errors == {}
    dag = bag.dags["fraud_nightly"]

    def waited(task_id: str, window_days: int | None = None) -> list[date]:
        sensor = dag.get_task(task_id)
        sensor.day, sensor.window_days = D.isoformat(), window_days
        return sensor.expected_days()

    assert waited("wait_for_clean_history") == Calendar.span(D, 35)  # features: D-35 .. D (gate's week inside)
    assert waited("wait_for_feature_history") == Calendar.span(D, 12)  # the model's history, D-12 .. D
    assert waited("wait_for_training_inputs", 21) == Calendar.span(D, 13 + 20 + 12, 6)


def test_the_features_job_and_the_report_follow_the_label_delay(delay_5, lake):
    from jobs.report import matured_frame, volume_trend
    from jobs.spark.features import find_inputs

    cal = delay_5
    for day in day_range(date(2018, 4, 20), D):
        lake.write_table(Dataset.CLEAN, day, CLEAN_SCHEMA.empty_table())
        lake.write_table(Dataset.CLEAN_LABELS, day, LABEL_EVENT_SCHEMA.empty_table())
        lake.write_table(Dataset.SCORES, day, SCORES_SCHEMA.empty_table())
    inputs = find_inputs(lake, [D], cal)
    assert len(inputs.files) == 36  # D-35 .. D, one file each
    assert [i["date"] for i in inputs.lineage[D]["inputs"] if i["dataset"] == Dataset.CLEAN] == [
        d.isoformat() for d in Calendar.span(D, 35)]
    days, _, missing = matured_frame(lake, D, cal)
    assert days == day_range(date(2018, 4, 27), date(2018, 5, 26)) and missing == []  # 30 days ending D-6
    assert volume_trend(lake, D, cal)[0]["date"] == "2018-04-27"  # D-35


# --- the scan: no day offset outside the calendar ---------------------------------------------------------
SCANNED = [REPO / "dags", REPO / "plugins", REPO / "jobs"]
EXEMPT = {
    REPO / "jobs" / "common" / "calendar.py",  # the calendar itself
}
EXEMPT_DIRS = {REPO / "jobs" / "datagen"}  # the simulator's own rules (a compromise lasts 28 days), not reads
OFFSET_NAME = ("_days", "_back", "_offset", "days_back", "delay")


def _offending(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "timedelta":
            for arg in [*node.args, *(k.value for k in node.keywords if k.arg in (None, "days"))]:
                for sub in ast.walk(arg):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, int) and sub.value not in (0, 1):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: timedelta with {sub.value}")
        if isinstance(node, ast.keyword) and node.arg and node.arg.lower().endswith(OFFSET_NAME):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, int) and node.value.value not in (0, 1):
                found.append(f"{path.relative_to(REPO)}:{node.value.lineno}: {node.arg}={node.value.value}")
        targets = []
        if isinstance(node, ast.Assign):
            targets = [(t, node.value) for t in node.targets]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [(node.target, node.value)]
        for target, value in targets:
            name = getattr(target, "id", getattr(target, "attr", "")) or ""
            if name.lower().endswith(OFFSET_NAME) and isinstance(value, ast.Constant) \
                    and isinstance(value.value, int) and value.value not in (0, 1):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name} = {value.value}")
    return found


def test_no_day_offset_literal_outside_the_calendar():
    offending = []
    for folder in SCANNED:
        for path in sorted(folder.rglob("*.py")):
            if path in EXEMPT or any(d in path.parents for d in EXEMPT_DIRS):
                continue
            offending += _offending(path)
    assert offending == [], "day offsets belong in jobs/common/calendar.py:\n" + "\n".join(offending)


def test_the_scan_finds_an_offset(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("from datetime import timedelta\nHISTORY_DAYS = 37\nd = timedelta(days=8)\nf(first_back=37)\n")
    assert len(_offending_in(sample)) == 3


def _offending_in(path: Path) -> list[str]:
    global REPO
    saved, REPO = REPO, path.parent
    try:
        return _offending(path)
    finally:
        REPO = saved
