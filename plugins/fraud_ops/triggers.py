"""The triggerer's side of a deferred lake sensor (``fraud_ops.sensors``): look at the lake every
``poke_seconds`` in the triggerer's event loop, the look itself in a thread (file or S3 I/O), and
fire once everything is there, or once the wait has lasted ``timeout_seconds`` (with what is still
missing), or if a look fails (with its error)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class LakeWaitTrigger(BaseTrigger):
    def __init__(self, *, kind: str, lake: str, day: str, aws_conn_id: str | None, arguments: dict,
                 poke_seconds: float, timeout_seconds: float, started: float | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.lake = lake
        self.day = day
        self.aws_conn_id = aws_conn_id
        self.arguments = arguments
        self.poke_seconds = poke_seconds
        self.timeout_seconds = timeout_seconds
        self.started = time.time() if started is None else started  # kept across a triggerer restart

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("fraud_ops.triggers.LakeWaitTrigger", {
            "kind": self.kind, "lake": self.lake, "day": self.day, "aws_conn_id": self.aws_conn_id,
            "arguments": self.arguments, "poke_seconds": self.poke_seconds, "timeout_seconds": self.timeout_seconds,
            "started": self.started})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from fraud_ops.sensors import awaiting

        while True:
            try:
                waiting = await asyncio.to_thread(awaiting, self.kind, self.lake, self.day, self.aws_conn_id,
                                                  **self.arguments)
            except Exception as exc:  # noqa: BLE001 - handed to the task, which fails and retries
                yield TriggerEvent({"status": "error", "message": f"{type(exc).__name__}: {exc}"})
                return
            if waiting is None:
                yield TriggerEvent({"status": "done"})
                return
            if time.time() - self.started >= self.timeout_seconds:
                yield TriggerEvent({"status": "timeout", "message": waiting})
                return
            self.log.info("%s", waiting)
            await asyncio.sleep(self.poke_seconds)
