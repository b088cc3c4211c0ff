"""The torch tasks (train, score) as a local process, a Docker container or a Kubernetes pod.

``FRAUD_TORCH_RUNNER`` picks the mode; all three run the same command
(``python -m jobs.torch.<step> --lake URI --date D ...``) from the same image (``FRAUD_IMAGE``)
and take a slot of the ``gpu`` pool. Docker asks the daemon for GPUs with a ``device_requests``
entry; Kubernetes asks for ``nvidia.com/gpu`` in the container limits, with a node selector and
the usual GPU taint toleration. The local process uses CUDA when the worker has it.

Each gets the lake's store from the AWS Connection at execute time (``fraud_ops.store``): the
local process in its environment, the container in Docker's private environment, the pod from a
Kubernetes Secret (``FRAUD_K8S_SECRET`` names one the cluster provides instead).

``extra_links`` (any mode) adds operator links to the task, such as the report and alert-list
links of ``fraud_ops.links``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Container, Sequence
from pathlib import Path

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from fraud_ops.config import Orchestration
from fraud_ops.environment import step_environment
from fraud_ops.store import store_environment

# Step settings forwarded to containers (jobs.common.config.ENV_DOC); the store's come from the
# Connection at execute time, never from here.
FORWARDED_ENV = (
    "FRAUD_FIRST_DATE",
    "FRAUD_TRAIN_EVERY_DAYS",
    "FRAUD_TRAIN_WINDOW_DAYS",
    "FRAUD_ALERT_K",
    "FRAUD_PROMOTION_TOLERANCE",
    "FRAUD_SEED",
    "FRAUD_LABEL_DELAY_DAYS",
    "FRAUD_LABEL_FEED",
    "FRAUD_LABEL_LOOKBACK_DAYS",
    "FRAUD_MIN_FRAUD_LABELS",
    "FRAUD_MODEL",
)
CONTAINER_WORKDIR = "/opt/fraud"


def torch_command(step: str, arguments: Sequence[str], processes: int = 1) -> list[str]:
    """The one command line of a torch step, whatever runs it. Training with more than one process
    (``FRAUD_TRAIN_PROCESSES``: one per GPU) goes through torchrun, with DDP; only rank 0 writes."""
    if step == "train" and processes > 1:
        return ["python", "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "-m", "jobs.torch.train", *arguments]
    return ["python", "-m", f"jobs.torch.{step}", *arguments]


def step_env() -> dict[str, str]:
    """Settings a container needs to see the same configuration as the worker."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalProcessOperator(BaseOperator):
    """Runs an argv list (no shell) on the worker, streaming its output to the task log; the
    process gets the store of ``lake`` (when it is on S3) in its environment. ``extra_links``: the
    task's operator links."""

    template_fields: Sequence[str] = ("command", "env", "lake")

    def __init__(
        self,
        *,
        command: list[str],
        env: dict[str, str] | None = None,
        lake: str | None = None,
        aws_conn_id: str | None = None,
        skip_on_exit_code: int | Container[int] | None = None,
        extra_links: Sequence[BaseOperatorLink] = (),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if extra_links:
            self.operator_extra_links = (*type(self).operator_extra_links, *extra_links)
        self.command = command
        self.env = env
        self.lake = lake
        self.aws_conn_id = aws_conn_id
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
        store = store_environment(self.lake, self.aws_conn_id) if self.lake else {}
        env = {**step_environment(), **store, **(self.env or {}), "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        code, tail = run_process(self.log, argv, env, root, started=self._started)
        if code in self.skip_on_exit_code:
            reason = tail[-1] if tail else f"exit code {code}"
            context["ti"].xcom_push(key="skip_reason", value=reason)
            raise AirflowSkipException(f"skipped (exit code {code}): {reason}")
        if code != 0:
            raise AirflowException(
                f"{Path(argv[2] if len(argv) > 2 else argv[0]).name} exited {code}: " + "\n".join(tail)
            )
        return None

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def on_kill(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()


def run_process(log, argv: list[str], env: dict[str, str], cwd: str,
                started: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, deque[str]]:
    """Run ``argv`` (no shell), its output line by line into ``log``; its exit code and last lines."""
    log.info("running: %s", " ".join(argv))
    tail: deque[str] = deque(maxlen=20)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if started:
        started(proc)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip())
        log.info("%s", line.rstrip())
    return proc.wait(), tail


def _docker_operator():
    from airflow.providers.docker.operators.docker import DockerOperator

    class StepContainerOperator(DockerOperator):
        """A torch step in a container; the store of ``lake`` goes into Docker's private
        environment at execute time (not templated, not rendered, not logged)."""

        template_fields: Sequence[str] = (*DockerOperator.template_fields, "lake")

        def __init__(self, *, lake: str, aws_conn_id: str | None = None,
                     extra_links: Sequence[BaseOperatorLink] = (), **kwargs) -> None:
            super().__init__(**kwargs)
            if extra_links:
                self.operator_extra_links = (*type(self).operator_extra_links, *extra_links)
            self.lake = lake
            self.aws_conn_id = aws_conn_id

        def execute(self, context):
            self._private_environment = {**self._private_environment,
                                         **store_environment(self.lake, self.aws_conn_id)}
            return super().execute(context)

    return StepContainerOperator


def store_secret_name(conn_id: str) -> str:
    """The Kubernetes Secret a pod reads the store from: a DNS-1123 name derived from the Connection id."""
    import re

    return "fraud-store-" + (re.sub(r"[^a-z0-9-]+", "-", conn_id.lower()).strip("-") or "default")


def write_store_secret(client, namespace: str, name: str, values: dict[str, str]) -> None:
    """Create or update the Secret ``name`` with ``values`` (a key rotated in the Connection reaches
    the next pod)."""
    from kubernetes.client import models as k8s
    from kubernetes.client.rest import ApiException

    body = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, labels={"app.kubernetes.io/part-of": "fraud-nightly"}),
                        string_data=values, type="Opaque")
    try:
        client.replace_namespaced_secret(name, namespace, body)
    except ApiException as exc:
        if exc.status != 404:
            raise
        try:
            client.create_namespaced_secret(namespace, body)
        except ApiException as again:
            if again.status != 409:  # another task created it meanwhile: update that one
                raise
            client.replace_namespaced_secret(name, namespace, body)


