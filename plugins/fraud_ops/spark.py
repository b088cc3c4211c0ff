"""spark-submit of one of the project's Spark jobs, shipping the ``jobs`` package as ``--py-files``.

Master, deploy mode and resources come from the Airflow connection (``spark_default``) and
``FRAUD_SPARK_CONF``; the zip is built from the worker's checkout in ``execute``, so the same DAG
submits to ``local[2]``, a standalone cluster, YARN or Kubernetes. The store's keys come from the
AWS Connection (``fraud_ops.store``): the driver gets them in its environment, the executors from
a private properties file, never from the command line.

With ``connect_conn_id`` (``FRAUD_SPARK_CONNECT_CONN_ID``, a ``spark_connect`` Connection) the same
job file runs as a Spark Connect client of a warm server instead (``deploy/spark_connect.py``):
no JVM start, no first-job warm-up, the same code and outputs. The server's own environment
reaches the store for its executors; the client, which publishes, gets the store's settings from
the AWS Connection as above.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowException

from fraud_ops.environment import step_environment, step_process_environment
from fraud_ops.store import store_environment
from jobs.common.cli import error_summary
from jobs.common.config import S3_SECRET_VARIABLES


def jobs_root() -> Path:
    """The folder that holds the ``jobs`` package on this worker."""
    import jobs

    return Path(jobs.__file__).resolve().parent.parent


def build_jobs_zip(root: Path | None = None, out_dir: str | None = None) -> str:
    """Zip the ``jobs`` package (Python files only) into a content-addressed file; return its path."""
    root = root or jobs_root()
    files = sorted(p for p in (root / "jobs").rglob("*.py") if "__pycache__" not in p.parts)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    folder = Path(out_dir) if out_dir else private_dir()
    target = folder / f"fraud-jobs-{digest[:16]}.zip"
    # A file already there is used only if it is exactly this zip (a shared folder's file may be anyone's).
    if not (target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fraud-jobs-", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    return str(target)


def private_dir() -> Path:
    """A folder only this user can write (0700), for what a task hands to spark-submit."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fraud-nightly"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = base.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        os.chmod(base, 0o700)
        if base.stat().st_uid != os.getuid():
            raise PermissionError(f"{base} belongs to another user: refusing to put the jobs zip there")
    return base


def spark_defaults_file() -> Path:
    """The ``spark-defaults.conf`` spark-submit reads when given no properties file."""
    conf_dir = os.environ.get("SPARK_CONF_DIR")
    if not conf_dir:
        home = os.environ.get("SPARK_HOME") or importlib.util.find_spec("pyspark").submodule_search_locations[0]
        conf_dir = os.path.join(home, "conf")
    return Path(conf_dir) / "spark-defaults.conf"


@contextmanager
def executor_environment_file(variables: Mapping[str, str], base: Path) -> Iterator[str | None]:
    """A properties file, readable by this user only, holding ``base``'s properties (what
    spark-submit would have read) and ``spark.executorEnv.<name>`` for each variable: a cluster's
    workers start the executors with them in their environment. Removed on exit."""
    if not variables:
        yield None
        return
    lines = [base.read_text()] if base.is_file() else []
    lines += [f"spark.executorEnv.{name}={value.replace(chr(92), chr(92) * 2)}" for name, value in variables.items()]
    fd, path = tempfile.mkstemp(dir=private_dir(), prefix="spark-", suffix=".properties")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        yield path
    finally:
        os.unlink(path)


