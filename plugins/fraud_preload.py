"""Imports every task process would otherwise pay for, done once in the long-lived Airflow processes.

Airflow runs each task in a process forked from its executor's worker (LocalExecutor) or pool
process (Celery), which imports the task runner and then parses the DAG file. Parsing ours imports
``fraud_ops`` and through it the Spark provider, whose spark-submit hook imports the Kubernetes
clients: about 1.7 s of CPU per task (the runner, then the DAG file's imports, measured on the
reference machine), paid by every sensor and step of every night. With ``[core] lazy_load_plugins =
False`` (the local stack, compose and the image set it) Airflow loads this plugin when a process
starts, so the scheduler, and the workers forked from it, hold these modules already and a task's
parse of the DAG file costs about 0.2 s (docs/contract.md, "Production parts").

The plugin registers nothing. (Airflow's plugin scan also executes each ``fraud_ops`` file under its
bare name, as it always has when plugins load; only these package imports are what tasks reuse. An
``.airflowignore`` in the plugins folder would skip that, but with the pinned pathspec every process
would then log a deprecation warning from Airflow's ignore-file parser.)
"""

from __future__ import annotations

import airflow.sdk.execution_time.task_runner  # noqa: F401  the code every task process starts with
import fraud_ops.notify  # noqa: F401
import fraud_ops.runners  # noqa: F401
import fraud_ops.sensors  # noqa: F401
import fraud_ops.spark  # noqa: F401  with it the Spark provider and the Kubernetes clients
from airflow.plugins_manager import AirflowPlugin


class FraudPreload(AirflowPlugin):
    name = "fraud_preload"
