"""What each step reads and writes for day D: one table, the answer to "what does scoring D read?".

Each :class:`Step` names the datasets and day spans it reads (offsets named by the calendar, never
a number here) and the datasets it publishes. Everything that needs to know a step's inputs asks
this table: the DAG's sensors wait for :func:`required_days`, the jobs discover their input
partitions with it, lineage records what it lists, ``python -m jobs.lineage repair`` recomputes in
:data:`ORDER`, and the demo and the tests bootstrap history from it. docs/contract.md ("Step
contracts") is the same table in prose.

A read is *required* (the step waits for every expected day: on or after the first date) or
*optional* (the step reads what is published and records what was absent, so a partition that
appears later makes the reader stale instead of silently missing).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

from jobs.common.calendar import Calendar
from jobs.common.datasets import Dataset


@dataclass(frozen=True)
class Read:
    dataset: str
    first: str | int  # days back from D of the oldest day read: a Calendar attribute, or 0 (D itself)
    last: str | int = 0  # days back of the newest day read
    required: bool = True

    def days(self, cal: Calendar, day: date, window_days: int | None = None) -> list[date]:
        return cal.span(day, _offset(cal, self.first, window_days), _offset(cal, self.last, window_days))


@dataclass(frozen=True)
class Step:
    name: str
    reads: tuple[Read, ...]
    writes: tuple[str, ...]
    decision: str | None = None  # the registry decision it needs: "previous" or "latest" training day

    def read(self, dataset: str) -> tuple[Read, ...]:
        return tuple(r for r in self.reads if r.dataset == dataset)


def _offset(cal: Calendar, offset: str | int, window_days: int | None) -> int:
    if isinstance(offset, int):
        return offset
    value = getattr(cal, offset)
    return value(window_days) if callable(value) else value


CLEAN = Step(
    "clean",
    reads=(
        Read(Dataset.LANDING, 0),
        Read(Dataset.LANDING_LABELS, 0),  # waited for only with the label feed on (FRAUD_LABEL_FEED)
        Read(Dataset.CLEAN, "label_lookback_days", 1),  # a label event must name a known transaction
    ),
    writes=(Dataset.CLEAN, Dataset.QUARANTINE, Dataset.CLEAN_LABELS, Dataset.QUARANTINE_LABELS),
)
QUALITY_GATE = Step(
    "quality_gate",
    reads=(Read(Dataset.CLEAN, "gate_trailing_days", 1), Read(Dataset.CLEAN, 0)),
    writes=(),
)
FEATURES = Step(
    "features",
    reads=(
        Read(Dataset.CLEAN, "feature_history_days"),  # the rows, and their inline labels
        Read(Dataset.CLEAN_LABELS, "feature_history_days"),  # label events that arrived in the window
    ),
    writes=(Dataset.FEATURES,),
)
TRAIN = Step(
    "train",
    # the windows ending T-8 and T-15 and the model history before them; their labels as of T
    reads=(
        Read(Dataset.FEATURES, "training_reach", "last_labelled_offset"),
        Read(Dataset.CLEAN, "training_reach", "last_labelled_offset"),
        Read(Dataset.CLEAN_LABELS, "training_reach", 1),
    ),
    writes=(Dataset.MODELS,),
    decision="previous",
)
SCORE = Step(
    "score",
    reads=(
        Read(Dataset.FEATURES, "model_history_days"),
        # the labels of the terminal rows the model sees, as of each scored transaction
        Read(Dataset.CLEAN, "model_history_days", "label_delay_days"),
        Read(Dataset.CLEAN_LABELS, "model_history_days"),
    ),
    writes=(Dataset.SCORES, Dataset.ALERTS),
    decision="latest",
)
REPORT = Step(
    "report",
    reads=(
        Read(Dataset.CLEAN, "report_history_days", required=False),
        Read(Dataset.QUARANTINE, 0, required=False),
        Read(Dataset.CLEAN_LABELS, "report_history_days", 1, required=False),
        Read(Dataset.QUARANTINE_LABELS, 0, required=False),
        Read(Dataset.FEATURES, 0, required=False),
        Read(Dataset.SCORES, "report_history_days", "last_labelled_offset", required=False),
        Read(Dataset.SCORES, 0, required=False),
        Read(Dataset.ALERTS, "report_history_days", "last_labelled_offset", required=False),  # alert precision
        Read(Dataset.ALERTS, 0, required=False),
    ),
    writes=(Dataset.REPORTS,),
)

STEPS: dict[str, Step] = {s.name: s for s in (CLEAN, QUALITY_GATE, FEATURES, TRAIN, SCORE, REPORT)}
ORDER: tuple[str, ...] = tuple(STEPS)  # dependency order: every step reads only what earlier steps write


def step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise KeyError(f"no step {name!r} (steps: {', '.join(STEPS)})") from None


def writer_of(dataset: str) -> Step:
    for s in STEPS.values():
        if dataset in s.writes:
            return s
    raise KeyError(f"no step writes {dataset!r}")


def read_days(
    name: str, dataset: str, day: date, cal: Calendar, window_days: int | None = None, required: bool | None = None
) -> list[date]:
    """The days of ``dataset`` that step ``name`` reads for D (every day of its spans, oldest first)."""
    days: set[date] = set()
    for r in step(name).read(dataset):
        if required is None or r.required == required:
            days.update(r.days(cal, day, window_days))
    return sorted(days)


def required_days(
    names: str | Iterable[str], dataset: str, days: Iterable[date], cal: Calendar, window_days: int | None = None
) -> list[date]:
    """The expected partitions of ``dataset`` the steps wait for before running for ``days``."""
    names = [names] if isinstance(names, str) else list(names)
    wanted: set[date] = set()
    for day in days:
        for name in names:
            wanted.update(read_days(name, dataset, day, cal, window_days, required=True))
    return cal.expected(wanted)


def upstream(runs: Iterable[tuple[str, date]], cal: Calendar, window_days: int | None = None) -> dict[str, list[date]]:
    """Every expected partition that the step runs ``(step, day)`` read, directly or through the steps
    that write what they read, per dataset: what a bootstrap must publish (landing has no writer here,
    and the registry's decisions come from training days in order, so neither is followed further)."""
    out: dict[str, set[date]] = {}
    todo = list(runs)
    seen = set(todo)
    while todo:
        name, day = todo.pop()
        for r in step(name).reads:
            for d in cal.expected(r.days(cal, day, window_days)):
                out.setdefault(r.dataset, set()).add(d)
                writers = [s.name for s in STEPS.values() if r.dataset in s.writes]
                if writers and (writers[0], d) not in seen:
                    seen.add((writers[0], d))
                    todo.append((writers[0], d))
    return {dataset: sorted(days) for dataset, days in out.items()}
