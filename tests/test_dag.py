"""The nightly DAG: imports cleanly, follows the policies, has the expected graph, validates its form."""

from __future__ import annotations

import ast
import os
import re
import sys
from datetime import UTC, timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DAG_FILE = REPO / "dags" / "fraud_nightly.py"

EXPECTED_GRAPH = {
    "plan": {"wait_for_landing"},
    "wait_for_landing": {"wait_for_label_history"},
    "wait_for_label_history": {"clean"},
    "clean": {"wait_for_clean_history"},
    "wait_for_clean_history": {"wait_for_clean_labels"},
    "wait_for_clean_labels": {"quality_gate"},
    "quality_gate": {"features"},
    "features": {"train_today"},
    "train_today": {"wait_for_training_inputs", "no_training"},
    "wait_for_training_inputs": {"wait_for_previous_decision"},
    "wait_for_previous_decision": {"train"},
    "train": {"wait_for_decision"},
    "no_training": {"wait_for_decision"},
    "wait_for_decision": {"wait_for_feature_history"},
    "wait_for_feature_history": {"score"},
    "score": {"report"},
    "report": set(),
}


@pytest.fixture(autouse=True)
def _airflow_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.syspath_prepend(str(REPO / "plugins"))


def load_dag(monkeypatch=None, **env):
    from airflow.dag_processing.dagbag import DagBag

    for name, value in env.items():
        os.environ[name] = value
    try:
        sys.modules.pop("fraud_nightly", None)
        bag = DagBag(dag_folder=str(DAG_FILE))
    finally:
        for name in env:
            os.environ.pop(name, None)
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags["fraud_nightly"]


@pytest.fixture(scope="module")
def dag():
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    sys.path.insert(0, str(REPO / "plugins"))
    return load_dag()


def test_module_level_is_wiring_only():
    """No I/O, heavy imports or Variable.get at module level (only inside tasks)."""
    tree = ast.parse(DAG_FILE.read_text())
    heavy = {"pyspark", "torch", "pandas", "pyarrow", "numpy", "sklearn", "matplotlib"}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            assert not any(n.split(".")[0] in heavy for n in names), names
    source = DAG_FILE.read_text()
    assert "Variable.get" not in source
    assert "open(" not in source


def test_policies(dag):
    assert dag.dag_id == "fraud_nightly" == DAG_FILE.stem
    assert dag.doc_md and "Nightly card-fraud pipeline" in dag.doc_md
    assert dag.catchup is True  # missed nights run when the scheduler is back (FRAUD_CATCHUP)
    assert {"fraud", "nightly"} <= set(dag.tags)
    assert dag.start_date.date().isoformat() == "2018-04-01"
    assert dag.max_active_runs == 2
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    for task in dag.tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        expected = {"clean": 90, "features": 120, "train": 240, "score": 60, "report": 30}.get(task.task_id, 10)
        assert task.execution_timeout == timedelta(minutes=expected), task.task_id
        assert task.on_failure_callback, task.task_id


def test_data_interval_is_one_utc_day_and_runs_after_it(dag):
    from datetime import datetime

    from airflow.timetables.base import TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable

    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 0 * * *", "UTC")
    core = CronDataIntervalTimetable(dag.timetable.expression, dag.timetable.timezone)
    restriction = TimeRestriction(earliest=dag.start_date, latest=None, catchup=True)
    info = core.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    assert info.data_interval.start == datetime(2018, 4, 1, tzinfo=UTC)
    assert info.data_interval.end == datetime(2018, 4, 2, tzinfo=UTC)
    assert info.run_after == info.data_interval.end


def test_flow_without_plan_edges(dag):
    flow = {t.task_id: set(t.downstream_task_ids) for t in dag.tasks}
    flow["plan"] = flow["plan"] & {"wait_for_landing"}
    assert flow == EXPECTED_GRAPH


def test_operators_and_trigger_rules(dag):
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    clean, features = dag.get_task("clean"), dag.get_task("features")
    for task, job in ((clean, "clean"), (features, "features")):
        assert isinstance(task, SparkSubmitOperator)
        assert task.application == f"jobs/spark/{job}.py"
        assert task._conn_id == "spark_default"
        assert task.connect_conn_id is None  # spark-submit unless FRAUD_SPARK_CONNECT_CONN_ID names a server
    for sensor in ("wait_for_landing", "wait_for_clean_history", "wait_for_decision"):
        assert dag.get_task(sensor).deferrable  # a waiting sensor's looks run in the triggerer
    assert dag.get_task("wait_for_decision").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("report").trigger_rule == "all_done"  # reports a day whose steps failed, with why
    assert dag.get_task("score").skip_on_exit_code == (99,)
    assert dag.get_task("train").pool == dag.get_task("score").pool == "gpu"
    outlets = {t.task_id: {a.name for a in t.outlets} for t in dag.tasks if t.outlets}
    assert outlets == {
        "clean": {"fraud_clean_transactions", "fraud_quarantine_transactions", "fraud_clean_labels"},
        "features": {"fraud_features_transactions"},
        "train": {"fraud_models"},
        "score": {"fraud_scores_transactions", "fraud_alerts_cards"},
        "report": {"fraud_reports"},
    }


