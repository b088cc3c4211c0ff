"""`airflow backfill create` against a real scheduler gives, for every date, the partitions a sequential
run gives, with max_active_runs > 1 and partitions written out of date order; rerunning a date
replaces only its partitions, even when later models already exist.

Airflow runs here as it is deployed: PostgreSQL metadata, a Redis broker and a Celery worker (the
``celery`` profile of deploy/local_airflow.py: real servers from pip wheels), with the API server,
scheduler and DAG processor. The embedded default (SQLite, LocalExecutor) runs the nightly DAG in
tests/test_production.py.

Small world: 60 customers / 120 terminals, first date 2018-04-01, training every 2 days on a
2-day window, so the first training day is 2018-04-11 and the next 2018-04-13. History 04-01 ..
04-09 is bootstrapped once with the range commands and copied into both lakes; the backfill covers
04-10 .. 04-13 (a date before the first champion, the first training day, an ordinary day and a
later training day) with max_active_runs 2. The landing of 04-10 is held back until the run of
04-11 has landed and waits for the clean history its label events are checked against (the order a
real late delivery gives: a later day's data is there first, and its run waits instead of going
ahead with a gap). The reference
is the sequential pipeline built with the range commands in another lake, while the backfill runs.

While a Spark step of the backfill runs, the Celery worker is crashed with every process under it
(the task, spark-submit, the JVM: a worker host going down) and a new one started: the scheduler
fails the lost try once its heartbeat stops, retries it on the new worker, and the outputs still
equal the sequential run.

The rerun (`airflow backfill create --reprocess-behavior completed` for 04-12, a non-training day
scored by the 04-11 champion) happens after the 04-13 model exists: its scores must not change.

Runs finishing strictly out of date order cannot be forced with lake inputs: every run waits for the
clean partitions of all earlier days (features need 37 days of history), so a later run always
finishes after the earlier run's clean; what else finishes first is up to the scheduler. The
actual finish order is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from pipeline import SMALL, SPARK_OPTIONS, TEST_JAVA_OPTIONS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))

pytestmark = pytest.mark.slow

FIRST = date(2018, 4, 1)
START, END = date(2018, 4, 10), date(2018, 4, 13)
FIRST_TRAINING, LATER_TRAINING = date(2018, 4, 11), date(2018, 4, 13)
LATE = date(2018, 4, 10)  # its landing arrives after the run of 04-11 is waiting for it
RERUN = date(2018, 4, 12)
WORLD = {**SMALL, "FRAUD_TRAIN_EVERY_DAYS": "2"}  # four nights hold both training days and one between
DATASETS = ("clean/transactions", "features/transactions", "scores/transactions", "alerts/cards")


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def _env(lake_uri: str) -> dict[str, str]:
    return {
        **os.environ,
        **WORLD,
        "FRAUD_LAKE_URI": lake_uri,
        "PYTHONPATH": str(REPO),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }


def _run(argv: list[str], lake_uri: str, ok=(0,)) -> None:
    proc = subprocess.run(argv, cwd=REPO, env=_env(lake_uri), capture_output=True, text=True)
    assert proc.returncode in ok, f"{' '.join(argv)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _spark(job: str, lake_uri: str, start: date, end: date) -> None:
    submit = str(Path(sys.executable).parent / "spark-submit")
    _run([submit, *SPARK_OPTIONS, f"jobs/spark/{job}.py", "--lake", lake_uri,
          "--start", start.isoformat(), "--end", end.isoformat()], lake_uri)  # fmt: skip


def _training_days() -> list[date]:
    from jobs.common.calendar import TrainingSchedule

    schedule = TrainingSchedule(FIRST, int(WORLD["FRAUD_TRAIN_EVERY_DAYS"]), int(WORLD["FRAUD_TRAIN_WINDOW_DAYS"]))
    assert schedule.first_training_day == FIRST_TRAINING
    days = schedule.training_days(START, END)
    assert days == [FIRST_TRAINING, LATER_TRAINING]
    return days


def _history_before_start() -> dict[str, list[date]]:
    """What the backfilled runs read from before START, as the step contracts declare it."""
    from jobs.common.calendar import Calendar
    from jobs.common.contracts import ORDER, upstream

    cal = Calendar(FIRST, train_every_days=int(WORLD["FRAUD_TRAIN_EVERY_DAYS"]),
                   train_window_days=int(WORLD["FRAUD_TRAIN_WINDOW_DAYS"]))
    runs = [(step, day) for day in _days(START, END) for step in ORDER]
    return {ds: [d for d in days if d < START] for ds, days in upstream(runs, cal).items()}


@pytest.fixture(scope="module")
def history_lake(tmp_path_factory) -> Path:
    """Generated landing data for FIRST .. END and the clean/features history the runs read before START."""
    root = tmp_path_factory.mktemp("history") / "lake"
    uri = root.as_uri()
    _run([sys.executable, "-m", "jobs.datagen", "--lake", uri, "--start", FIRST.isoformat(), "--days",
          str((END - FIRST).days + 1), "--customers", "60", "--terminals", "120", "--seed", "7"], uri)  # fmt: skip
    history = _history_before_start()
    for job, dataset in (("clean", "clean/transactions"), ("features", "features/transactions")):
        assert history[dataset] == _days(FIRST, START - timedelta(days=1)), (dataset, history[dataset])
        _spark(job, uri, history[dataset][0], history[dataset][-1])
    return root


def _build_sequential(history_lake: Path, root: Path) -> str:
    """The reference: the same data through the range commands, in date order."""
    shutil.copytree(history_lake, root)
    uri = root.as_uri()
    _spark("clean", uri, START, END)
    _spark("features", uri, START, END)
    for day in _training_days():
        _run([sys.executable, "-m", "jobs.torch.train", "--lake", uri, "--date", day.isoformat()], uri)
    _run([sys.executable, "-m", "jobs.torch.score", "--lake", uri, "--start", START.isoformat(),
          "--end", END.isoformat(), "--k", WORLD["FRAUD_ALERT_K"]], uri)  # fmt: skip
    return uri


@pytest.fixture(scope="module")
def sequential_build(history_lake, tmp_path_factory):
    """The reference, built in the background while the backfill runs (its own lake, its own processes)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(_build_sequential, history_lake, tmp_path_factory.mktemp("sequential") / "lake")


