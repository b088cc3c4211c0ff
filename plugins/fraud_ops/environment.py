"""What a step's process inherits from the Airflow task that starts it: the settings it needs,
never Airflow's own secrets (the metadata database URL, the API and JWT secrets, Connections).

A task process runs on a worker whose environment configures Airflow itself (``AIRFLOW__*``,
``AIRFLOW_CONN_*``). The steps (spark-submit, ``python -m jobs...``) need none of it: every
variable of Airflow's is removed before a step starts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

AIRFLOW_OWN = re.compile(r"^_?AIRFLOW(__|_CONN_|_VAR_)")


def step_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without Airflow's own variables."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items() if not AIRFLOW_OWN.match(k)}


@contextmanager
def without_airflow_secrets() -> Iterator[None]:
    """For code that starts a process from this one's environment (the Spark provider's
    spark-submit): Airflow's variables are out of ``os.environ`` meanwhile, then put back."""
    removed = {k: os.environ.pop(k) for k in list(os.environ) if AIRFLOW_OWN.match(k)}
    try:
        yield
    finally:
        os.environ.update(removed)
