"""Which days are training days, and the dates that training and promotion look at (SPEC §5).

Training days are anchored on the pipeline's first date: ``first_date + k * every`` for k >= 0,
from the first one that has a whole labelled window (days <= T-8, all on or after first_date).
The DAG uses this to branch; the registry uses it to order decisions; scoring D uses the
decision of the latest training day <= D.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from jobs.common.config import settings
from jobs.common.schema import LABEL_DELAY_DAYS

# Training for T may use whole days whose labels all matured before T began: days <= T - 8.
LAST_LABELLED_OFFSET = LABEL_DELAY_DAYS + 1
CARD_HISTORY_DAYS = 7  # feature days before a scored or trained day that the sequence model's card history reaches
TERMINAL_HISTORY_DAYS = 14  # ... and its terminal history (rows at least LABEL_DELAY_DAYS old: D-14 .. D-7)
MODEL_HISTORY_DAYS = max(CARD_HISTORY_DAYS, TERMINAL_HISTORY_DAYS)  # feature days the default model reads before a day


@dataclass(frozen=True)
class TrainingSchedule:
    first_date: date
    every_days: int = 7
    window_days: int = 7

    @classmethod
    def from_settings(cls) -> TrainingSchedule:
        cfg = settings()
        return cls(cfg.first_date, cfg.train_every_days, cfg.train_window_days)

    @property
    def first_training_day(self) -> date:
        earliest = self.first_date + timedelta(days=self.window_days - 1 + LAST_LABELLED_OFFSET)
        k = -(-(earliest - self.first_date).days // self.every_days)  # ceil
        return self.first_date + timedelta(days=k * self.every_days)

    def is_training_day(self, day: date) -> bool:
        return day >= self.first_training_day and (day - self.first_date).days % self.every_days == 0

    def latest_training_day(self, day: date) -> date | None:
        """The latest training day on or before ``day`` (None before the first one)."""
        if day < self.first_training_day:
            return None
        back = (day - self.first_date).days % self.every_days
        return day - timedelta(days=back)

    def previous_training_day(self, day: date) -> date | None:
        """The training day before training day ``day`` (None for the first)."""
        prev = day - timedelta(days=self.every_days)
        return prev if prev >= self.first_training_day else None

    def training_days(self, start: date, end: date) -> list[date]:
        day = self.latest_training_day(end)
        out = []
        while day is not None and day >= start:
            out.append(day)
            day = self.previous_training_day(day)
        return sorted(out)


def train_window(train_day: date, window_days: int, offset_days: int = LAST_LABELLED_OFFSET) -> list[date]:
    """The labelled days a model trained on ``train_day`` uses: the window ending train_day - offset."""
    end = train_day - timedelta(days=offset_days)
    return [end - timedelta(days=i) for i in range(window_days - 1, -1, -1)]


def validation_week(train_day: date) -> list[date]:
    """The labelled week T-14 .. T-8 on which candidate and champion are compared."""
    return [train_day - timedelta(days=i) for i in range(14, LAST_LABELLED_OFFSET - 1, -1)]