@pytest.fixture(scope="module")
def sequential_lake(sequential_build) -> str:
    return sequential_build.result(timeout=1800)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """PostgreSQL and Redis on 127.0.0.1 (from the pip wheels of requirements.txt)."""
    from local_services import Postgres, Redis

    root = tmp_path_factory.mktemp("services")
    postgres, redis = Postgres(root / "postgres"), Redis(root / "redis")
    try:
        yield postgres.start(), redis.start()
    finally:
        redis.stop()
        postgres.remove()


@pytest.fixture(scope="module")
def airflow_up(history_lake, services, tmp_path_factory):
    """API server, scheduler, DAG processor and a Celery worker on PostgreSQL and Redis, over a copy
    of the history lake."""
    from local_airflow import LocalAirflow

    from jobs.common.lake import Lake

    root = tmp_path_factory.mktemp("backfill")
    shutil.copytree(history_lake, root / "lake")
    uri = (root / "lake").as_uri()
    lake = Lake.from_uri(uri)
    lake.unmark_landing_done(LATE)
    extra = {
        **WORLD,
        "FRAUD_POKE_SECONDS": "2", "FRAUD_SENSOR_MODE": "poke", "FRAUD_MAX_ACTIVE_RUNS": "2",
        "FRAUD_WAIT_TIMEOUT_HOURS": "1",
        "FRAUD_SPARK_CONF": json.dumps({"spark.driver.extraJavaOptions": TEST_JAVA_OPTIONS}),
        # the worker is crashed mid-backfill: its lost try fails once its heartbeat has been silent
        # for 20 s, and its one retry runs a second later on the new worker
        "FRAUD_RETRIES": "1", "FRAUD_RETRY_DELAY_SECONDS": "1",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
        # Poke mode: with a poke interval this short, a reschedule-mode sensor is re-queued before
        # LocalExecutor reports its previous poke, and the scheduler then marks it failed (a race in
        # Airflow 3.3 seen here; the production interval, 120 s, is far longer than that lag).
        # Only backfill runs: the DAG is unpaused (a paused DAG's tasks are never scheduled, backfill
        # runs included), and with the job schedule on, the scheduler would also start tonight's run.
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
    }  # fmt: skip
    postgres, redis = services
    af = LocalAirflow(root / "airflow", uri, parallelism=3, extra_env=extra,
                      celery=(postgres.sqlalchemy_url, redis.url))
    try:
        af.init()
        af.start("api-server", "dag-processor", "scheduler", "celery-worker")
        af.wait_ready()
        af.wait_for_dag("fraud_nightly")
        yield af, lake
    finally:
        af.stop()


