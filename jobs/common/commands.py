"""Each step as the command a person types (docs/contract.md, "Command line"), for the code that runs
steps as processes outside Airflow: ``jobs.lineage repair``, the demo's bootstrap and the quality report.

The Spark jobs go through ``spark-submit`` (the one beside this interpreter first: a venv that is
not activated still finds its own pyspark); the torch steps and the report through this
interpreter. Children get this repository on ``PYTHONPATH`` and this interpreter for Spark's
Python workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from jobs.common.config import REPO_ROOT

SPARK_JOBS = ("clean", "features")
PYTHON_STEPS = {"train": "jobs.torch.train", "score": "jobs.torch.score", "report": "jobs.report"}


def spark_submit() -> str:
    beside = Path(sys.executable).with_name("spark-submit")
    return str(beside) if beside.exists() else (shutil.which("spark-submit") or "spark-submit")


def day_args(lake: str, start: date, end: date | None = None) -> list[str]:
    if end is None or end == start:
        return ["--lake", lake, "--date", start.isoformat()]
    return ["--lake", lake, "--start", start.isoformat(), "--end", end.isoformat()]


def step_command(step: str, arguments: Sequence[str], spark_options: Sequence[str] = ()) -> list[str]:
    """``spark-submit [options] jobs/spark/<step>.py <arguments>`` or ``python -m <module> <arguments>``."""
    if step in SPARK_JOBS:
        return [spark_submit(), *spark_options, str(REPO_ROOT / "jobs" / "spark" / f"{step}.py"), *arguments]
    if step in PYTHON_STEPS:
        return [sys.executable, "-m", PYTHON_STEPS[step], *arguments]
    raise ValueError(f"no command for step {step!r}")


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, **(extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    # spark-submit finds SPARK_HOME by running ``python3`` from PATH: make that this interpreter
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    return env


def run(argv: Sequence[str], extra_env: dict[str, str] | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Run one step's command from the repository root; the caller reads ``returncode``."""
    return subprocess.run(list(argv), cwd=REPO_ROOT, env=environment(extra_env), capture_output=capture, text=True)
