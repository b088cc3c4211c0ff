"""Sensors that wait for the lake: the landing marker, expected history partitions, a decision.

How a sensor waits (``FRAUD_SENSOR_MODE``):

- ``deferrable`` (the default): it looks once in the task; if something is missing it hands the
  wait to the triggerer (``fraud_ops.triggers.LakeWaitTrigger``), which looks at the lake every
  ``poke_interval`` seconds in its event loop and resumes the task when all is there. A waiting
  sensor holds no worker slot and costs no task start per look, which matters in a backfill whose
  later nights wait for the earlier ones; it needs a running triggerer (``make up`` and
  docker-compose start one).
- ``reschedule``: each look is a short task on a worker, the slot freed in between.
- ``poke``: one task holds its slot and looks in a loop.

Whichever the mode, a sensor fails with a message naming what never arrived. "Expected" means on or
after the pipeline's first date: earlier days never existed, so they are not waited for. Each
sensor's condition is a function of the lake alone (:func:`awaiting`), so the task and the
triggerer ask exactly the same question.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from airflow.sdk import BaseSensorOperator


def _day(value: str | date) -> date:
    from jobs.common.calendar import parse_day

    return parse_day(value)


def landing_datasets() -> list[str]:
    """D's landing datasets whose ``_SUCCESS`` clean waits for: the transactions, and the label
    feed's events unless the feed is off (``FRAUD_LABEL_FEED``)."""
    from jobs.common.config import settings
    from jobs.common.contracts import step
    from jobs.common.datasets import Dataset

    landing = [r.dataset for r in step("clean").reads if r.dataset.startswith("landing/")]
    return [d for d in landing if d != Dataset.LANDING_LABELS or settings().label_feed]


def expected_days(steps: Sequence[str], dataset: str, day: date, window_days: int | str | None) -> list[date]:
    """The days of ``dataset`` that ``steps`` read for ``day`` and that exist (on or after the first date)."""
    from jobs.common.calendar import calendar
    from jobs.common.contracts import required_days

    window = int(window_days) if window_days not in (None, "") else None
    return required_days(tuple(steps), dataset, [day], calendar(), window)


def awaiting(kind: str, lake_uri: str, day: str, aws_conn_id: str | None = None, **arguments) -> str | None:
    """What the sensor ``kind`` ("landing", "inputs" or "decision") still waits for on ``lake_uri``
    for ``day``, in words, or None once everything is there."""
    from fraud_ops.store import task_lake
    from jobs.common.calendar import format_days

    lake, d = task_lake(lake_uri, aws_conn_id), _day(day)
    if kind == "landing":
        waiting = [ds for ds in landing_datasets() if not lake.landing_ready(d, ds)]
        return f"landing of {day} not complete yet (no _SUCCESS) in {lake_uri}: {', '.join(waiting)}" if waiting else None
    if kind == "inputs":
        dataset = arguments["dataset"]
        expected = expected_days(arguments["steps"], dataset, d, arguments.get("window_days"))
        missing = lake.awaited(dataset, expected)  # an abandoned day is not waited for
        return f"waiting for {len(missing)} unpublished {dataset} partitions: {format_days(missing)}" if missing else None
    if kind == "decision":
        from jobs.torch.registry import Registry

        train_day = arguments.get("train_day")
        if train_day is None:
            return None
        return None if Registry(lake).decision(_day(train_day)) is not None else f"waiting for decision of {train_day}"
    raise ValueError(f"no sensor kind {kind!r}")


