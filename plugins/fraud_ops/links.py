"""Extra links of the `score` and `report` tasks: the day's report and alert list in the UI.

The pages are served by the API server itself (``fraud_ops.reports_ui``, mounted by the plugin
``plugins/fraud_reports.py`` at ``/fraud-reports``). Airflow 3 computes an operator's links on the
worker when the task instance finishes and stores each as an XCom (``_link_<class name>``); the API
server's ``.../taskInstances/{task_id}/links`` reads them back. So ``get_link`` runs with the
task's rendered fields and its runtime task instance at hand, and the day comes from the task's own
``--date`` argument (the ``plan`` task's ``day``, rendered), else from that XCom.

The URL is a path under the UI's base URL (``[api] base_url``): the UI opens it on its own origin,
whatever host name a browser reached it by.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import date
from urllib.parse import urlsplit

from airflow.sdk import BaseOperatorLink

REPORTS_PREFIX = "fraud-reports"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def as_day(value) -> str | None:
    """``value`` as a ``YYYY-MM-DD`` string if it is a real date, else None."""
    text = str(value).strip() if value is not None else ""
    if not DATE_RE.match(text):
        return None
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        return None


def base_path(base_url: str | None) -> str:
    """The path part of the UI's base URL, with one trailing slash ("/" when there is none)."""
    path = urlsplit(base_url or "").path
    return path.rstrip("/") + "/"


def report_url(day: str, suffix: str = "", base_url: str | None = None) -> str:
    """``<base path>fraud-reports/<day><suffix>``; ``base_url`` defaults to ``[api] base_url``."""
    if base_url is None:
        from airflow.sdk import conf

        base_url = conf.get("api", "base_url", fallback="")
    return f"{base_path(base_url)}{REPORTS_PREFIX}/{day}{suffix}"


def _date_argument(argv) -> str | None:
    if not isinstance(argv, list | tuple):
        return None
    args = [str(a) for a in argv]
    for i, arg in enumerate(args[:-1]):
        if arg == "--date":
            return as_day(args[i + 1])
    return None


def run_day(operator, ti) -> str | None:
    """The day D a task instance worked on: its rendered ``--date`` argument (``command`` or, for a
    pod, ``arguments``), else the ``plan`` task's ``day`` XCom of the same run."""
    for field in ("command", "arguments"):
        day = _date_argument(getattr(operator, field, None))
        if day:
            return day
    pull = getattr(ti, "xcom_pull", None)
    if pull is None:
        return None
    try:
        return as_day(pull(task_ids="plan", key="day"))
    except Exception:  # noqa: BLE001 - no plan XCom (a task run alone): no link rather than a failed task
        return None


class _ReportsLink(BaseOperatorLink):
    suffix = ""

    def get_link(self, operator, *, ti_key) -> str:
        day = run_day(operator, ti_key)
        return report_url(day, self.suffix) if day else ""


class ReportLink(_ReportsLink):
    """The day's report page."""

    name = "Report"


class AlertListLink(_ReportsLink):
    """The day's alert list, each card with its transactions."""

    name = "Alert list"
    suffix = "/alerts"


REPORT_LINKS: Sequence[BaseOperatorLink] = (ReportLink(), AlertListLink())