def test_max_active_runs_is_configurable(monkeypatch):
    assert load_dag(FRAUD_MAX_ACTIVE_RUNS="4").max_active_runs == 4


def test_nights_missed_by_the_scheduler_are_run_when_it_is_back(dag):
    """With catch-up on, the night after the last scheduled one is next, however long the scheduler
    was down; off (the local launcher), the scheduler jumps to the latest night."""
    from datetime import datetime

    from airflow.timetables.base import DataInterval, TimeRestriction
    from airflow.timetables.interval import CronDataIntervalTimetable

    core = CronDataIntervalTimetable(dag.timetable.expression, dag.timetable.timezone)  # what the scheduler runs
    last = DataInterval(datetime(2018, 5, 1, tzinfo=UTC), datetime(2018, 5, 2, tzinfo=UTC))
    for catchup, expected in ((dag.catchup, datetime(2018, 5, 2, tzinfo=UTC)), (False, None)):
        restriction = TimeRestriction(earliest=dag.start_date, latest=None, catchup=catchup)
        info = core.next_dagrun_info(last_automated_data_interval=last, restriction=restriction)
        if expected is None:
            assert info.data_interval.start > datetime(2026, 1, 1, tzinfo=UTC)  # skipped to the latest
        else:
            assert info.data_interval.start == expected
    assert load_dag(FRAUD_CATCHUP="false").catchup is False


def test_step_timeouts_are_configurable():
    dag = load_dag(FRAUD_TASK_TIMEOUT_MINUTES='{"train": 600, "default": 5}')
    assert dag.get_task("train").execution_timeout == timedelta(minutes=600)
    assert dag.get_task("clean").execution_timeout == timedelta(minutes=90)
    assert dag.get_task("plan").execution_timeout == timedelta(minutes=5)
    with pytest.raises(AssertionError, match="no task"):
        load_dag(FRAUD_TASK_TIMEOUT_MINUTES='{"trian": 600}')


@pytest.mark.parametrize(
    "conf",
    [
        {"date": "2018-13-45"},
        {"date": "2018-04-01; rm -rf /"},
        {"date": 20180401},
        {"force_retrain": "yes"},
        {"model": "xgboost"},
        {"window_days": 0},
        {"window_days": 1000},
        {"k": -1},
        {"k": "100 --evil"},
    ],
)
def test_bad_params_are_refused(dag, conf):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises((ParamValidationError, ValueError)):
        _validated(dag, conf)


def test_good_params_pass(dag):
    from jobs.common.config import settings

    values = _validated(dag, {"date": "2018-05-02", "force_retrain": True, "model": "seq", "k": 50})
    assert values["date"] == "2018-05-02" and values["model"] == "seq"
    assert values["window_days"] == settings().train_window_days  # the product default


def _validated(dag, conf: dict) -> dict:
    import copy

    params = copy.deepcopy(dag.params)
    for key, value in conf.items():
        params[key] = value  # validates the value against the Param's JSON schema
    return params.validate()


def test_the_spark_steps_follow_the_spark_connect_setting_and_the_sensors_their_mode():
    dag = load_dag(FRAUD_SPARK_CONNECT_CONN_ID="spark_connect_default", FRAUD_SENSOR_MODE="reschedule")
    assert {dag.get_task(t).connect_conn_id for t in ("clean", "features")} == {"spark_connect_default"}
    landing = dag.get_task("wait_for_landing")
    assert landing.mode == "reschedule" and not landing.deferrable


def test_airflow_processes_of_the_stack_hold_what_a_task_imports_before_they_fork_it(tmp_path):
    """The local stack's settings make every Airflow process load plugins/fraud_preload.py at start, so
    the task runner and the DAG file's imports (fraud_ops, the Spark provider) are already loaded in
    the processes tasks are forked from; the image and compose set the same."""
    import json
    import subprocess

    sys.path.insert(0, str(REPO / "deploy"))
    from local_airflow import LocalAirflow

    af = LocalAirflow(tmp_path / "af", (tmp_path / "lake").as_uri())
    probe = ("import sys, json, airflow; from airflow import plugins_manager as pm; "
             "print(json.dumps({'plugins': [p.name for p in pm._get_plugins()[0]], "
             "'modules': [m for m in ('fraud_ops.spark', 'fraud_ops.sensors', "
             "'airflow.sdk.execution_time.task_runner', "
             "'airflow.providers.apache.spark.operators.spark_submit') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", probe], env=af.env, capture_output=True, text=True, timeout=120,
                         check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fraud_preload" in seen["plugins"]
    assert len(seen["modules"]) == 4, seen
    for deployment in ("Dockerfile", "docker-compose.yaml"):
        assert re.search(r"AIRFLOW__CORE__LAZY_LOAD_PLUGINS[=:] *\"?False", (REPO / deployment).read_text()), deployment
