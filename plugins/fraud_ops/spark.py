"""spark-submit of one of the project's Spark jobs, shipping the ``jobs`` package as ``--py-files``.

Master, deploy mode and resources come from the Airflow connection (``spark_default``) and
``FRAUD_SPARK_CONF``; the zip is built from the worker's checkout in ``execute``, so the same DAG
submits to ``local[2]``, a standalone cluster, YARN or Kubernetes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from fraud_ops.environment import without_airflow_secrets


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


class SparkJobOperator(SparkSubmitOperator):
    """``spark-submit jobs/spark/<job>.py --lake URI --date D`` with the jobs package zipped alongside."""

    def __init__(self, *, job: str, lake: str, day: str, **kwargs) -> None:
        kwargs.setdefault("application", f"jobs/spark/{job}.py")
        kwargs.setdefault("application_args", ["--lake", lake, "--date", day])
        kwargs.setdefault("name", f"fraud-{job}")
        kwargs["conf"] = {"spark.log.level": "WARN", **(kwargs.get("conf") or {})}
        super().__init__(**kwargs)
        self.job = job

    def execute(self, context):
        root = jobs_root()
        if not os.path.isabs(self.application):
            self.application = str(root / self.application)
        if not self.py_files:
            self.py_files = build_jobs_zip(root)
        self.log.info("submitting %s with --py-files %s", self.application, self.py_files)
        if self._hook is None:
            self._hook = self._get_hook()  # reads the connection while the task's environment is whole
        with without_airflow_secrets():  # spark-submit inherits the environment: not Airflow's secrets
            return super().execute(context)
