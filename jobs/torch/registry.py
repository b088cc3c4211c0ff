"""The model registry: immutable model versions, dated promotion decisions, manual events.

Layout under the lake's ``models/`` folder::

    models/versions/<version>/model.pt            checkpoint (torch.load(weights_only=True))
    models/versions/<version>/model_export.pt2    self-contained scorer, scaler folded in
    models/versions/<version>/metrics.json        training metrics
    models/versions/<version>/lineage.json        inputs with hashes, code version, parameters, seed
    models/versions/<version>/version.json        the version's record, written last (= registered)
    models/registry/decisions/date=<T>.json       the promotion decision of training day T
    models/registry/events/<seq>.json             manual promote / rollback events, numbered

Semantics (docs/contract.md, "Training, evaluation and promotion"):

* A version name holds a hash of its checkpoint bytes, so a version folder never changes: a
  rerun that produces the same bytes (CPU, same seed and data) names the same version, a rerun
  that does not (GPU) names a new one.
* Every record is created once with :meth:`Lake.put_if_absent` (link(2) on a file system, a
  conditional ``If-None-Match: *`` PUT on S3), so concurrent writers cannot interleave: exactly
  one creates a record, the others read the winner's. Nothing is ever rewritten.
* Decisions are made in date order: the decision of training day T requires the decision of
  the previous training day (else :class:`WaitingForDecision`). Decisions are facts about the
  data: once recorded for T, a rerun that would decide differently (another configuration, a
  non-deterministic GPU model) does not replace it; it is reported as a conflict and the
  recorded decision stands. To change the champion, record a manual event.
* Manual events (``promote`` / ``rollback``) take effect from a stated date.
* A training day that training cannot decide (its run failed for good, its inputs will never
  come) is resolved by an operator with ``resolve --date T --keep-champion --reason …``: a decision
  like any other (``kept_by_operator``, recorded once), so scoring, which waits for the decision of
  the latest training day, goes on. A manual promote does not stand in for a missing decision.
* ``champion_as_of(D)`` is the version named by the latest of: the decisions of training days
  <= D and the manual events effective <= D (on the same date an event wins over a decision,
  later events over earlier ones). It waits (raises :class:`WaitingForDecision`) while the
  decision of the latest scheduled training day <= D is missing, so it never resolves to a
  model that is merely newest.

This module imports no torch: the Airflow DAG imports it in sensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from datetime import date
from typing import Any

import pyarrow.fs as pafs

from jobs.common.calendar import ONE_DAY, Calendar, TrainingSchedule, calendar, day_range, parse_day
from jobs.common.lake import MODELS, Dataset, Lake, LakeError

CHECKPOINT = "model.pt"
EXPORT = "model_export.pt2"
METRICS = "metrics.json"
LINEAGE = "lineage.json"
REFERENCE = "reference.json"  # drift reference: deciles of the training scores and inputs (jobs.monitoring)
VERSION_RECORD = "version.json"

VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
PROMOTED = "promoted"
REFUSED = "refused"
KEPT = "kept_by_operator"  # an operator resolved the day: the champion before it stays
OPERATOR = "operator"


class RegistryError(RuntimeError):
    """A registry operation that cannot go on."""


class WaitingForDecision(RegistryError):
    """The decision of an earlier training day is not recorded yet; retry later."""

    def __init__(self, day: date, needed_for: str):
        self.day = day
        super().__init__(f"waiting for decision of {day.isoformat()} ({needed_for})")


def canonical_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def content_hash(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


class Registry:
    """The registry of one lake. The calendar (and so the training schedule) defaults to the one
    configured in the environment; a :class:`TrainingSchedule` may be given instead."""

    def __init__(self, lake: Lake, schedule: Calendar | TrainingSchedule | None = None):
        self.lake = lake
        if isinstance(schedule, TrainingSchedule):
            self.calendar = schedule.calendar
            self.schedule = schedule
        else:
            self.calendar = schedule or calendar()
            self.schedule = self.calendar.schedule

    # --- paths -------------------------------------------------------------------------------
    def version_path(self, version: str, name: str = "") -> str:
        """Where a version's files are. A name read from a record is checked first: it cannot lead
        out of ``models/versions`` (``../``, a slash, an empty name)."""
        if not isinstance(version, str) or not VERSION_NAME.fullmatch(version) or ".." in version:
            raise RegistryError(f"not a version name: {version!r}")
        return self.lake.path(MODELS, "versions", version, name)

    def _decision_path(self, day: date) -> str:
        return self.lake.path(MODELS, "registry", "decisions", f"date={day.isoformat()}.json")

    def _events_path(self, name: str = "") -> str:
        return self.lake.path(MODELS, "registry", "events", name)

    def _read(self, fs_path: str) -> dict | None:
        try:
            return self.lake.read_json(fs_path)
        except LakeError:
            return None

    def _create(self, fs_path: str, record: dict) -> tuple[dict, bool]:
        """Create a record once; return (the stored record, whether this call created it).

        A record already there is never this call's (a rerun reads it back); a conditional write
        whose answer was lost and came back "exists" with these very bytes is."""
        existing = self._read(fs_path)
        if existing is not None:
            return existing, False
        if self.lake.put_if_absent(fs_path, canonical_json(record)):
            return record, True
        stored = self._read(fs_path)
        if stored is None:
            raise RegistryError(f"record vanished after a lost race: {self.lake.to_uri(fs_path)}")
        return stored, False

    # --- versions ----------------------------------------------------------------------------
    def register_version(self, version: str, files: dict[str, bytes], record: dict) -> dict:
        """Write a version's files, then its record (the marker that makes it visible).

        Idempotent: registering the same version with the same content again is a no-op.
        """
        for name, data in files.items():
            path = self.version_path(version, name)
            # A file already there stays (immutable); the version name fixes the checkpoint bytes.
            created = self.lake.put_if_absent(path, data)
            if not created and name == CHECKPOINT and self.lake.read_bytes(path) != data:
                raise RegistryError(f"version {version} exists with other checkpoint bytes")
        record = {**record, "version": version}
        stored, _ = self._create(self.version_path(version, VERSION_RECORD), record)
        return {**stored, "path": self.lake.to_uri(self.version_path(version))}

    def version(self, version: str) -> dict | None:
        record = self._read(self.version_path(version, VERSION_RECORD))
        if record is None:
            return None
        return {**record, "path": self.lake.to_uri(self.version_path(version))}

    def read_file(self, version: str, name: str) -> bytes:
        return self.lake.read_bytes(self.version_path(version, name))

    def has_reference(self, version: str) -> bool:
        return self.lake.exists(self.version_path(version, REFERENCE))

    def reference(self, version: str) -> dict | None:
        """The version's drift reference (None for a version trained before references were kept:
        ``python -m jobs.torch.registry reference`` stores it)."""
        return json.loads(self.read_file(version, REFERENCE)) if self.has_reference(version) else None

    def store_reference(self, version: str) -> bool:
        """Compute a version's drift reference from its training window, as training does, and store
        it (False when it is already there: a reference, like every version file, is written once)."""
        from jobs.torch.checkpoint import load_version
        from jobs.torch.data import read_for_model
        from jobs.torch.train import drift_reference_of

        record = self.version(version)
        if record is None:
            raise RegistryError(f"unknown version {version}")
        if self.has_reference(version):
            return False
        loaded = load_version(self.read_checkpoint(version), version)
        window = json.loads(self.read_file(version, LINEAGE)).get("window") or [
            d.isoformat() for d in day_range(date.fromisoformat(record["window_start"]),
                                             date.fromisoformat(record["window_end"]))]
        days = self.lake.readable(Dataset.FEATURES, [date.fromisoformat(d) for d in window])
        frame, history = read_for_model(self.lake, days, loaded.config, self.calendar)
        return self.lake.put_if_absent(self.version_path(version, REFERENCE), drift_reference_of(loaded, frame, history))

    def read_checkpoint(self, version: str) -> bytes:
        """A version's checkpoint, checked against the content hash it was registered with (its
        record's ``checkpoint_sha256``, else the hash prefix its name ends with)."""
        data = self.read_file(version, CHECKPOINT)
        digest = hashlib.sha256(data).hexdigest()
        record = self.version(version) or {}
        expected = record.get("checkpoint_sha256")
        suffix = version.rsplit("-", 1)[-1]
        if expected and digest != expected or not expected and not digest.startswith(suffix):
            raise RegistryError(f"the checkpoint of {version} is not the one registered (sha256 {digest[:16]}...): "
                                "refusing to score with it")
        return data

    def find_version(self, training_key: str) -> dict | None:
        """A registered version trained with exactly this configuration on exactly these inputs."""
        for record in self._version_records():
            if record.get("training_key") == training_key:
                return record
        return None

    def _version_records(self) -> list[dict]:
        out = []
        for info in self.lake.list_dir(self.lake.path(MODELS, "versions")):
            if info.type == pafs.FileType.Directory and VERSION_NAME.fullmatch(info.base_name):
                record = self.version(info.base_name)
                if record is not None:
                    out.append(record)
        return out

    def versions(self) -> list[dict]:
        """Every registered version with its status, metrics and the dates it became champion."""
        timeline = self._timeline()
        current = timeline[-1]["version"] if timeline else None
        since: dict[str, list[str]] = {}
        previous = None
        for entry in timeline:
            if entry["version"] != previous:
                since.setdefault(entry["version"], []).append(entry["effective"])
            previous = entry["version"]
        refused = {d["candidate"]["version"] for d in self.decisions() if d["outcome"] == REFUSED and d.get("candidate")}
        out = []
        for record in self._version_records():
            v = record["version"]
            if v == current:
                status = "champion"
            elif v in since:
                status = "retired"
            elif v in refused:
                status = "refused"
            else:
                status = record.get("role", "candidate")
            metrics = self._read(self.version_path(v, METRICS)) or {}
            out.append({**record, "status": status, "champion_from": since.get(v, []), "metrics": metrics})
        return sorted(out, key=lambda r: (r.get("train_day", ""), r["version"]))

    # --- decisions ---------------------------------------------------------------------------
    def decision(self, train_day: date | str) -> dict | None:
        return self._read(self._decision_path(parse_day(train_day)))

    def decisions(self) -> list[dict]:
        out = []
        for info in self.lake.list_dir(self.lake.path(MODELS, "registry", "decisions")):
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                record = self._read(info.path)
                if record is not None:
                    out.append(record)
        return sorted(out, key=lambda d: d["train_day"])

    def require_previous_decision(self, train_day: date) -> None:
        """Raise :class:`WaitingForDecision` unless the previous training day is decided."""
        previous = self.schedule.previous_training_day(train_day)
        if previous is not None and self.decision(previous) is None:
            raise WaitingForDecision(previous, f"decisions are made in date order; {train_day} is next")

    def record_decision(self, record: dict) -> tuple[dict, str]:
        """Record the decision of ``record['train_day']`` once.

        Returns (the stored decision, outcome) where outcome is ``created``, ``same`` (an equal
        decision was already recorded: a rerun) or ``conflict`` (another decision was recorded
        first; it stands).
        """
        day = parse_day(record["train_day"])
        if not self.schedule.is_training_day(day):
            raise RegistryError(f"{day} is not a scheduled training day; use a manual promote event")
        self.require_previous_decision(day)
        if record["champion"] is None and record["outcome"] not in (REFUSED, KEPT):
            raise RegistryError(f"a {record['outcome']} decision must name its champion")
        if record["champion"] is not None and self.version(record["champion"]) is None:
            raise RegistryError(f"decision names unregistered version {record['champion']}")
        stored, created = self._create(self._decision_path(day), record)
        if created:
            return stored, "created"
        return stored, "same" if content_hash(stored) == content_hash(record) else "conflict"

    def keep_champion(self, train_day: date | str, reason: str) -> tuple[dict, str]:
        """An operator's decision for a training day that training cannot decide (its run failed, its
        inputs will never come): the champion before it stays. Recorded like any decision, once;
        scoring then goes on. Returns ``record_decision``'s (stored, outcome)."""
        if not reason.strip():
            raise ValueError("resolving a training day needs a reason")
        day = parse_day(train_day)
        champion = self.champion_before(day)
        record = {"train_day": day.isoformat(), "outcome": KEPT,
                  "champion": champion["version"] if champion else None, "candidate": None,
                  "reason": f"resolved by an operator: {reason}", "resolved_by": OPERATOR}
        return self.record_decision(record)

    # --- manual events -----------------------------------------------------------------------
    def events(self) -> list[dict]:
        out = []
        for info in self.lake.list_dir(self._events_path()):
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                record = self._read(info.path)
                if record is not None:
                    out.append(record)
        return sorted(out, key=lambda e: e["seq"])

    def add_event(self, kind: str, version: str, effective: date | str, reason: str) -> dict:
        """Append a manual ``promote`` or ``rollback`` of ``version`` effective from a date."""
        if kind not in ("promote", "rollback"):
            raise ValueError(f"event kind must be promote or rollback, got {kind!r}")
        if self.version(version) is None:
            raise RegistryError(f"unknown version {version}")
        if not reason.strip():
            raise ValueError("a manual event needs a reason")
        seq = len(self.events())
        while True:  # the sequence number is claimed with put_if_absent: racing writers get the next
            record = {
                "seq": seq,
                "kind": kind,
                "version": version,
                "effective": parse_day(effective).isoformat(),
                "reason": reason,
            }
            stored, created = self._create(self._events_path(f"{seq:08d}.json"), record)
            if created:
                return stored
            seq += 1

    # --- resolution --------------------------------------------------------------------------
    def _timeline(self, up_to: date | None = None) -> list[dict]:
        """Champion changes in effect order: (effective date, decisions before events, seq)."""
        entries = []
        for d in self.decisions():
            entries.append({"effective": d["train_day"], "order": (0, 0), "version": d["champion"],
                            "source": f"decision {d['train_day']} ({d['outcome']})"})
        for e in self.events():
            entries.append({"effective": e["effective"], "order": (1, e["seq"]), "version": e["version"],
                            "source": f"{e['kind']} event {e['seq']}: {e['reason']}"})
        if up_to is not None:
            entries = [e for e in entries if e["effective"] <= up_to.isoformat()]
        return sorted(entries, key=lambda e: (e["effective"], e["order"]))

    def pending_decision(self, day: date | str) -> date | None:
        """The training day whose decision scoring ``day`` waits for, or None if nothing is missing."""
        latest = self.schedule.latest_training_day(parse_day(day))
        if latest is not None and self.decision(latest) is None:
            return latest
        return None

    def champion_as_of(self, day: date | str) -> dict | None:
        """The version that is champion on ``day`` (None before any), with its ``path``.

        Raises :class:`WaitingForDecision` while the latest training day <= day is undecided.
        """
        day = parse_day(day)
        pending = self.pending_decision(day)
        if pending is not None:
            raise WaitingForDecision(pending, f"the champion as of {day} depends on it")
        timeline = self._timeline(up_to=day)
        if not timeline:
            return None
        last = timeline[-1]
        if last["version"] is None:  # refused before any model was promoted
            return None
        record = self.version(last["version"])
        if record is None:
            raise RegistryError(f"champion {last['version']} is not registered")
        return {**record, "champion_since": last["effective"], "source": last["source"]}

    def champion_before(self, train_day: date) -> dict | None:
        """The champion a training day's candidate is compared with (as of the day before)."""
        return self.champion_as_of(train_day - ONE_DAY)


