"""The nightly fraud DAG: wiring only (the steps are in jobs/, the operators in plugins/fraud_ops)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, task
from fraud_ops.config import orchestration
from fraud_ops.notify import notify_failure
from fraud_ops.runners import LocalProcessOperator, torch_task
from fraud_ops.sensors import DecisionSensor, LandingSensor, PartitionsSensor
from fraud_ops.spark import SparkJobOperator

from jobs.common.config import EXIT_NO_CHAMPION, settings
from jobs.common.schedule import MODEL_HISTORY_DAYS

CFG = orchestration()
STEP = settings()

CLEAN = Asset(name="fraud_clean_transactions", group="fraud_lake")
QUARANTINE = Asset(name="fraud_quarantine_transactions", group="fraud_lake")
FEATURES = Asset(name="fraud_features_transactions", group="fraud_lake")
MODELS = Asset(name="fraud_models", group="fraud_lake")
SCORES = Asset(name="fraud_scores_transactions", group="fraud_lake")
ALERTS = Asset(name="fraud_alerts_cards", group="fraud_lake")
REPORTS = Asset(name="fraud_reports", group="fraud_lake")

DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"


@dag(
    schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
    start_date=datetime.combine(STEP.first_date, datetime.min.time(), tzinfo=UTC),
    catchup=False,
    max_active_runs=CFG.max_active_runs,
    tags=["fraud", "spark", "pytorch", "nightly"],
    default_args={
        "owner": "fraud-data-platform",
        "retries": CFG.retries,
        "retry_delay": timedelta(seconds=CFG.retry_delay_seconds),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(hours=1),
        "execution_timeout": timedelta(minutes=CFG.task_timeout_minutes),
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

    1. **wait_for_landing** waits for `landing/transactions/date=D/_SUCCESS`;
    2. **clean** (Spark) types, dedupes and validates D into `clean/` and `quarantine/`;
    3. **wait_for_clean_history** waits for the clean days D-37 .. D-1 the features need (days
       before the pipeline's first date never existed and are not waited for), then
       **quality_gate** fails the run on a high quarantine share, an empty day or a collapsed volume;
    4. **features** (Spark) computes the behavioural features of D;
    5. **train_today** branches: on a training day (or with *force_retrain*) **train** (PyTorch,
       on a GPU when the runner has one) trains on the window ending D-8 and decides promotion,
       after **wait_for_training_inputs** (its feature days and the previous training day's decision);
    6. **wait_for_decision** waits for the decision of the latest training day <= D and
       **wait_for_feature_history** for the features of D-7 .. D-1 (the sequence model's card
       history), then **score** scores D with the champion as of D and writes the top-k alerts
       (skipped, with the reason, when there is no champion yet);
    7. **report** writes `reports/date=D/` (JSON and a page with plots).

    Data moves only through the lake (`FRAUD_LAKE_URI`); tasks pass the lake URI and the date.
    Settings: `jobs/common/config.py` (the steps) and `plugins/fraud_ops/config.py` (orchestration).
    """

    @task(multiple_outputs=True)
    def plan(params=None, data_interval_start=None, dag_run=None) -> dict:
        """The day D this run processes (the form's date, else the data interval) and the lake."""
        from datetime import timedelta

        from jobs.common.lake import parse_day

        if params.get("date"):
            day = parse_day(params["date"])
        elif data_interval_start is not None:
            day = data_interval_start.date()
        else:  # a manual run without a logical date: the last complete UTC day
            day = dag_run.run_after.date() - timedelta(days=1)
        return {"day": day.isoformat(), "lake": settings().lake_uri}

    @task
    def quality_gate(lake: str, day: str) -> dict:
        from fraud_ops.config import gate_thresholds
        from fraud_ops.gates import check_day

        return check_day(lake, day, gate_thresholds())

    @task.branch
    def train_today(day: str, params=None) -> str:
        from jobs.common.lake import parse_day
        from jobs.common.schedule import TrainingSchedule

        training = params["force_retrain"] or TrainingSchedule.from_settings().is_training_day(parse_day(day))
        return "wait_for_training_inputs" if training else "no_training"

    run = plan()
    lake, day = run["lake"], run["day"]
    wait = {"poke_interval": CFG.poke_seconds, "timeout": CFG.wait_timeout_hours * 3600, "mode": CFG.sensor_mode}

    landing = LandingSensor(
        task_id="wait_for_landing",
        lake=lake,
        day=day,
        poke_interval=CFG.poke_seconds,
        timeout=CFG.landing_timeout_hours * 3600,
        mode=CFG.sensor_mode,
    )
    clean = SparkJobOperator(
        task_id="clean", job="clean", lake=lake, day=day, conn_id=CFG.spark_conn_id,
        conf=CFG.spark_conf, driver_memory=STEP.spark_driver_memory, outlets=[CLEAN, QUARANTINE],
    )  # fmt: skip
    clean_history = PartitionsSensor(
        task_id="wait_for_clean_history", dataset="clean/transactions", lake=lake, day=day,
        first_back=37, last_back=1, **wait,
    )  # fmt: skip
    features = SparkJobOperator(
        task_id="features", job="features", lake=lake, day=day, conn_id=CFG.spark_conn_id,
        conf=CFG.spark_conf, driver_memory=STEP.spark_driver_memory, outlets=[FEATURES],
    )  # fmt: skip
    training_inputs = PartitionsSensor(  # the windows ending D-8 and D-15, and the history the model reads before them
        task_id="wait_for_training_inputs", dataset="features/transactions", lake=lake, day=day,
        first_back=f"{{{{ {14 + MODEL_HISTORY_DAYS} + params.window_days }}}}", last_back=8, **wait,
    )  # fmt: skip
    previous_decision = DecisionSensor(
        task_id="wait_for_previous_decision", which="previous", lake=lake, day=day, **wait
    )
    train = torch_task(
        "train", "train",
        ["--lake", lake, "--date", day, "--window-days", "{{ params.window_days }}",
         "--model", "{{ params.model }}", "--seed", "{{ params.seed }}"],
        CFG, file_lake_uri=STEP.lake_uri, outlets=[MODELS],
    )  # fmt: skip
    no_training = EmptyOperator(task_id="no_training")
    decision = DecisionSensor(
        task_id="wait_for_decision", which="latest", lake=lake, day=day,
        trigger_rule="none_failed_min_one_success", **wait,
    )  # fmt: skip
    feature_history = PartitionsSensor(  # the sequence model's card and terminal history: features of D-14 .. D-1
        task_id="wait_for_feature_history", dataset="features/transactions", lake=lake, day=day,
        first_back=MODEL_HISTORY_DAYS, last_back=1, **wait,
    )  # fmt: skip
    score = torch_task(
        "score", "score", ["--lake", lake, "--date", day, "--k", "{{ params.k }}"],
        CFG, skip_on_exit_code=EXIT_NO_CHAMPION, file_lake_uri=STEP.lake_uri, outlets=[SCORES, ALERTS],
    )  # fmt: skip
    report = LocalProcessOperator(
        task_id="report", command=["python", "-m", "jobs.report", "--lake", lake, "--date", day],
        trigger_rule="none_failed", outlets=[REPORTS],
    )  # fmt: skip

    gate = quality_gate(lake, day)
    branch = train_today(day)
    landing >> clean >> clean_history >> gate >> features >> branch
    branch >> training_inputs >> previous_decision >> train >> decision
    branch >> no_training >> decision
    decision >> feature_history >> score >> report


fraud_nightly()
