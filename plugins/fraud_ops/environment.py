"""What a step's process inherits from the Airflow task that starts it: the settings it needs,
never Airflow's own secrets (the metadata database URL, the API and JWT secrets, Connections).

A task process runs on a worker whose environment configures Airflow itself (``AIRFLOW__*``,
``AIRFLOW_CONN_*``). The steps (spark-submit, ``python -m jobs...``) need none of it: every
variable of Airflow's is removed before a step starts, and the lake's store settings, resolved by
the task from its Connection (``fraud_ops.store``), are added.
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
def step_process_environment(extra: Mapping[str, str] | None = None) -> Iterator[None]:
    """For code that starts a process from this one's environment (the Spark provider's
    spark-submit): meanwhile Airflow's variables are out of ``os.environ`` and ``extra`` (the
    store's settings) is in; afterwards ``os.environ`` is what it was."""
    saved = dict(os.environ)
    for name in [k for k in os.environ if AIRFLOW_OWN.match(k)]:
        del os.environ[name]
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
