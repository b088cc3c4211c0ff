"""The torch tasks (train, score) as a local process, a Docker container or a Kubernetes pod.

``FRAUD_TORCH_RUNNER`` picks the mode; all three run the same command
(``python -m jobs.torch.<step> --lake URI --date D ...``) from the same image (``FRAUD_IMAGE``)
and take a slot of the ``gpu`` pool. Docker asks the daemon for GPUs with a ``device_requests``
entry; Kubernetes asks for ``nvidia.com/gpu`` in the container limits, with a node selector and
the usual GPU taint toleration. The local process uses CUDA when the worker has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Container, Sequence
from pathlib import Path

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from fraud_ops.config import Orchestration
from fraud_ops.environment import step_environment

# Step settings forwarded to containers (jobs.common.config.ENV_DOC); credentials are not among them.
FORWARDED_ENV = (
    "FRAUD_FIRST_DATE",
    "FRAUD_TRAIN_EVERY_DAYS",
    "FRAUD_TRAIN_WINDOW_DAYS",
    "FRAUD_ALERT_K",
    "FRAUD_PROMOTION_TOLERANCE",
    "FRAUD_SEED",
    "FRAUD_S3_ENDPOINT_URL",
    "AWS_REGION",
)
CONTAINER_WORKDIR = "/opt/fraud"


def torch_command(step: str, arguments: Sequence[str]) -> list[str]:
    """The one command line of a torch step, whatever runs it."""
    return ["python", "-m", f"jobs.torch.{step}", *arguments]


def step_env() -> dict[str, str]:
    """Settings a container needs to see the same configuration as the worker."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalProcessOperator(BaseOperator):
    """Runs an argv list (no shell) on the worker, streaming its output to the task log."""

    template_fields: Sequence[str] = ("command", "env")

    def __init__(
        self,
        *,
        command: list[str],
        env: dict[str, str] | None = None,
        skip_on_exit_code: int | Container[int] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.env = env
        if skip_on_exit_code is None:
            self.skip_on_exit_code: Container[int] = ()
        elif isinstance(skip_on_exit_code, int):
            self.skip_on_exit_code = (skip_on_exit_code,)
        else:
            self.skip_on_exit_code = skip_on_exit_code
        self._proc: subprocess.Popen | None = None

    def execute(self, context):
        from fraud_ops.spark import jobs_root

        argv = [str(a) for a in self.command]
        if argv[0] == "python":
            argv[0] = sys.executable  # the worker's interpreter, with the project's packages
        root = str(jobs_root())
        pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**step_environment(), **(self.env or {}), "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        self.log.info("running: %s", " ".join(argv))
        tail: deque[str] = deque(maxlen=20)
        self._proc = subprocess.Popen(
            argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            tail.append(line.rstrip())
            self.log.info("%s", line.rstrip())
        code = self._proc.wait()
        if code in self.skip_on_exit_code:
            reason = tail[-1] if tail else f"exit code {code}"
            context["ti"].xcom_push(key="skip_reason", value=reason)
            raise AirflowSkipException(f"skipped (exit code {code}): {reason}")
        if code != 0:
            raise AirflowException(
                f"{Path(argv[2] if len(argv) > 2 else argv[0]).name} exited {code}: " + "\n".join(tail)
            )
        return None

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()


def _file_lake_mounts(lake_uri: str | None):
    """A file:// lake must be visible at the same path inside the container."""
    from urllib.parse import urlparse

    from docker.types import Mount

    if not lake_uri or urlparse(lake_uri).scheme != "file":
        return []
    path = urlparse(lake_uri).path
    return [Mount(source=path, target=path, type="bind")]


def torch_task(
    task_id: str,
    step: str,
    arguments: Sequence[str],
    cfg: Orchestration,
    *,
    skip_on_exit_code: int | None = None,
    file_lake_uri: str | None = None,
    **kwargs,
) -> BaseOperator:
    """The operator that runs ``python -m jobs.torch.<step> <arguments>`` in the configured mode."""
    command = torch_command(step, arguments)
    kwargs.setdefault("pool", cfg.gpu_pool)
    if cfg.torch_runner == "local":
        return LocalProcessOperator(
            task_id=task_id, command=command, skip_on_exit_code=skip_on_exit_code, **kwargs
        )
    if cfg.torch_runner == "docker":
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest

        gpus = [DeviceRequest(count=cfg.gpu_count, capabilities=[["gpu"]])] if cfg.gpu_count else None
        return DockerOperator(
            task_id=task_id,
            image=cfg.image,
            command=command,
            environment=step_env(),
            device_requests=gpus,
            mounts=_file_lake_mounts(file_lake_uri),
            working_dir=CONTAINER_WORKDIR,
            docker_url=cfg.docker_url,
            network_mode=cfg.docker_network,
            mount_tmp_dir=False,
            auto_remove="success",
            skip_on_exit_code=skip_on_exit_code,
            **kwargs,
        )
    if cfg.torch_runner == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        limits = {"nvidia.com/gpu": str(cfg.gpu_count)} if cfg.gpu_count else None
        tolerations = (
            [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
            if cfg.gpu_count
            else None
        )
        env_from = (
            [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=cfg.k8s_secret))]
            if cfg.k8s_secret
            else None
        )
        return KubernetesPodOperator(
            task_id=task_id,
            name=f"fraud-{step}",
            namespace=cfg.k8s_namespace,
            image=cfg.image,
            cmds=command[:1],
            arguments=command[1:],
            env_vars=step_env(),
            env_from=env_from,
            container_resources=k8s.V1ResourceRequirements(limits=limits),
            node_selector=cfg.k8s_node_selector if cfg.gpu_count else None,
            tolerations=tolerations,
            on_finish_action="delete_succeeded_pod",
            get_logs=True,
            skip_on_exit_code=skip_on_exit_code,
            **kwargs,
        )
    raise ValueError(f"unknown torch runner {cfg.torch_runner!r}")
