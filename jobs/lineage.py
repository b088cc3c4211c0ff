"""``python -m jobs.lineage status|repair|migrate|abandon --lake URI``: stale partitions, seen and repaired.

Every published partition records the inputs it was computed from, each with the content digest it
had then (``jobs.common.provenance``). A partition is *stale* when an input's digest now differs
from the recorded one (it was republished, appeared or disappeared), or when an input is itself
stale; the *root change* is the input whose digest moved. A partition written before lineage
existed is *unknown*, never stale. Model versions record their training inputs the same way: a
version trained on inputs that have since changed is stale, but repairing it means retraining,
which changes decisions, so ``repair`` only says what a retrain would touch.

    status   one line per stale partition (``--json`` for a machine); exit 0 nothing stale,
             1 stale partitions, 2 only model versions stale, 3 an error
    repair   recompute the stale partitions in dependency order (clean, features, score, report)
             with the same jobs, range runs where days are consecutive, until status says 0 or 2
    migrate  store content digests in manifests written before they existed (no data rewritten)
    abandon  ``--step clean|features --date D --reason …``: record that a day of that step's outputs
             will never be published (a failed gate nobody will fix), so the days that read it as
             history stop waiting and go on without it; their lineage names it, and if it is
             published after all they show as stale here

``repair`` is safe beside the scheduler: every job publishes through the lake's attempt folders
and manifests, so a reader sees the old or the new partition whole, and two writers of one
partition from the same inputs write the same content (the same digest). A scheduled run that
read an input before repair republished it publishes a partition that shows as stale again; the
next ``status`` names it.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date

from jobs.common import commands, contracts
from jobs.common.calendar import Calendar, calendar, format_days, parse_day, runs_of
from jobs.common.cli import EXIT_NO_CHAMPION, EXIT_OK, EXIT_WAITING
from jobs.common.lake import MANIFEST, Dataset, Lake, content_digest
from jobs.common.provenance import CHAMPION, LANDING

EXIT_STALE = 1
EXIT_MODELS_STALE = 2
EXIT_ERROR = 3

# The datasets whose partitions carry lineage, in dependency order (what repair recomputes).
TRACKED: tuple[str, ...] = tuple(
    ds for name in contracts.ORDER for ds in contracts.step(name).writes if ds != Dataset.MODELS
)


@dataclass(frozen=True)
class Root:
    dataset: str
    date: str
    change: str  # republished | appeared | removed | champion ...

    def __str__(self) -> str:
        return f"{self.dataset} {self.date} {self.change}"


@dataclass
class Finding:
    dataset: str
    date: date
    roots: list[Root]
    parameters: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.dataset:24s} {self.date}  <- " + "; ".join(str(r) for r in self.roots)


@dataclass
class StaleModel:
    version: str
    train_day: str
    role: str
    roots: list[Root]
    touches: str

    def line(self) -> str:
        return (f"models/versions/{self.version} (trained for {self.train_day}, {self.role})  <- "
                + "; ".join(str(r) for r in self.roots) + f"\n    a retrain would touch: {self.touches}")


@dataclass
class Status:
    stale: list[Finding]
    models: list[StaleModel]
    unknown: int
    checked: int

    @property
    def code(self) -> int:
        if self.stale:
            return EXIT_STALE
        return EXIT_MODELS_STALE if self.models else EXIT_OK

    def to_json(self) -> dict:
        return {
            "stale": [{"dataset": f.dataset, "date": f.date.isoformat(), "roots": [vars(r) for r in f.roots]}
                      for f in self.stale],
            "models": [{"version": m.version, "train_day": m.train_day, "role": m.role,
                        "roots": [vars(r) for r in m.roots], "retrain_would_touch": m.touches} for m in self.models],
            "unknown": self.unknown,
            "checked": self.checked,
            "exit": self.code,
        }


class LineageView:
    """The lake's manifests and champion history, read once, and staleness computed over them."""

    def __init__(self, lake: Lake, cal: Calendar):
        from jobs.torch.registry import Registry

        self.lake = lake
        self.cal = cal
        self.registry = Registry(lake, cal)
        self._manifests: dict[tuple[str, date], dict | None] = {}
        self._digests: dict[tuple[str, date], str | None] = {}
        self._roots: dict[tuple[str, date], list[Root] | None] = {}
        self._champions: dict[date, str | None] = {}

    def manifest(self, dataset: str, day: date) -> dict | None:
        key = (dataset, day)
        if key not in self._manifests:
            self._manifests[key] = self.lake.manifest(dataset, day)
        return self._manifests[key]

    def current(self, dataset: str, day: date) -> str | None:
        """What an input's digest is now."""
        key = (dataset, day)
        if key not in self._digests:
            if dataset == CHAMPION:
                self._digests[key] = self.champion(day)
            elif dataset in LANDING:
                self._digests[key] = self.lake.landing_digest(day, dataset)
            else:
                self._digests[key] = self.lake.digest(dataset, day, self.manifest(dataset, day))
        return self._digests[key]

    def champion(self, day: date) -> str | None:
        from jobs.torch.registry import WaitingForDecision

        if day not in self._champions:
            try:
                found = self.registry.champion_as_of(day)
                self._champions[day] = found["version"] if found else None
            except WaitingForDecision:
                self._champions[day] = "(waiting for a decision)"
        return self._champions[day]

    def roots(self, dataset: str, day: date) -> list[Root] | None:
        """The root changes that make a partition stale ([] if fresh, None if it predates lineage)."""
        key = (dataset, day)
        if key in self._roots:
            return self._roots[key]
        self._roots[key] = []  # a cycle cannot happen (inputs are upstream), but never recurse forever
        manifest = self.manifest(dataset, day)
        provenance = (manifest or {}).get("lineage")
        if not provenance:
            self._roots[key] = None
            return None
        self._roots[key] = self.input_roots(provenance.get("inputs", []))
        return self._roots[key]

    def input_roots(self, inputs: list[dict]) -> list[Root]:
        found: dict[tuple, Root] = {}
        for item in inputs:
            dataset, day, recorded = item["dataset"], parse_day(item["date"]), item.get("digest")
            now = self.current(dataset, day)
            if now != recorded:
                if dataset == CHAMPION:
                    change = f"champion changed: {recorded} -> {now}"
                else:
                    change = "appeared" if recorded is None else "removed" if now is None else "republished"
                root = Root(dataset, day.isoformat(), change)
                found[(root.dataset, root.date)] = root
            elif dataset != CHAMPION and dataset not in LANDING:
                for root in self.roots(dataset, day) or []:
                    found[(root.dataset, root.date)] = root
        return sorted(found.values(), key=lambda r: (r.date, r.dataset))

    def status(self, start: date | None = None, end: date | None = None) -> Status:
        stale, unknown, checked = [], 0, 0
        for dataset in TRACKED:
            for day in self.lake.partition_dates(dataset):
                if (start and day < start) or (end and day > end) or self.manifest(dataset, day) is None:
                    continue
                checked += 1
                roots = self.roots(dataset, day)
                if roots is None:
                    unknown += 1
                elif roots:
                    parameters = (self.manifest(dataset, day).get("lineage") or {}).get("parameters", {})
                    stale.append(Finding(dataset, day, roots, parameters))
        return Status(stale, self.stale_models(start, end), unknown, checked)

    def stale_models(self, start: date | None, end: date | None) -> list[StaleModel]:
        from jobs.torch import registry as R

        out = []
        for record in self.registry.versions():
            train_day = parse_day(record.get("train_day", "1970-01-01"))
            if (start and train_day < start) or (end and train_day > end):
                continue
            try:
                provenance = json.loads(self.registry.read_file(record["version"], R.LINEAGE))
            except Exception:  # noqa: BLE001 - a version without readable lineage is unknown
                continue
            inputs = provenance.get("inputs", []) + provenance.get("history_inputs", [])
            if not inputs or any("digest" not in i for i in inputs):
                continue  # trained before digests existed: unknown
            roots = self.input_roots(inputs)
            if roots:
                out.append(StaleModel(record["version"], record.get("train_day", "?"), record.get("role", "?"),
                                      roots, self.retrain_touches(record, train_day)))
        return out

    def retrain_touches(self, record: dict, train_day: date) -> str:
        later = [d["train_day"] for d in self.registry.decisions() if d["train_day"] >= train_day.isoformat()]
        decisions = f"the decisions of {later[0]} .. {later[-1]}" if later else "no recorded decision"
        scored = [d for d in self.lake.published_dates(Dataset.SCORES) if self.champion(d) == record["version"]]
        where = (f"the scores, alerts and reports of {format_days(scored)} (where it is champion)" if scored
                 else "no scored day (it is champion of none)")
        return f"{decisions}; {where}"


