"""Orchestration settings: how Airflow runs the steps (the steps' own settings are in jobs.common.config).

Read from the environment of the process that parses the DAG (scheduler / DAG processor) or runs
the task (worker); every name has a documented default. Credentials are never read here: the
store's come from the AWS Connection named by FRAUD_AWS_CONN_ID (``fraud_ops.store``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _flag(name: str, default: str) -> bool:
    value = _env(name, default).lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value in ("true", "1", "yes", "on")


ENV_DOC = {
    "FRAUD_TORCH_RUNNER": "how train/score run: local (a process on the worker), docker, kubernetes (default local)",
    "FRAUD_IMAGE": "image for the docker and kubernetes runners (default fraud-nightly:latest)",
    "FRAUD_GPU_POOL": "Airflow pool capping concurrent GPU tasks (default gpu)",
    "FRAUD_TRAIN_PROCESSES": "training processes of the train step, one per GPU (default 1; more: torchrun with DDP)",
    "FRAUD_TORCH_QUEUE": "executor queue of the torch tasks (default default; docker-compose's GPU worker takes gpu)",
    "FRAUD_GPU_COUNT": "GPUs requested per torch task by docker/kubernetes (default 1; 0 = CPU only)",
    "FRAUD_DOCKER_URL": "Docker daemon for the docker runner (default unix://var/run/docker.sock)",
    "FRAUD_DOCKER_NETWORK": "Docker network for the torch containers (default: the daemon's default)",
    "FRAUD_K8S_NAMESPACE": "namespace of the torch pods (default default)",
    "FRAUD_K8S_NODE_SELECTOR": 'JSON node selector of the torch pods (default {"nvidia.com/gpu.present": "true"})',
    "FRAUD_K8S_SECRET": "Kubernetes secret the cluster provides for the pods' store credentials (default none: "
                        "the task writes one from the AWS Connection)",
    "FRAUD_AWS_CONN_ID": "AWS Connection of an s3:// lake: keys (login/password, a role or a profile), extra "
                         "endpoint_url and region_name (default aws_default; absent: the worker's AWS environment)",
    "FRAUD_SPARK_CONN_ID": "Airflow connection of spark-submit (default spark_default)",
    "FRAUD_SPARK_CONF": "JSON dict of extra --conf for spark-submit (default {})",
    "FRAUD_SPARK_CONNECT_CONN_ID": "a spark_connect Airflow Connection: the Spark steps run on that warm Spark Connect "
                                   "server instead of a spark-submit each (default none: spark-submit; `make up` "
                                   "and docker-compose set spark_connect_default)",
    "FRAUD_CATCHUP": "true (default): nights missed while the scheduler was down run when it is back, oldest first, "
                     "from FRAUD_FIRST_DATE on; false: only the latest night (the local launcher's default)",
    "FRAUD_MAX_ACTIVE_RUNS": "runs of the nightly DAG in flight at once (default 2)",
    "FRAUD_RETRIES": "task retries (default 2)",
    "FRAUD_RETRY_DELAY_SECONDS": "first retry delay, doubled each retry (default 60)",
    "FRAUD_TASK_TIMEOUT_MINUTES": "execution_timeout in minutes: a JSON dict by task (clean, features, train, score, "
                                  "report, default: every other task and each sensor poke; missing keys keep their "
                                  "defaults: clean 90, features 120, train 240, score 60, report 30, default 10), "
                                  "or one number for every task",
    "FRAUD_POKE_SECONDS": "how often a waiting sensor looks at the lake (default 30; `make up`: 5)",
    "FRAUD_SENSOR_MODE": "deferrable (the default: a waiting sensor hands the wait to the triggerer, which looks at "
                         "the lake every FRAUD_POKE_SECONDS), reschedule (each look a short task) or poke",
    "FRAUD_LANDING_TIMEOUT_HOURS": "how long to wait for the landing _SUCCESS (default 12)",
    "FRAUD_WAIT_TIMEOUT_HOURS": "how long to wait for history partitions and decisions (default 24)",
    "FRAUD_GATE_MAX_QUARANTINE_SHARE": "fail the run if quarantined/rows_in exceeds this (default 0.05)",
    "FRAUD_GATE_MIN_VOLUME_RATIO": "fail if clean rows < this x the trailing-week median (default 0.5)",
    "FRAUD_GATE_MAX_VOLUME_RATIO": "fail if clean rows > this x the trailing-week median (default 3.0)",
    "FRAUD_GATE_MIN_TRAILING_DAYS": "judge volume only with at least this many published trailing days (default 3)",
    "FRAUD_NOTIFY_WEBHOOK_URL": "POST a JSON message here when a task fails (default: log only)",
}


@dataclass(frozen=True)
class Orchestration:
    torch_runner: str
    image: str
    gpu_pool: str
    torch_queue: str
    train_processes: int
    gpu_count: int
    docker_url: str
    docker_network: str | None
    k8s_namespace: str
    k8s_node_selector: dict = field(hash=False)
    k8s_secret: str | None
    aws_conn_id: str
    spark_conn_id: str
    spark_conf: dict = field(hash=False)
    spark_connect_conn_id: str | None
    catchup: bool
    max_active_runs: int
    retries: int
    retry_delay_seconds: int
    task_timeout_minutes: dict = field(hash=False)  # task id (or "default") -> minutes
    poke_seconds: int
    sensor_mode: str
    landing_timeout_hours: float
    wait_timeout_hours: float
    notify_webhook_url: str | None

    def timeout(self, task: str) -> timedelta:
        """The execution_timeout of a task (its step's, else the default)."""
        minutes = self.task_timeout_minutes
        return timedelta(minutes=minutes.get(task, minutes["default"]))


# Each step's execution_timeout (minutes): a hung step fails and retries instead of holding its
# slot forever; sized for the default data with a wide margin ("default": the small tasks and every
# poke of a sensor; a sensor's wait as a whole is bounded by its own timeout).
TASK_TIMEOUT_MINUTES = {"clean": 90, "features": 120, "train": 240, "score": 60, "report": 30, "default": 10}


def _task_timeouts(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return dict.fromkeys(TASK_TIMEOUT_MINUTES, float(value))
    if not isinstance(value, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value.values()):
        raise ValueError(f"FRAUD_TASK_TIMEOUT_MINUTES must be a number of minutes or a JSON dict of them, got {text!r}")
    unknown = set(value) - set(TASK_TIMEOUT_MINUTES)
    if unknown:
        raise ValueError(f"FRAUD_TASK_TIMEOUT_MINUTES: no task {sorted(unknown)} (tasks: {sorted(TASK_TIMEOUT_MINUTES)})")
    return {**TASK_TIMEOUT_MINUTES, **{k: float(v) for k, v in value.items()}}


@dataclass(frozen=True)
class GateThresholds:
    max_quarantine_share: float
    min_volume_ratio: float
    max_volume_ratio: float
    min_trailing_days: int


RUNNERS = ("local", "docker", "kubernetes")
SENSOR_MODES = ("deferrable", "reschedule", "poke")


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _env(name, default).lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def orchestration() -> Orchestration:
    runner = _env("FRAUD_TORCH_RUNNER", "local").lower()
    if runner not in RUNNERS:
        raise ValueError(f"FRAUD_TORCH_RUNNER must be one of {RUNNERS}, got {runner!r}")
    return Orchestration(
        torch_runner=runner,
        image=_env("FRAUD_IMAGE", "fraud-nightly:latest"),
        gpu_pool=_env("FRAUD_GPU_POOL", "gpu"),
        torch_queue=_env("FRAUD_TORCH_QUEUE", "default"),
        train_processes=int(_env("FRAUD_TRAIN_PROCESSES", "1")),
        gpu_count=int(_env("FRAUD_GPU_COUNT", "1")),
        docker_url=_env("FRAUD_DOCKER_URL", "unix://var/run/docker.sock"),
        docker_network=os.environ.get("FRAUD_DOCKER_NETWORK") or None,
        k8s_namespace=_env("FRAUD_K8S_NAMESPACE", "default"),
        k8s_node_selector=json.loads(_env("FRAUD_K8S_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')),
        k8s_secret=os.environ.get("FRAUD_K8S_SECRET") or None,
        aws_conn_id=_env("FRAUD_AWS_CONN_ID", "aws_default"),
        spark_conn_id=_env("FRAUD_SPARK_CONN_ID", "spark_default"),
        spark_conf=json.loads(_env("FRAUD_SPARK_CONF", "{}")),
        spark_connect_conn_id=os.environ.get("FRAUD_SPARK_CONNECT_CONN_ID", "").strip() or None,
        catchup=_flag("FRAUD_CATCHUP", "true"),
        max_active_runs=int(_env("FRAUD_MAX_ACTIVE_RUNS", "2")),
        retries=int(_env("FRAUD_RETRIES", "2")),
        retry_delay_seconds=int(_env("FRAUD_RETRY_DELAY_SECONDS", "60")),
        task_timeout_minutes=_task_timeouts(_env("FRAUD_TASK_TIMEOUT_MINUTES", "{}")),
        poke_seconds=int(_env("FRAUD_POKE_SECONDS", "30")),
        sensor_mode=_choice("FRAUD_SENSOR_MODE", "deferrable", SENSOR_MODES),
        landing_timeout_hours=float(_env("FRAUD_LANDING_TIMEOUT_HOURS", "12")),
        wait_timeout_hours=float(_env("FRAUD_WAIT_TIMEOUT_HOURS", "24")),
        notify_webhook_url=os.environ.get("FRAUD_NOTIFY_WEBHOOK_URL") or None,
    )


def gate_thresholds() -> GateThresholds:
    return GateThresholds(
        max_quarantine_share=float(_env("FRAUD_GATE_MAX_QUARANTINE_SHARE", "0.05")),
        min_volume_ratio=float(_env("FRAUD_GATE_MIN_VOLUME_RATIO", "0.5")),
        max_volume_ratio=float(_env("FRAUD_GATE_MAX_VOLUME_RATIO", "3.0")),
        min_trailing_days=int(_env("FRAUD_GATE_MIN_TRAILING_DAYS", "3")),
    )