class SparkJobOperator(SparkSubmitOperator):
    """``spark-submit jobs/spark/<job>.py --lake URI --date D`` with the jobs package zipped alongside."""

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "lake")

    def __init__(self, *, job: str, lake: str, day: str, aws_conn_id: str | None = None,
                 connect_conn_id: str | None = None, **kwargs) -> None:
        kwargs.setdefault("application", f"jobs/spark/{job}.py")
        kwargs.setdefault("application_args", ["--lake", lake, "--date", day])
        kwargs.setdefault("name", f"fraud-{job}")
        kwargs["conf"] = {"spark.log.level": "WARN", **(kwargs.get("conf") or {})}
        super().__init__(**kwargs)
        self.job = job
        self.lake = lake
        self.aws_conn_id = aws_conn_id
        self.connect_conn_id = connect_conn_id
        self._client: subprocess.Popen | None = None

    def execute(self, context):
        root = jobs_root()
        if not os.path.isabs(self.application):
            self.application = str(root / self.application)
        if self.connect_conn_id:
            return self.execute_on_connect(root)
        if not self.py_files:
            self.py_files = build_jobs_zip(root)
        self.log.info("submitting %s with --py-files %s", self.application, self.py_files)
        store = store_environment(self.lake, self.aws_conn_id)
        keys = {name: value for name, value in store.items() if name in S3_SECRET_VARIABLES}
        if self._hook is None:
            self._hook = self._get_hook()  # reads the connection while the task's environment is whole
        master, deploy_mode = self._hook._connection["master"], self._hook._connection["deploy_mode"]
        if keys and not executors_take_keys_from_the_task(master, deploy_mode):
            if not master.startswith("local"):  # in local mode the executors are the driver: its environment
                self.log.info("the store's keys are not handed to %s (%s mode): the cluster reaches the store "
                              "with its own identity", master, deploy_mode or "client")
            keys = {}
        base = Path(self.properties_file) if self.properties_file else spark_defaults_file()
        with executor_environment_file(keys, base) as properties:
            if properties:
                self.properties_file = properties
                self._hook = self._get_hook()
            # spark-submit inherits this environment: Airflow's secrets out, the store's settings in
            with step_process_environment(store):
                return super().execute(context)

    def execute_on_connect(self, root: Path) -> None:
        """``python jobs/spark/<job>.py ...`` as a client of the Spark Connect server of the
        Connection: its output streams into the task log, a failure raises with the line that says why."""
        from airflow.providers.apache.spark.hooks.spark_connect import SparkConnectHook

        from fraud_ops.runners import run_process

        url = SparkConnectHook(self.connect_conn_id).get_connection_url()
        server = url.split("/;")[0].rstrip("/")  # without the Connection's token, for the log
        reachable(server, self.connect_conn_id)
        store = store_environment(self.lake, self.aws_conn_id)
        pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
        env = {**step_environment(), **store, "SPARK_REMOTE": url, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, self.application, *map(str, self.application_args)]
        self.log.info("running %s on the Spark Connect server %s (Connection %s)", self.job, server,
                      self.connect_conn_id)
        code, tail = run_process(self.log, argv, env, str(root), started=self._client_started)
        if code != 0:
            raise AirflowException(f"{self.job} on Spark Connect {server} exited {code}: {failure_reason(tail)}")

    def _client_started(self, proc: subprocess.Popen) -> None:
        self._client = proc

    def on_kill(self) -> None:
        if self._client is not None:
            if self._client.poll() is None:
                self._client.terminate()
            return
        super().on_kill()


def failure_reason(lines: Sequence[str]) -> str:
    """The line of a failed job's output that says why: its own "<step>: failed on D: ..." line, else
    the error a traceback ends with, else its last line."""
    said = [line for line in lines if re.match(r"^\w+: failed on ", line)]
    if said:
        return said[-1]
    text = "\n".join(lines)
    return error_summary(text) if "Traceback (most recent call last)" in text else (lines[-1] if lines else "")


def reachable(server: str, conn_id: str, timeout: float = 10.0) -> None:
    """Fail at once, saying what to do, when nothing listens at the server's address (a client
    would otherwise retry for minutes); the task's retries then wait for it to be back."""
    from urllib.parse import urlparse

    address = urlparse(server.replace("sc://", "http://", 1))
    try:
        socket.create_connection((address.hostname, address.port or 15002), timeout=timeout).close()
    except OSError as exc:
        raise AirflowException(
            f"the Spark Connect server {server} (Connection {conn_id}) is not reachable ({exc}): start it "
            "(`make up` does; docker-compose's spark-connect service; python deploy/spark_connect.py), or unset "
            "FRAUD_SPARK_CONNECT_CONN_ID to run the Spark steps with spark-submit") from exc


def executors_take_keys_from_the_task(master: str, deploy_mode: str | None) -> bool:
    """Whether the submitting task gives the executors the store's keys: on a standalone master in
    client mode, whose worker starts each executor with them in its environment. In local mode the
    executors are the driver, which has them in its environment already. A driver in cluster mode,
    and YARN and Kubernetes, would carry them in what they store or write out (an application's
    configuration, a container's launch script): those clusters reach the store with an identity of
    their own (an instance or pod role, a Kubernetes secret named in FRAUD_SPARK_CONF)."""
    return (deploy_mode or "client") == "client" and master.startswith("spark://")