def status(lake: Lake, start: date | None = None, end: date | None = None, cal: Calendar | None = None) -> Status:
    return LineageView(lake, cal or calendar()).status(start, end)


def stale_count(lake: Lake) -> int:
    """Stale partitions in the whole lake (what run records and the UI show beside a report)."""
    return len(status(lake).stale)


# --- repair -----------------------------------------------------------------------------------------
@dataclass
class Work:
    step: str
    days: list[date]
    parameters: dict


def plan(findings: Sequence[Finding]) -> list[Work]:
    """The recomputations that refresh ``findings``: per writing step in dependency order, the stale
    days (grouped by the parameters they were written with: a scored day keeps its k)."""
    by_step: dict[tuple[str, str], Work] = {}
    for f in findings:
        writer = contracts.writer_of(f.dataset).name
        parameters = {"k": f.parameters["k"]} if "k" in f.parameters else {}
        key = (writer, json.dumps(parameters, sort_keys=True))
        work = by_step.setdefault(key, Work(writer, [], parameters))
        if f.date not in work.days:
            work.days.append(f.date)
    return sorted(by_step.values(), key=lambda w: (contracts.ORDER.index(w.step), w.days[0]))


def commands_for(work: Work, lake_uri: str) -> list[list[str]]:
    extra = [f"--{k}={v}" for k, v in sorted(work.parameters.items())]
    return [commands.step_command(work.step, [*commands.day_args(lake_uri, a, b), *extra])
            for a, b in runs_of(work.days)]


