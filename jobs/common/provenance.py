"""What a published partition records about how it was made: its inputs, parameters and code version.

Every writer passes :func:`lineage` to ``Lake.publish``; ``python -m jobs.lineage`` reads it back to
find stale partitions (docs/contract.md, "Lineage and staleness"). An input is named by dataset,
date and the content digest it had when it was read; a landing day by the digest of its delivered
files; the model that scored a day by its version.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from datetime import date
from importlib import resources

from jobs.common.calendar import Calendar
from jobs.common.contracts import step
from jobs.common.lake import Dataset, Lake, NotPublished

CHAMPION = "models/champion"  # pseudo-dataset: the version that is champion as of a date
LANDING = (Dataset.LANDING, Dataset.LANDING_LABELS)  # written by sources: named by their delivered files


@functools.cache
def code_version() -> str:
    """A content hash of the ``jobs`` package's Python files: the same wherever the code runs (a
    checkout, an image without ``.git``, the zip spark-submit ships to executors)."""
    digest = hashlib.sha256()
    for path, data in sorted(_python_files(resources.files("jobs"), "jobs")):
        digest.update(path.encode() + b"\0" + data + b"\0")
    return "sha256:" + digest.hexdigest()[:20]


def _python_files(folder, prefix: str) -> Iterable[tuple[str, bytes]]:
    for entry in folder.iterdir():
        name = f"{prefix}/{entry.name}"
        if entry.is_dir():
            if entry.name != "__pycache__":
                yield from _python_files(entry, name)
        elif entry.name.endswith(".py"):
            yield name, entry.read_bytes()


def input_record(lake: Lake, dataset: str, day: date, manifest: dict | None = None) -> dict:
    """One input as lineage names it; ``digest`` None when the partition is not published."""
    if dataset in LANDING:
        digest = lake.landing_digest(day, dataset)
    else:
        digest = lake.digest(dataset, day, manifest)
    record = {"dataset": dataset, "date": day.isoformat(), "digest": digest}
    if digest is None and dataset not in LANDING:
        abandoned = lake.abandoned(dataset, day)
        if abandoned is not None:  # read without it; its later publication shows as staleness
            record["abandoned"] = abandoned["reason"]
    return record


class InputRecorder:
    """Reads input digests once per run (a range run records 38 inputs per day out of one lookup)."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self._seen: dict[tuple[str, date], dict] = {}

    def record(self, dataset: str, day: date) -> dict:
        key = (dataset, day)
        if key not in self._seen:
            self._seen[key] = input_record(self.lake, dataset, day)
        return self._seen[key]

    def step_inputs(
        self, name: str, day: date, cal: Calendar, window_days: int | None = None, datasets: Iterable[str] | None = None
    ) -> list[dict]:
        """The inputs step ``name`` reads for D by its contract, every day of every read.

        A day before the first date is recorded only if it happens to be published (it is read if
        it is there). A required input that is not published is an error (the step should have
        waited) unless an operator abandoned it; an abandoned or optional one is recorded with
        digest None, so its later arrival shows as staleness.
        """
        wanted = set(datasets) if datasets is not None else None
        out: dict[tuple[str, str], dict] = {}
        for read in step(name).reads:
            if wanted is not None and read.dataset not in wanted:
                continue
            for d in read.days(cal, day, window_days):
                record = self.record(read.dataset, d)
                if record["digest"] is None:
                    if d < cal.first_date:
                        continue
                    if read.required and "abandoned" not in record:
                        raise NotPublished(
                            f"{read.dataset} date={d} is not published in {self.lake.uri} ({name} of {day})"
                        )
                out[(read.dataset, record["date"])] = record
        return [out[k] for k in sorted(out)]

    def days(self, dataset: str, days: Iterable[date], required: bool = True) -> list[dict]:
        out = []
        for d in sorted(set(days)):
            record = self.record(dataset, d)
            if required and record["digest"] is None and "abandoned" not in record:
                raise NotPublished(f"{dataset} date={d} is not published in {self.lake.uri}")
            out.append(record)
        return out


def lineage(step_name: str, inputs: list[dict], parameters: dict | None = None) -> dict:
    """The ``lineage`` block of a manifest."""
    return {
        "step": step_name,
        "inputs": inputs,
        "parameters": parameters or {},
        "code_version": code_version(),
    }