def _pod_operator():
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    class StepPodOperator(KubernetesPodOperator):
        """A torch step in a pod. Without a Secret the cluster provides (``FRAUD_K8S_SECRET``), the
        task writes the store of ``lake`` from the AWS Connection into a Secret of the pod's
        namespace and the pod reads it with ``envFrom``: the values are never in the pod spec."""

        template_fields: Sequence[str] = (*KubernetesPodOperator.template_fields, "lake")

        def __init__(self, *, lake: str, aws_conn_id: str | None = None, provided_secret: str | None = None,
                     extra_links: Sequence[BaseOperatorLink] = (), **kwargs) -> None:
            if provided_secret:
                kwargs["env_from"] = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=provided_secret))]
            super().__init__(**kwargs)
            if extra_links:
                self.operator_extra_links = (*type(self).operator_extra_links, *extra_links)
            self.lake = lake
            self.aws_conn_id = aws_conn_id
            self.provided_secret = provided_secret

        def execute(self, context):
            if not self.provided_secret:
                from fraud_ops.store import aws_conn_id

                values = store_environment(self.lake, self.aws_conn_id)
                if values:
                    name = store_secret_name(self.aws_conn_id or aws_conn_id())
                    write_store_secret(self.client, self.namespace, name, values)
                    self.env_from = [*self.env_from,
                                     k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=name))]
            return super().execute(context)

    return StepPodOperator


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
    lake: str,
    skip_on_exit_code: int | None = None,
    file_lake_uri: str | None = None,
    **kwargs,
) -> BaseOperator:
    """The operator that runs ``python -m jobs.torch.<step> <arguments>`` in the configured mode,
    with the store of ``lake`` from the AWS Connection ``cfg.aws_conn_id``."""
    command = torch_command(step, arguments, cfg.train_processes)
    kwargs.setdefault("pool", cfg.gpu_pool)
    kwargs.setdefault("queue", cfg.torch_queue)
    kwargs.update(lake=lake, aws_conn_id=cfg.aws_conn_id)
    if cfg.torch_runner == "local":
        return LocalProcessOperator(
            task_id=task_id, command=command, skip_on_exit_code=skip_on_exit_code, **kwargs
        )
    if cfg.torch_runner == "docker":
        from docker.types import DeviceRequest

        gpus = [DeviceRequest(count=cfg.gpu_count, capabilities=[["gpu"]])] if cfg.gpu_count else None
        return _docker_operator()(
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
        from kubernetes.client import models as k8s

        limits = {"nvidia.com/gpu": str(cfg.gpu_count)} if cfg.gpu_count else None
        tolerations = (
            [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
            if cfg.gpu_count
            else None
        )
        return _pod_operator()(
            task_id=task_id,
            name=f"fraud-{step}",
            namespace=cfg.k8s_namespace,
            image=cfg.image,
            cmds=command[:1],
            arguments=command[1:],
            env_vars=step_env(),
            provided_secret=cfg.k8s_secret,
            container_resources=k8s.V1ResourceRequirements(limits=limits),
            node_selector=cfg.k8s_node_selector if cfg.gpu_count else None,
            tolerations=tolerations,
            on_finish_action="delete_succeeded_pod",
            get_logs=True,
            skip_on_exit_code=skip_on_exit_code,
            **kwargs,
        )
    raise ValueError(f"unknown torch runner {cfg.torch_runner!r}")