def _release_late_landing(af, lake, timeout: float = 900) -> None:
    """Write the held-back _SUCCESS of LATE once the next day's run waits for LATE's clean partition."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, af.log_tail("scheduler")
        af._check_alive()
        runs = {r["logical_date"][:10]: r["dag_run_id"] for r in af.dag_runs("fraud_nightly")}
        run_id = runs.get((LATE + timedelta(days=1)).isoformat())
        if run_id:
            states = {t["task_id"]: t["state"] for t in af.task_instances("fraud_nightly", run_id)}
            if states.get("wait_for_landing") == "success" and states.get("wait_for_label_history") in (
                    "running", "up_for_reschedule"):
                break
        time.sleep(2)
    assert not lake.is_published("clean/transactions", LATE) and not lake.is_published("clean/transactions", LATE + timedelta(days=1))
    lake.mark_landing_done(LATE)


def _crash_the_worker_during_a_step(af, timeout: float = 900) -> tuple[str, str, int]:
    """Once a Spark step has run a few seconds, SIGKILL the Celery worker with every process under
    it (the task processes, spark-submit and the JVM: what a worker host or container going down
    takes with it), then start a new worker. Returns the step's (run id, task id, try).

    Every killed process is gone before the new worker starts, so the step's next try is the only
    writer of its partitions: none is written twice at once."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, af.log_tail("scheduler")
        af._check_alive()
        running = [(run["dag_run_id"], t) for run in af.dag_runs("fraud_nightly") if run["state"] == "running"
                   for t in af.task_instances("fraud_nightly", run["dag_run_id"])
                   if t["task_id"] in ("clean", "features") and t["state"] == "running" and t["start_date"]]  # fmt: skip
        now = datetime.now(UTC)
        ripe = [(r, t) for r, t in running if (now - datetime.fromisoformat(t["start_date"])).total_seconds() > 8]
        if ripe:
            break
        time.sleep(1)
    run_id, ti = ripe[0]
    killed = af.crash("celery-worker")
    assert any("spark" in command for command in killed.values()), killed  # the step's Spark went with it
    print(f"crashed the worker during {ti['task_id']} of {run_id}: {len(killed)} processes killed")
    af.start("celery-worker")
    return run_id, ti["task_id"], ti["try_number"]


@pytest.fixture(scope="module")
def backfilled(sequential_build, airflow_up):
    """The lake filled by one `airflow backfill create` over START .. END; yields (airflow, lake, runs)."""
    af, lake = airflow_up
    backfill_id = af.backfill("fraud_nightly", "--from-date", START.isoformat(), "--to-date", END.isoformat(),
                              "--max-active-runs", "2")  # fmt: skip
    _release_late_landing(af, lake)
    crashed = _crash_the_worker_during_a_step(af)
    runs = af.wait_for_backfill("fraud_nightly", backfill_id, timeout=1500)
    run_id, task_id, try_number = crashed
    again = next(t for t in af.task_instances("fraud_nightly", run_id) if t["task_id"] == task_id)
    assert again["state"] == "success" and again["try_number"] > try_number, again  # run again, to the end
    finished = sorted(runs, key=lambda r: r["end_date"] or "")
    print("finish order:", [r["logical_date"][:10] for r in finished])
    return af, lake, runs


def _content(lake_uri: str, dataset: str, day: date):
    from jobs.common.lake import Lake, NotPublished

    lake = Lake.from_uri(lake_uri)
    try:
        table = lake.read_table(dataset, day)
    except NotPublished:
        return None
    keys = [c for c in ("TRANSACTION_ID", "rank", "CUSTOMER_ID") if c in table.column_names][:1]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


