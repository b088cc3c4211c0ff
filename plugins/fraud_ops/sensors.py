"""Sensors that wait for the lake: the landing marker, expected history partitions, a decision.

All run in ``reschedule`` mode by default (a waiting sensor holds no worker slot) and fail with
a message naming what never arrived. "Expected" means on or after the pipeline's first date:
earlier days never existed, so they are not waited for.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from airflow.sdk import BaseSensorOperator


def _day(value: str | date) -> date:
    from jobs.common.calendar import parse_day

    return parse_day(value)


class _LakeSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("lake", "day")

    def __init__(self, *, lake: str, day: str, aws_conn_id: str | None = None, **kwargs) -> None:
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.lake = lake
        self.day = day
        self.aws_conn_id = aws_conn_id

    def _lake(self):
        from fraud_ops.store import task_lake

        return task_lake(self.lake, self.aws_conn_id)


class LandingSensor(_LakeSensor):
    """Waits for the ``_SUCCESS`` markers of D's landing data, written last by the sources: the
    transactions, and the label feed's events unless the feed is off (``FRAUD_LABEL_FEED``)."""

    def datasets(self) -> list[str]:
        from jobs.common.config import settings
        from jobs.common.contracts import step
        from jobs.common.datasets import Dataset

        landing = [r.dataset for r in step("clean").reads if r.dataset.startswith("landing/")]
        return [d for d in landing if d != Dataset.LANDING_LABELS or settings().label_feed]

    def poke(self, context) -> bool:
        lake, day = self._lake(), _day(self.day)
        waiting = [d for d in self.datasets() if not lake.landing_ready(day, d)]
        if waiting:
            self.log.info("landing of %s not complete yet (no _SUCCESS) in %s: %s", self.day, self.lake,
                          ", ".join(waiting))
        return not waiting


class InputsSensor(_LakeSensor):
    """Waits until every expected partition of ``dataset`` that ``steps`` read for D is published.

    The days come from the step contracts (``jobs.common.contracts``) and the calendar, never from
    the DAG: change an offset there and the sensor follows. ``window_days`` (templated) is the
    training window length the train step's contract depends on.
    """

    template_fields: Sequence[str] = ("lake", "day", "window_days")

    def __init__(self, *, steps: str | Sequence[str], dataset: str, window_days: int | str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps = (steps,) if isinstance(steps, str) else tuple(steps)
        self.dataset = dataset
        self.window_days = window_days

    def expected_days(self) -> list[date]:
        from jobs.common.calendar import calendar
        from jobs.common.contracts import required_days

        window = int(self.window_days) if self.window_days not in (None, "") else None
        return required_days(self.steps, self.dataset, [_day(self.day)], calendar(), window)

    def poke(self, context) -> bool:
        from jobs.common.calendar import format_days

        lake = self._lake()
        missing = lake.awaited(self.dataset, self.expected_days())  # an abandoned day is not waited for
        if missing:
            self.log.info("waiting for %d unpublished %s partitions: %s", len(missing), self.dataset,
                          format_days(missing))
        return not missing


class DecisionSensor(_LakeSensor):
    """Waits for the promotion decision that ``step`` needs for D (its contract's ``decision``).

    ``"latest"`` (scoring): the latest training day <= D; ``"previous"`` (training): the latest
    training day before D. No such day (before the first training day): nothing to wait for.
    """

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

    def poke(self, context) -> bool:
        from jobs.torch.registry import Registry

        train_day = self.training_day()
        if train_day is None:
            self.log.info("no training day before %s: no decision to wait for", self.day)
            return True
        decision = Registry(self._lake()).decision(train_day)
        if decision is None:
            self.log.info("waiting for decision of %s", train_day)
            return False
        self.log.info("decision of %s: %s", train_day, decision)
        return True
