"""The nightly fraud DAG: wiring only (the steps are in jobs/, the operators in plugins/fraud_ops)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import (
    Asset,
    CronDataIntervalTimetable,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    dag,
    task,
)
from fraud_ops.config import orchestration
from fraud_ops.links import REPORT_LINKS
from fraud_ops.notify import notify_failure
from fraud_ops.runners import LocalProcessOperator, torch_task
from fraud_ops.sensors import DecisionSensor, InputsSensor, LandingSensor
from fraud_ops.spark import SparkJobOperator

from jobs.common.cli import EXIT_NO_CHAMPION
from jobs.common.config import settings
from jobs.common.datasets import Dataset

CFG = orchestration()
STEP = settings()

CLEAN = Asset(name="fraud_clean_transactions", group="fraud_lake")
QUARANTINE = Asset(name="fraud_quarantine_transactions", group="fraud_lake")
LABELS = Asset(name="fraud_clean_labels", group="fraud_lake")
FEATURES = Asset(name="fraud_features_transactions", group="fraud_lake")
MODELS = Asset(name="fraud_models", group="fraud_lake")
SCORES = Asset(name="fraud_scores_transactions", group="fraud_lake")
ALERTS = Asset(name="fraud_alerts_cards", group="fraud_lake")
REPORTS = Asset(name="fraud_reports", group="fraud_lake")

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
# Data that failed the gate fails the same way on a retry: fail at once (any other error retries as usual).
GATE_FAILS_AT_ONCE = ExceptionRetryPolicy(
    rules=[RetryRule(exception="fraud_ops.gates.DataQualityError", action=RetryAction.FAIL,
                     reason="the day's data failed the quality gate: fix the data, then clear the task")]
)


@dag(
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime.combine(STEP.first_date, datetime.min.time(), tzinfo=UTC),
    catchup=CFG.catchup,  # on: nights missed while the scheduler was down run when it is back, oldest first
    max_active_runs=CFG.max_active_runs,
    tags=["fraud", "spark", "pytorch", "nightly"],
    default_args={
        "owner": "fraud-data-platform",
        "retries": CFG.retries,
        "retry_delay": timedelta(seconds=CFG.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(hours=1),
        "execution_timeout": CFG.timeout("default"),  # the steps below set their own
        "on_failure_callback": notify_failure,
    },
    params={
        "date": Param(
            None,
            type=["null", "string"],
            format="date",
            pattern=DATE_PATTERN,
            title="Date to process (YYYY-MM-DD)",
            description="Leave empty to process the run's data interval (the last complete UTC day).",
        ),
        "force_retrain": Param(False, type="boolean", title="Train even if D is not a training day"),
        "model": Param(STEP.model, type="string", enum=["mlp", "seq"], title="Model kind to train"),
        "window_days": Param(
            STEP.train_window_days, type="integer", minimum=1, maximum=90, title="Training window (days)"
        ),
        "k": Param(STEP.alert_k, type="integer", minimum=1, maximum=10000, title="Cards in the alert list"),
        "seed": Param(STEP.seed, type="integer", minimum=0, maximum=2**31 - 1, title="Training seed"),
    },
)
def fraud_nightly():
    """
    ### Nightly card-fraud pipeline

    For every day **D** (the run's one-day UTC data interval; a manual run may name D in the form):

    1. **wait_for_landing** waits for D's transactions and label events to land (`_SUCCESS`), and
       **wait_for_label_history** for the clean days a label event may name;
    2. **clean** (Spark) types, dedupes and validates D's transactions and label events into
       `clean/` and `quarantine/`;
    3. **wait_for_clean_history** waits for the clean history the gate and the features read
       (days before the pipeline's first date never existed and are not waited for), then
       **quality_gate** fails the run on a high quarantine share, an empty day or a collapsed volume;
    4. **features** (Spark) computes the behavioural features of D;
    5. **train_today** branches: on a training day (or with *force_retrain*) **train** (PyTorch,
       on a GPU when the runner has one) trains on the latest labelled window and decides
       promotion, after **wait_for_training_inputs** (its feature days) and
       **wait_for_previous_decision** (decisions are made in date order);
    6. **wait_for_decision** waits for the decision of the latest training day <= D and
       **wait_for_feature_history** for the feature days the model's history reads, then **score**
       scores D with the champion as of D and writes the top-k alerts (skipped, with the reason,
       when there is no champion yet);
    7. **report** writes `reports/date=D/` (JSON and a page with plots), also when a step failed:
       its "Steps" table says which and why. The UI shows it under *Fraud reports*; the extra links
       **Report** and **Alert list** of `score` and `report` open D's pages.

    Every sensor waits for what the step after it reads, as the step contracts declare
    (`jobs/common/contracts.py`, day offsets from `jobs/common/calendar.py`; docs/contract.md).
    Data moves only through the lake (`FRAUD_LAKE_URI`); tasks pass the lake URI and the date.
    Settings: `jobs/common/config.py` (the steps) and `plugins/fraud_ops/config.py` (orchestration).
    """

    @task(multiple_outputs=True)
    def plan(params=None, data_interval_start=None, dag_run=None, ti=None) -> dict:
        """The day D this run processes (the form's date, else the data interval) and the lake.

        A backfill must run oldest first: every night waits for the days before it, so newest
        first (``--run-backwards``) would hold the run slots with nights waiting for nights that
        cannot start. A backfill night whose previous night is still queued fails here at once,
        saying so, and publishes nothing.
        """
        from airflow.sdk.exceptions import AirflowFailException

        from jobs.common.calendar import ONE_DAY, parse_day

        if dag_run.run_type == "backfill" and dag_run.logical_date is not None:
            previous = dag_run.logical_date - ONE_DAY
            if ti.get_dr_count(dag_id=dag_run.dag_id, logical_dates=[previous], states=["queued"]):
                raise AirflowFailException(
                    f"the run of {previous.date()} has not started: a backfill runs nights oldest first "
                    "(every night reads the nights before it); create it without --run-backwards")

        if params.get("date"):
            day = parse_day(params["date"])
        elif data_interval_start is not None:
            day = data_interval_start.date()
        else:  # a manual run without a logical date: the last complete UTC day
            day = dag_run.run_after.date() - ONE_DAY
        return {"day": day.isoformat(), "lake": settings().lake_uri}

    @task(retry_policy=GATE_FAILS_AT_ONCE)
    def quality_gate(lake: str, day: str) -> dict:
        from fraud_ops.config import gate_thresholds
        from fraud_ops.gates import check_day
        from fraud_ops.store import task_lake

        return check_day(task_lake(lake, CFG.aws_conn_id), day, gate_thresholds())

    @task.branch
    def train_today(day: str, params=None) -> str:
        from jobs.common.calendar import TrainingSchedule, parse_day

        training = params["force_retrain"] or TrainingSchedule.from_settings().is_training_day(parse_day(day))
        return "wait_for_training_inputs" if training else "no_training"

    run = plan()
    lake, day = run["lake"], run["day"]
    # a sensor's wait is bounded by its timeout; in poke mode the wait is one execution, so no execution_timeout
    poke_limit = {"execution_timeout": None} if CFG.sensor_mode == "poke" else {}
    wait = {"poke_interval": CFG.poke_seconds, "timeout": CFG.wait_timeout_hours * 3600, "mode": CFG.sensor_mode,
            "aws_conn_id": CFG.aws_conn_id, **poke_limit}
    spark = {"conn_id": CFG.spark_conn_id, "conf": CFG.spark_conf, "driver_memory": STEP.spark_driver_memory,
             "aws_conn_id": CFG.aws_conn_id, "connect_conn_id": CFG.spark_connect_conn_id}

    landing = LandingSensor(
        task_id="wait_for_landing",
        lake=lake,
        day=day,
        poke_interval=CFG.poke_seconds,
        timeout=CFG.landing_timeout_hours * 3600,
        mode=CFG.sensor_mode,
        aws_conn_id=CFG.aws_conn_id,
        **poke_limit,
    )
    label_history = InputsSensor(
        task_id="wait_for_label_history", steps="clean", dataset=Dataset.CLEAN, lake=lake, day=day, **wait,
    )  # fmt: skip
    clean = SparkJobOperator(
        task_id="clean", job="clean", lake=lake, day=day, outlets=[CLEAN, QUARANTINE, LABELS],
        execution_timeout=CFG.timeout("clean"), **spark,
    )  # fmt: skip
    clean_history = InputsSensor(
        task_id="wait_for_clean_history", steps=("quality_gate", "features"), dataset=Dataset.CLEAN,
        lake=lake, day=day, **wait,
    )  # fmt: skip
    labels = InputsSensor(
        task_id="wait_for_clean_labels", steps="features", dataset=Dataset.CLEAN_LABELS, lake=lake, day=day, **wait,
    )  # fmt: skip
    features = SparkJobOperator(
        task_id="features", job="features", lake=lake, day=day, outlets=[FEATURES],
        execution_timeout=CFG.timeout("features"), **spark,
    )  # fmt: skip
    training_inputs = InputsSensor(
        task_id="wait_for_training_inputs", steps="train", dataset=Dataset.FEATURES, lake=lake, day=day,
        window_days="{{ params.window_days }}", **wait,
    )  # fmt: skip
    previous_decision = DecisionSensor(task_id="wait_for_previous_decision", step="train", lake=lake, day=day, **wait)
    train = torch_task(
        "train", "train",
        ["--lake", lake, "--date", day, "--window-days", "{{ params.window_days }}",
         "--model", "{{ params.model }}", "--seed", "{{ params.seed }}"],
        CFG, lake=lake, file_lake_uri=STEP.lake_uri, outlets=[MODELS], execution_timeout=CFG.timeout("train"),
    )  # fmt: skip
    no_training = EmptyOperator(task_id="no_training")
    decision = DecisionSensor(
        task_id="wait_for_decision", step="score", lake=lake, day=day,
        trigger_rule="none_failed_min_one_success", **wait,
    )  # fmt: skip
    feature_history = InputsSensor(
        task_id="wait_for_feature_history", steps="score", dataset=Dataset.FEATURES, lake=lake, day=day, **wait,
    )  # fmt: skip
    score = torch_task(
        "score", "score", ["--lake", lake, "--date", day, "--k", "{{ params.k }}"],
        CFG, lake=lake, skip_on_exit_code=EXIT_NO_CHAMPION, file_lake_uri=STEP.lake_uri, outlets=[SCORES, ALERTS],
        execution_timeout=CFG.timeout("score"), extra_links=REPORT_LINKS,
    )  # fmt: skip
    report = LocalProcessOperator(
        task_id="report", command=["python", "-m", "jobs.report", "--lake", lake, "--date", day],
        lake=lake, aws_conn_id=CFG.aws_conn_id,
        trigger_rule="all_done",  # also on a day whose steps failed: the report says which and why
        outlets=[REPORTS], execution_timeout=CFG.timeout("report"),
        extra_links=REPORT_LINKS,  # the day's report and alert list in the UI (fraud_ops.links)
    )  # fmt: skip

    gate = quality_gate(lake, day)
    branch = train_today(day)
    landing >> label_history >> clean >> clean_history >> labels >> gate >> features >> branch
    branch >> training_inputs >> previous_decision >> train >> decision
    branch >> no_training >> decision
    decision >> feature_history >> score >> report


fraud_nightly()
