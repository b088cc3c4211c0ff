"""Orchestration settings: how Airflow runs the steps (the steps' own settings are in jobs.common.config).

Read from the environment of the process that parses the DAG (scheduler / DAG processor) or runs
the task (worker); every name has a documented default. Credentials are never read here: S3
credentials reach containers from a Kubernetes secret or an Airflow Connection.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


ENV_DOC = {
    "FRAUD_TORCH_RUNNER": "how train/score run: local (a process on the worker), docker, kubernetes (default local)",
    "FRAUD_IMAGE": "image for the docker and kubernetes runners (default fraud-nightly:latest)",
    "FRAUD_GPU_POOL": "Airflow pool capping concurrent GPU tasks (default gpu)",
    "FRAUD_GPU_COUNT": "GPUs requested per torch task by docker/kubernetes (default 1; 0 = CPU only)",
    "FRAUD_DOCKER_URL": "Docker daemon for the docker runner (default unix://var/run/docker.sock)",
    "FRAUD_DOCKER_NETWORK": "Docker network for the torch containers (default: the daemon's default)",
    "FRAUD_K8S_NAMESPACE": "namespace of the torch pods (default default)",
    "FRAUD_K8S_NODE_SELECTOR": 'JSON node selector of the torch pods (default {"nvidia.com/gpu.present": "true"})',
    "FRAUD_K8S_SECRET": "Kubernetes secret whose keys become the pods' env, e.g. AWS credentials (default none)",
    "FRAUD_SPARK_CONN_ID": "Airflow connection of spark-submit (default spark_default)",
    "FRAUD_SPARK_CONF": "JSON dict of extra --conf for spark-submit (default {})",
    "FRAUD_MAX_ACTIVE_RUNS": "runs of the nightly DAG in flight at once (default 2)",
    "FRAUD_RETRIES": "task retries (default 2)",
    "FRAUD_RETRY_DELAY_SECONDS": "first retry delay, doubled each retry (default 60)",
    "FRAUD_TASK_TIMEOUT_MINUTES": "execution_timeout of every task (default 120)",
    "FRAUD_POKE_SECONDS": "how often sensors look (default 120)",
    "FRAUD_SENSOR_MODE": "reschedule (a waiting sensor frees its worker slot; the default) or poke",
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
    gpu_count: int
    docker_url: str
    docker_network: str | None
    k8s_namespace: str
    k8s_node_selector: dict = field(hash=False)
    k8s_secret: str | None
    spark_conn_id: str
    spark_conf: dict = field(hash=False)
    max_active_runs: int
    retries: int
    retry_delay_seconds: int
    task_timeout_minutes: int
    poke_seconds: int
    sensor_mode: str
    landing_timeout_hours: float
    wait_timeout_hours: float
    notify_webhook_url: str | None


@dataclass(frozen=True)
class GateThresholds:
    max_quarantine_share: float
    min_volume_ratio: float
    max_volume_ratio: float
    min_trailing_days: int


RUNNERS = ("local", "docker", "kubernetes")


def orchestration() -> Orchestration:
    runner = _env("FRAUD_TORCH_RUNNER", "local").lower()
    if runner not in RUNNERS:
        raise ValueError(f"FRAUD_TORCH_RUNNER must be one of {RUNNERS}, got {runner!r}")
    return Orchestration(
        torch_runner=runner,
        image=_env("FRAUD_IMAGE", "fraud-nightly:latest"),
        gpu_pool=_env("FRAUD_GPU_POOL", "gpu"),
        gpu_count=int(_env("FRAUD_GPU_COUNT", "1")),
        docker_url=_env("FRAUD_DOCKER_URL", "unix://var/run/docker.sock"),
        docker_network=os.environ.get("FRAUD_DOCKER_NETWORK") or None,
        k8s_namespace=_env("FRAUD_K8S_NAMESPACE", "default"),
        k8s_node_selector=json.loads(_env("FRAUD_K8S_NODE_SELECTOR", '{"nvidia.com/gpu.present": "true"}')),
        k8s_secret=os.environ.get("FRAUD_K8S_SECRET") or None,
        spark_conn_id=_env("FRAUD_SPARK_CONN_ID", "spark_default"),
        spark_conf=json.loads(_env("FRAUD_SPARK_CONF", "{}")),
        max_active_runs=int(_env("FRAUD_MAX_ACTIVE_RUNS", "2")),
        retries=int(_env("FRAUD_RETRIES", "2")),
        retry_delay_seconds=int(_env("FRAUD_RETRY_DELAY_SECONDS", "60")),
        task_timeout_minutes=int(_env("FRAUD_TASK_TIMEOUT_MINUTES", "120")),
        poke_seconds=int(_env("FRAUD_POKE_SECONDS", "120")),
        sensor_mode=_env("FRAUD_SENSOR_MODE", "reschedule"),
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