class _LakeSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("lake", "day")
    kind = ""

    def __init__(self, *, lake: str, day: str, aws_conn_id: str | None = None, **kwargs) -> None:
        mode = kwargs.pop("mode", "deferrable")
        self.deferrable = mode == "deferrable"
        super().__init__(mode="poke" if self.deferrable else mode, **kwargs)
        self.lake = lake
        self.day = day
        self.aws_conn_id = aws_conn_id

    def arguments(self) -> dict:
        """The sensor's own question, beyond the lake and the day (JSON-serialisable: the trigger's)."""
        return {}

    def poke(self, context) -> bool:
        waiting = awaiting(self.kind, self.lake, self.day, self.aws_conn_id, **self.arguments())
        if waiting:
            self.log.info("%s", waiting)
        return waiting is None

    def execute(self, context):
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):  # most nights: everything is there already, no trigger at all
            return None
        from fraud_ops.triggers import LakeWaitTrigger

        self.defer(trigger=LakeWaitTrigger(kind=self.kind, lake=self.lake, day=self.day, aws_conn_id=self.aws_conn_id,
                                           arguments=self.arguments(), poke_seconds=self.poke_interval,
                                           timeout_seconds=self.timeout),
                   method_name="resume", timeout=timedelta(seconds=self.timeout + 3600))

    def resume(self, context, event: dict | None = None) -> None:
        """Back from the triggerer: done, or what never arrived (no retry: the wait had its time)."""
        from airflow.sdk.exceptions import AirflowException, AirflowSensorTimeout

        event = event or {}
        if event.get("status") == "done":
            self.log.info("everything %s waited for is there", self.task_id)
            return
        if event.get("status") == "timeout":
            raise AirflowSensorTimeout(f"{self.task_id} timed out after {self.timeout:.0f} s: {event.get('message')}")
        raise AirflowException(f"{self.task_id}: the wait failed in the triggerer: {event.get('message')}")


class LandingSensor(_LakeSensor):
    """Waits for the ``_SUCCESS`` markers of D's landing data, written last by the sources: the
    transactions, and the label feed's events unless the feed is off (``FRAUD_LABEL_FEED``)."""

    kind = "landing"

    def datasets(self) -> list[str]:
        return landing_datasets()


class InputsSensor(_LakeSensor):
    """Waits until every expected partition of ``dataset`` that ``steps`` read for D is published.

    The days come from the step contracts (``jobs.common.contracts``) and the calendar, never from
    the DAG: change an offset there and the sensor follows. ``window_days`` (templated) is the
    training window length the train step's contract depends on.
    """

    template_fields: Sequence[str] = ("lake", "day", "window_days")
    kind = "inputs"

    def __init__(self, *, steps: str | Sequence[str], dataset: str, window_days: int | str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = (steps,) if isinstance(steps, str) else tuple(steps)
        self.dataset = dataset
        self.window_days = window_days

    def arguments(self) -> dict:
        return {"steps": list(self.steps), "dataset": self.dataset, "window_days": self.window_days}

    def expected_days(self) -> list[date]:
        return expected_days(self.steps, self.dataset, _day(self.day), self.window_days)


class DecisionSensor(_LakeSensor):
    """Waits for the promotion decision that ``step`` needs for D (its contract's ``decision``).

    ``"latest"`` (scoring): the latest training day <= D; ``"previous"`` (training): the latest
    training day before D. No such day (before the first training day): nothing to wait for.
    """

    kind = "decision"

    def __init__(self, *, step: str, **kwargs) -> None:
        from jobs.common.contracts import step as contract

        which = contract(step).decision
        if which not in ("latest", "previous"):
            raise ValueError(f"step {step!r} needs no decision")
        super().__init__(**kwargs)
        self.step = step
        self.which = which

    def training_day(self) -> date | None:
        from jobs.common.calendar import TrainingSchedule

        schedule, day = TrainingSchedule.from_settings(), _day(self.day)
        if self.which == "latest":
            return schedule.latest_training_day(day)
        return schedule.latest_training_day_before(day)

    def arguments(self) -> dict:
        train_day = self.training_day()
        return {"train_day": train_day.isoformat() if train_day else None}

    def poke(self, context) -> bool:
        if self.training_day() is None:
            self.log.info("no training day before %s: no decision to wait for", self.day)
            return True
        return super().poke(context)