# --- CLI -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.torch.registry", description=__doc__.split("\n")[0])
    parser.add_argument("--lake", help="lake URI (default: FRAUD_LAKE_URI)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every version with status and champion dates")
    show = sub.add_parser("show", help="one version's record, metrics and lineage")
    show.add_argument("version")
    asof = sub.add_parser("champion", help="the champion as of a date")
    asof.add_argument("--date", required=True)
    sub.add_parser("decisions", help="every recorded decision")
    ref = sub.add_parser("reference", help="store the drift reference of versions trained before references were "
                                           "kept (read from their training window; the report's drift section)")
    ref.add_argument("versions", nargs="*", help="versions (default: every version without one)")
    resolve = sub.add_parser("resolve", help="decide a training day by hand: keep the champion before it")
    resolve.add_argument("--date", required=True, help="the training day")
    resolve.add_argument("--keep-champion", action="store_true", required=True,
                         help="the champion before the day stays (the only resolution there is)")
    resolve.add_argument("--reason", required=True)
    for kind in ("promote", "rollback"):
        p = sub.add_parser(kind, help=f"record a manual {kind} effective from a date")
        if kind == "promote":
            p.add_argument("version")
        else:
            p.add_argument("--to", dest="version", required=True)
        p.add_argument("--from", dest="effective", required=True, help="first date it applies to")
        p.add_argument("--reason", required=True)
    args = parser.parse_args(argv)

    lake = Lake.from_uri(args.lake) if args.lake else Lake.from_settings()
    registry = Registry(lake)
    try:
        if args.command == "list":
            rows = registry.versions()
            if not rows:
                print("no versions registered")
            for r in rows:
                ap = r["metrics"].get("validation", {}).get("average_precision")
                print(f"{r['version']:40s} {r['status']:10s} trained_for={r.get('train_day', '?')} "
                      f"champion_from={','.join(r['champion_from']) or '-'} val_ap={ap}")
        elif args.command == "show":
            record = registry.version(args.version)
            if record is None:
                print(f"unknown version {args.version}", file=sys.stderr)
                return 2
            record["metrics"] = json.loads(registry.read_file(args.version, METRICS))
            record["lineage"] = json.loads(registry.read_file(args.version, LINEAGE))
            print(json.dumps(record, indent=2, sort_keys=True))
        elif args.command == "champion":
            print(json.dumps(registry.champion_as_of(args.date), indent=2, sort_keys=True))
        elif args.command == "decisions":
            print(json.dumps(registry.decisions(), indent=2, sort_keys=True))
        elif args.command == "reference":
            names = args.versions or [r["version"] for r in registry.versions() if not registry.has_reference(r["version"])]
            for name in names:
                created = registry.store_reference(name)
                print(f"{name}: drift reference {'stored' if created else 'already there'}")
        elif args.command == "resolve":
            stored, outcome = registry.keep_champion(args.date, args.reason)
            print(json.dumps(stored, indent=2, sort_keys=True))
            if outcome == "conflict":
                print(f"the decision of {args.date} was already recorded ({stored['outcome']} -> champion "
                      f"{stored['champion']}); it stands", file=sys.stderr)
                return 1
        else:
            event = registry.add_event(args.command, args.version, args.effective, args.reason)
            print(json.dumps(event, indent=2, sort_keys=True))
    except WaitingForDecision as exc:
        print(str(exc), file=sys.stderr)
        return 3
    except RegistryError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

