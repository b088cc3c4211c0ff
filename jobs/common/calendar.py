"""The pipeline's calendar: every day offset that decides which partitions a step reads.

No other module holds a count of days that shapes a read. The label delay is the root of most
offsets (docs/contract.md, "The calendar"): a label may be used ``label_delay_days`` after its
transaction, so the terminal windows end that long before a transaction, training for day T uses
days up to T - (delay + 1), and so on. Change ``FRAUD_LABEL_DELAY_DAYS`` and every offset below,
the DAG's sensors and the jobs' input discovery follow.

Offsets are counted back from the day D a step runs for: ``span(first, last)`` is the list of days
D - first .. D - last, oldest first. Lengths that are configuration (the training window, the
training cadence) come from :mod:`jobs.common.config`; the feature windows (1, 7, 30 days) are part
of the feature definition in :mod:`jobs.common.schema`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from jobs.common.config import settings

SECONDS_PER_DAY = 86_400
MICROS_PER_DAY = SECONDS_PER_DAY * 1_000_000
EPOCH = date(1970, 1, 1)
ONE_DAY = timedelta(days=1)
WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)  # the feature windows (docs/contract.md, "Features")


# --- plain day arithmetic ---------------------------------------------------------------------------
def parse_day(text: str | date) -> date:
    if isinstance(text, date):
        return text
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}") from exc


def day_range(start: date, end: date) -> list[date]:
    """Inclusive list of days from start to end."""
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def shift(day: date, days: int) -> date:
    return day + timedelta(days=days)


def epoch_day(day: date) -> int:
    """Days since 1970-01-01 (what a microsecond timestamp // MICROS_PER_DAY gives)."""
    return (day - EPOCH).days


def from_epoch_day(n: int) -> date:
    return EPOCH + timedelta(days=int(n))


def micros_at_midnight(day: date) -> int:
    return (datetime(day.year, day.month, day.day) - datetime(1970, 1, 1)) // timedelta(microseconds=1)


def format_days(days: Iterable[date]) -> str:
    """``2018-04-01..2018-04-03, 2018-04-07``: consecutive days collapsed into ranges."""
    return ", ".join(a.isoformat() if a == b else f"{a}..{b}" for a, b in runs_of(days))


def runs_of(days: Iterable[date]) -> list[tuple[date, date]]:
    """Consecutive days grouped into inclusive (first, last) runs, in date order."""
    runs: list[list[date]] = []
    for day in sorted(set(days)):
        if runs and day - runs[-1][1] == ONE_DAY:
            runs[-1][1] = day
        else:
            runs.append([day, day])
    return [(a, b) for a, b in runs]


# --- the offsets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calendar:
    """The day offsets of one configuration. Build it with :func:`calendar` (reads the settings)."""

    first_date: date
    label_delay_days: int = 7  # a label may be used this long after its transaction
    train_every_days: int = 7  # training days: first_date + k x this
    train_window_days: int = 21  # default length of the labelled training window
    card_history_days: int = 7  # the sequence model looks this far back for a card's earlier rows
    terminal_weeks_matured: int = 1  # ... and this many weeks of matured rows for a terminal's history
    validation_week_days: int = 7  # promotion compares on this many labelled days
    gate_trailing_days: int = 7  # the quality gate compares a day's volume with this many days before it
    label_lookback_days: int = 120  # a label event must name a transaction of this many days before it
    report_matured_days: int = 30  # the report's performance trend covers this many matured days
    reference_window_days: int = 7  # the reference protocol trains on one week

    # --- derived offsets ---------------------------------------------------------------------------
    @property
    def feature_history_days(self) -> int:
        """Features of D read clean days D - this .. D: the longest terminal window ends the delay before t."""
        return max(WINDOWS_DAYS) + self.label_delay_days

    @property
    def last_labelled_offset(self) -> int:
        """Days <= D - this have every label matured before D begins (the delay, plus the day itself)."""
        return self.label_delay_days + 1

    @property
    def validation_offset(self) -> int:
        """The configuration under test is trained on the window ending T - this (one week earlier)."""
        return self.last_labelled_offset + self.validation_week_days

    @property
    def terminal_history_days(self) -> int:
        """The sequence model's terminal rows: at least the delay old, from this many days back."""
        return self.label_delay_days + 7 * self.terminal_weeks_matured

    @property
    def model_history_days(self) -> int:
        """Feature days before a scored or trained day that the default model reads."""
        return max(self.card_history_days, self.terminal_history_days)

    @property
    def report_history_days(self) -> int:
        """The report looks back this far: its matured days end the delay + 1 before D."""
        return self.last_labelled_offset + self.report_matured_days - 1

    @property
    def label_delay_us(self) -> int:
        return self.label_delay_days * MICROS_PER_DAY

    # --- spans -------------------------------------------------------------------------------------
    @staticmethod
    def span(day: date, first_back: int, last_back: int = 0) -> list[date]:
        """Days D - first_back .. D - last_back, oldest first (empty when first_back < last_back)."""
        return [day - timedelta(days=n) for n in range(first_back, last_back - 1, -1)]

    def expected(self, days: Iterable[date]) -> list[date]:
        """The days that should exist: on or after the first date (earlier ones never did)."""
        return sorted(d for d in set(days) if d >= self.first_date)

    def feature_inputs(self, day: date) -> list[date]:
        return self.span(day, self.feature_history_days)

    def train_window(self, train_day: date, window_days: int | None = None, offset: int | None = None) -> list[date]:
        """The labelled days a model trained on T uses: ``window_days`` ending T - offset (default T - 8)."""
        window_days = window_days or self.train_window_days
        end = self.last_labelled_offset if offset is None else offset
        return self.span(train_day, end + window_days - 1, end)

    def validation_window(self, train_day: date, window_days: int | None = None) -> list[date]:
        """The window the configuration under test is trained on to be compared: ending T - 15."""
        return self.train_window(train_day, window_days, self.validation_offset)

    def validation_week(self, train_day: date) -> list[date]:
        """The labelled week T-14 .. T-8 on which candidate and champion are compared."""
        return self.span(train_day, self.validation_offset - 1, self.last_labelled_offset)

    def history_before(self, days: Sequence[date], lookback_days: int) -> list[date]:
        """The ``lookback_days`` days before the first of ``days`` (a model's history)."""
        return self.span(min(days), lookback_days, 1)

    def training_reach(self, window_days: int | None = None) -> int:
        """How far back training on T reads features: the validation window and the model history before it."""
        return self.validation_offset + (window_days or self.train_window_days) - 1 + self.model_history_days

    def gate_trailing(self, day: date) -> list[date]:
        return self.span(day, self.gate_trailing_days, 1)

    def label_lookback(self, day: date) -> list[date]:
        return self.span(day, self.label_lookback_days, 1)

    def report_matured(self, day: date) -> list[date]:
        """Scored days whose labels have all matured by D: the last ``report_matured_days`` of them."""
        return self.span(day, self.last_labelled_offset + self.report_matured_days - 1, self.last_labelled_offset)

    def known_label_days(self, train_start: date, test_day: date) -> list[date]:
        """The test-set rule: days whose known frauds block a card on test day T (train start .. T - 8)."""
        last = test_day - timedelta(days=self.last_labelled_offset)
        return day_range(train_start, last) if last >= train_start else []

    # --- the reference protocol's folds (docs/contract.md, "Model quality") ----------------------------
    def weekly(self, first: date, count: int) -> list[date]:
        """``count`` fold starts a validation week apart from ``first``."""
        return [first + timedelta(days=self.validation_week_days * i) for i in range(count)]

    def reference_fold(self, start: date, window_days: int) -> tuple[list[date], list[date]]:
        """A fold starting on ``start``: the training window (``window_days`` ending where the
        reference's training week ends), then the label delay skipped, then a test week."""
        end = start + timedelta(days=self.validation_week_days - 1)
        train = self.span(end, window_days - 1, 0)
        test_start = end + timedelta(days=self.last_labelled_offset)
        return train, day_range(test_start, test_start + timedelta(days=self.validation_week_days - 1))

    def labels_known_before(self, day: date) -> datetime:
        """Target labels of day D are those reported before D began."""
        return datetime(day.year, day.month, day.day)

    # --- training days -----------------------------------------------------------------------------
    @property
    def schedule(self) -> TrainingSchedule:
        return TrainingSchedule(self.first_date, self.train_every_days, self.train_window_days, self)


def calendar() -> Calendar:
    """The calendar of the current settings (read now: tests change the environment between calls)."""
    cfg = settings()
    return Calendar(
        first_date=cfg.first_date,
        label_delay_days=cfg.label_delay_days,
        train_every_days=cfg.train_every_days,
        train_window_days=cfg.train_window_days,
        label_lookback_days=cfg.label_lookback_days,
    )


@dataclass(frozen=True)
class TrainingSchedule:
    """Training days: ``first_date + k * every_days`` from the first one with a whole labelled window.

    The DAG branches on it, the registry orders decisions by it, and scoring D uses the decision
    of the latest training day <= D.
    """

    first_date: date
    every_days: int = 7
    window_days: int = 7
    cal: Calendar | None = None

    @classmethod
    def from_settings(cls) -> TrainingSchedule:
        return calendar().schedule

    @property
    def calendar(self) -> Calendar:
        return self.cal or Calendar(self.first_date, train_every_days=self.every_days, train_window_days=self.window_days)

    @property
    def first_training_day(self) -> date:
        earliest = self.first_date + timedelta(days=self.window_days - 1 + self.calendar.last_labelled_offset)
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

    def latest_training_day_before(self, day: date) -> date | None:
        """The latest training day strictly before ``day`` (what training on ``day`` waits for)."""
        return self.latest_training_day(day - ONE_DAY)

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