def test_backfill_runs_all_succeed_in_parallel(backfilled):
    af, lake, runs = backfilled
    assert [r["state"] for r in runs] == ["success"] * len(runs), [(r["dag_run_id"], r["state"]) for r in runs]
    assert sorted(r["logical_date"][:10] for r in runs) == [d.isoformat() for d in _days(START, END)]
    assert all(r["run_type"] == "backfill" for r in runs)
    # max_active_runs 2 was used: some two runs were in flight at the same time
    spans = sorted((r["start_date"], r["end_date"]) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    # the held-back day was cleaned after the next one
    late, next_day = (os.path.getmtime(os.path.join(lake.partition_path("clean/transactions", d), "_MANIFEST.json"))
                      for d in (LATE, LATE + timedelta(days=1)))  # fmt: skip
    assert late < next_day  # the next day waited for the late one: no label event checked against a gap


MODEL_OUTPUTS = ("scores/transactions", "alerts/cards")


def _by_training(lake_uri: str, rows: list[dict] | None) -> list[dict] | None:
    """Rows with each model version replaced by its training key (recipe + exact inputs).

    A version is named by the hash of its checkpoint bytes. CPU training here is deterministic
    across runs, threads and load (checked many times over), yet once in about 30 processes a
    run's first forward pass came out one float32 ulp apart, and the weights ended up about 1e-6
    apart. The scores agreed to every printed digit, but the checkpoint hash, and so the name,
    changed. So the model a row came from is compared by what it was trained on. Its scores
    are compared to 1e-6.
    """
    from jobs.common.lake import Lake
    from jobs.torch.registry import Registry

    if rows is None:
        return None
    registry, keys = Registry(Lake.from_uri(lake_uri)), {}
    for row in rows:
        if row.get("model_version") is not None:
            name = row["model_version"]
            keys.setdefault(name, registry.version(name)["training_key"])
            row["model_version"] = keys[name]
    return rows


def _assert_same_rows(got: list[dict] | None, want: list[dict] | None, what: str, tolerance: float) -> None:
    assert (got is None) == (want is None), what
    if got is None:
        return
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys(), what
        for column, value in g.items():
            if isinstance(value, float) and tolerance:
                assert abs(value - w[column]) <= tolerance, f"{what}: {column} {value} vs {w[column]}"
            else:
                assert value == w[column], f"{what}: {column} {value!r} vs {w[column]!r} (row {g})"


def test_backfill_equals_sequential(backfilled, sequential_lake):
    _, lake, _ = backfilled
    for day in _days(START, END):
        for dataset in DATASETS:
            got, want = _content(lake.uri, dataset, day), _content(sequential_lake, dataset, day)
            if dataset in MODEL_OUTPUTS:
                got, want = _by_training(lake.uri, got), _by_training(sequential_lake, want)
            what = f"{dataset} {day} differs from the sequential run"
            _assert_same_rows(got, want, what, tolerance=1e-6 if dataset in MODEL_OUTPUTS else 0.0)
    # before the first champion nothing is scored; from the first training day on, every day is
    for day in _days(START, END):
        scored = _content(lake.uri, "scores/transactions", day) is not None
        assert scored == (day >= FIRST_TRAINING), day
    # each day is scored by the champion as of that day, never by a later model
    versions = {d: {r["model_version"] for r in _content(lake.uri, "scores/transactions", d)}
                for d in _days(FIRST_TRAINING, END)}  # fmt: skip
    assert versions[FIRST_TRAINING] == versions[RERUN]
    assert len(versions[LATER_TRAINING]) == 1


def test_rerun_replaces_only_its_partitions_and_newest_first_is_refused(backfilled):
    """The rerun of RERUN is asked newest first, with the night after it (`--run-backwards`): that
    night would wait for RERUN while holding the only run slot, so it fails at once saying why,
    and changes nothing; RERUN then runs and is replaced by the same content."""
    from jobs.torch.registry import Registry

    af, lake, _ = backfilled
    refused = RERUN + timedelta(days=1)
    # the later training day's decision exists: a rerun of RERUN must still use the 04-11 champion
    assert Registry(lake).decision(LATER_TRAINING) is not None
    before = {(ds, d): lake.manifest(ds, d) for ds in DATASETS for d in _days(FIRST, END)}
    contents = {ds: _content(lake.uri, ds, RERUN) for ds in DATASETS}
    backfill_id = af.backfill("fraud_nightly", "--from-date", RERUN.isoformat(), "--to-date", refused.isoformat(),
                              "--run-backwards", "--reprocess-behavior", "completed", "--max-active-runs", "1")  # fmt: skip
    runs = {r["logical_date"][:10]: r for r in af.wait_for_backfill("fraud_nightly", backfill_id, timeout=900)}
    assert runs[RERUN.isoformat()]["state"] == "success"
    assert runs[refused.isoformat()]["state"] == "failed"
    run_id = runs[refused.isoformat()]["dag_run_id"]
    plan = next(t for t in af.task_instances("fraud_nightly", run_id) if t["task_id"] == "plan")
    assert plan["state"] == "failed", plan
    from urllib.parse import quote

    status, log = af.api("GET", f"/dags/fraud_nightly/dagRuns/{quote(run_id, safe='')}/taskInstances/plan/logs/"
                                f"{plan['try_number']}")
    assert status == 200 and "create it without --run-backwards" in str(log), str(log)[-2000:]
    for (ds, d), manifest in before.items():
        now = lake.manifest(ds, d)
        if d == RERUN:
            assert now["attempt"] != manifest["attempt"], (ds, d)
            assert _content(lake.uri, ds, d) == contents[ds], (ds, d)
        else:
            assert now == manifest, f"{ds} {d} changed by the rerun of {RERUN}"

