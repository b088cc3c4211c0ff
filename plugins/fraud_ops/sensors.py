"""Sensors that wait for the lake: the landing marker, expected history partitions, a decision.

All run in ``reschedule`` mode by default (a waiting sensor holds no worker slot) and fail with
a message naming what never arrived. "Expected" means on or after the pipeline's first date:
earlier days never existed, so they are not waited for.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta

from airflow.sdk import BaseSensorOperator


def _day(value: str | date) -> date:
    from jobs.common.lake import parse_day

    return parse_day(value)


class _LakeSensor(BaseSensorOperator):
    template_fields: Sequence[str] = ("lake", "day")

    def __init__(self, *, lake: str, day: str, **kwargs) -> None:
        kwargs.setdefault("mode", "reschedule")
        super().__init__(**kwargs)
        self.lake = lake
        self.day = day

    def _lake(self):
        from jobs.common.lake import Lake

        return Lake.from_uri(self.lake)


class LandingSensor(_LakeSensor):
    """Waits for ``landing/transactions/date=D/_SUCCESS``, written last by the source."""

    def poke(self, context) -> bool:
        ready = self._lake().landing_ready(_day(self.day))
        if not ready:
            self.log.info("landing of %s not complete yet (no _SUCCESS) in %s", self.day, self.lake)
        return ready


class PartitionsSensor(_LakeSensor):
    """Waits until every expected partition of ``dataset`` for days D-first_back .. D-last_back is published."""

    template_fields: Sequence[str] = ("lake", "day", "first_back", "last_back")

    def __init__(self, *, dataset: str, first_back: int | str, last_back: int | str = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dataset = dataset
        self.first_back = first_back
        self.last_back = last_back

    def expected_days(self) -> list[date]:
        from jobs.common.config import settings

        day, first_date = _day(self.day), settings().first_date
        days = [day - timedelta(days=n) for n in range(int(self.first_back), int(self.last_back) - 1, -1)]
        return [d for d in days if d >= first_date]

    def poke(self, context) -> bool:
        lake = self._lake()
        missing = [d for d in self.expected_days() if not lake.is_published(self.dataset, d)]
        if missing:
            self.log.info(
                "waiting for %d unpublished %s partitions: %s",
                len(missing),
                self.dataset,
                ", ".join(d.isoformat() for d in missing[:10]) + (" ..." if len(missing) > 10 else ""),
            )
        return not missing


class DecisionSensor(_LakeSensor):
    """Waits for the promotion decision of a training day picked relative to D.

    ``which="latest"``: the latest training day <= D (what scoring D needs);
    ``which="previous"``: the training day before D (what training on D needs).
    No such day (before the first training day): nothing to wait for.
    """

    def __init__(self, *, which: str, **kwargs) -> None:
        if which not in ("latest", "previous"):
            raise ValueError(f"which must be 'latest' or 'previous', got {which!r}")
        super().__init__(**kwargs)
        self.which = which

    def training_day(self) -> date | None:
        from jobs.common.schedule import TrainingSchedule

        schedule, day = TrainingSchedule.from_settings(), _day(self.day)
        if self.which == "latest":
            return schedule.latest_training_day(day)
        latest = schedule.latest_training_day(day - timedelta(days=1))
        return latest

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
