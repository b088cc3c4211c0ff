"""Failure notification: log the failed task and, if configured, POST it to a webhook."""

from __future__ import annotations

import json
import logging
import urllib.request

from fraud_ops.config import orchestration

log = logging.getLogger(__name__)


def failure_message(context) -> dict:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    exception = context.get("exception")
    return {
        "text": f"fraud pipeline: task {getattr(ti, 'task_id', '?')} failed in run {getattr(dag_run, 'run_id', '?')}",
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "error": str(exception) if exception else None,
        "log_url": getattr(ti, "log_url", None),
    }


def _where(url: str) -> str:
    """The webhook's scheme and host only: its path and query often hold a token."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return f"{parsed.scheme}://{parsed.hostname or '?'}/..."


def notify_failure(context) -> None:
    """``on_failure_callback`` of every task: never raises (a broken webhook must not mask the failure)."""
    message = failure_message(context)
    log.error("%s: %s", message["text"], message["error"])
    url = orchestration().notify_webhook_url
    if not url:
        return
    request = urllib.request.Request(
        url,
        data=json.dumps(message, default=str).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - URL is configuration
            log.info("failure posted to webhook: HTTP %s", response.status)
    except Exception as exc:  # noqa: BLE001 - logged, never raised
        log.warning("could not post the failure to the webhook (%s): %s", _where(url), exc)
