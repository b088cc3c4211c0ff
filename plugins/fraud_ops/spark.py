"""spark-submit of one of the project's Spark jobs, shipping the ``jobs`` package as ``--py-files``.

Master, deploy mode and resources come from the Airflow connection (``spark_default``) and
``FRAUD_SPARK_CONF``; the zip is built from the worker's checkout in ``execute``, so the same DAG
submits to ``local[2]``, a standalone cluster, YARN or Kubernetes. The store's keys come from the
AWS Connection (``fraud_ops.store``): the driver gets them in its environment, the executors from
a private properties file, never from the command line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from fraud_ops.environment import step_process_environment
from fraud_ops.store import store_environment
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

    def __init__(self, *, job: str, lake: str, day: str, aws_conn_id: str | None = None, **kwargs) -> None:
        kwargs.setdefault("application", f"jobs/spark/{job}.py")
        kwargs.setdefault("application_args", ["--lake", lake, "--date", day])
        kwargs.setdefault("name", f"fraud-{job}")
        kwargs["conf"] = {"spark.log.level": "WARN", **(kwargs.get("conf") or {})}
        super().__init__(**kwargs)
        self.job = job
        self.lake = lake
        self.aws_conn_id = aws_conn_id

    def execute(self, context):
        root = jobs_root()
        if not os.path.isabs(self.application):
            self.application = str(root / self.application)
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


def executors_take_keys_from_the_task(master: str, deploy_mode: str | None) -> bool:
    """Whether the submitting task gives the executors the store's keys: on a standalone master in
    client mode, whose worker starts each executor with them in its environment. In local mode the
    executors are the driver, which has them in its environment already. A driver in cluster mode,
    and YARN and Kubernetes, would carry them in what they store or write out (an application's
    configuration, a container's launch script): those clusters reach the store with an identity of
    their own (an instance or pod role, a Kubernetes secret named in FRAUD_SPARK_CONF)."""
    return (deploy_mode or "client") == "client" and master.startswith("spark://")