def repair(lake: Lake, start: date | None, end: date | None, cal: Calendar, rounds: int = 3,
           dry_run: bool = False) -> Status:
    for i in range(rounds):
        current = LineageView(lake, cal).status(start, end)
        if not current.stale:
            return current
        for work in plan(current.stale):
            for argv in commands_for(work, lake.uri):
                print(f"repair (round {i + 1}): {' '.join(argv)}", flush=True)
                if dry_run:
                    continue
                code = commands.run(argv).returncode
                if code == EXIT_WAITING:
                    print(f"repair: {work.step} is waiting for an input or a decision; run repair again later",
                          file=sys.stderr)
                elif code not in (EXIT_OK, EXIT_NO_CHAMPION):
                    raise RuntimeError(f"repair: {' '.join(argv)} exited {code}")
        if dry_run:
            return current
    return LineageView(lake, cal).status(start, end)


# --- migrate ----------------------------------------------------------------------------------------
def migrate(lake: Lake) -> int:
    """Add file hashes and the content digest to manifests that predate them; return how many."""
    changed = 0
    for dataset in TRACKED:
        for day in lake.partition_dates(dataset):
            manifest = lake.manifest(dataset, day)
            if manifest is None or manifest.get("digest"):
                continue
            files = lake.file_records(dataset, day, manifest)
            manifest.update(files=files, digest=content_digest(files))
            lake.write_json(posixpath.join(lake.partition_path(dataset, day), MANIFEST), manifest)
            changed += 1
    return changed


ABANDONABLE = ("clean", "features")  # steps whose days others read as history


def abandon(lake: Lake, step_name: str, day: date, reason: str) -> list[dict]:
    """Abandon the unpublished outputs of ``step_name`` for D (``Lake.abandon``); return the records.
    Refuses a day whose outputs are all published: there is nothing missing to give up."""
    missing = [d for d in contracts.step(step_name).writes if not lake.is_published(d, day)]
    if not missing:
        raise ValueError(f"every output of {step_name} for {day} is published: nothing to abandon")
    return [lake.abandon(dataset, day, reason)[0] for dataset in missing]


# --- CLI --------------------------------------------------------------------------------------------
def _print_status(result: Status, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    for f in result.stale:
        print(f.line())
    for m in result.models:
        print(m.line())
    by_dataset: dict[str, int] = defaultdict(int)
    for f in result.stale:
        by_dataset[f.dataset] += 1
    summary = ", ".join(f"{n} {ds}" for ds, n in by_dataset.items()) or "none"
    print(f"lineage: {result.checked} partitions checked; stale: {summary}; model versions stale: "
          f"{len(result.models)}; unknown (written before lineage): {result.unknown}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("status", "repair", "migrate", "abandon"))
    parser.add_argument("--lake", default=None, help="lake root URI (default: FRAUD_LAKE_URI)")
    parser.add_argument("--start", type=parse_day, help="only partitions of days >= this")
    parser.add_argument("--end", type=parse_day, help="only partitions of days <= this")
    parser.add_argument("--json", action="store_true", help="status as JSON")
    parser.add_argument("--dry-run", action="store_true", help="repair: print the commands, run nothing")
    parser.add_argument("--step", choices=ABANDONABLE, help="abandon: the step whose outputs of --date are given up")
    parser.add_argument("--date", type=parse_day, help="abandon: the day")
    parser.add_argument("--reason", help="abandon: why (recorded)")
    args = parser.parse_args(argv)
    if args.command == "abandon" and not (args.step and args.date and args.reason):
        parser.error("abandon needs --step, --date and --reason")
    try:
        from jobs.common.config import settings

        lake = Lake.from_uri(args.lake or settings().lake_uri)
        cal = calendar()
        if args.command == "migrate":
            print(f"lineage migrate: {migrate(lake)} manifests given content digests")
            return EXIT_OK
        if args.command == "abandon":
            for record in abandon(lake, args.step, args.date, args.reason):
                print(json.dumps(record, sort_keys=True))
            return EXIT_OK
        if args.command == "repair":
            result = repair(lake, args.start, args.end, cal, dry_run=args.dry_run)
        else:
            result = status(lake, args.start, args.end, cal)
        _print_status(result, args.json)
        return result.code
    except Exception as exc:  # noqa: BLE001 - exit 3 with the reason
        print(f"lineage {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
