"""The blocking data-quality gate on a day's clean partition (docs/contract.md, "The nightly run", step 3).

It reads only manifests, never data: the published row counts of the clean and quarantine
partitions (and the job's ``rows_in``, checked against them): quarantine share, an empty day,
and volume against the median of the trailing week. A failed check raises, so nothing downstream
of the gate runs for that day. The trailing week must be published before the gate runs (the DAG
waits for it), so the verdict depends only on the data, not on which runs are in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.common.lake import Lake

import statistics
import uuid
from datetime import date

from fraud_ops.config import GateThresholds


class DataQualityError(RuntimeError):
    """The day's data failed the gate; the message lists every failed check."""


def evaluate(stats: dict, trailing_clean_rows: list[int], limits: GateThresholds) -> dict:
    """Pure verdict from the day's clean stats and the trailing week's clean row counts."""
    rows_in = int(stats.get("rows_in", 0))
    clean = int(stats.get("clean", 0))
    quarantined = int(stats.get("quarantined_total", rows_in - clean))
    share = quarantined / rows_in if rows_in else 0.0
    median = (statistics.median(trailing_clean_rows)
              if len(trailing_clean_rows) >= limits.min_trailing_days else None)
    ratio = clean / median if median else None
    failures = []
    if clean == 0:
        failures.append(f"no clean rows (rows_in={rows_in})")
    if share > limits.max_quarantine_share:
        failures.append(f"quarantine share {share:.2%} > {limits.max_quarantine_share:.2%}")
    if ratio is not None and ratio < limits.min_volume_ratio:
        failures.append(f"volume collapsed: {clean} clean rows = {ratio:.2f} x trailing median {median:.0f}")
    if ratio is not None and ratio > limits.max_volume_ratio:
        failures.append(f"volume spike: {clean} clean rows = {ratio:.2f} x trailing median {median:.0f}")
    return {
        "passed": not failures,
        "failures": failures,
        "rows_in": rows_in,
        "clean": clean,
        "quarantined_total": quarantined,
        "quarantine_share": share,
        "trailing_days": len(trailing_clean_rows),
        "trailing_median_clean": median,
        "volume_ratio": ratio,
        "thresholds": {
            "max_quarantine_share": limits.max_quarantine_share,
            "min_volume_ratio": limits.min_volume_ratio,
            "max_volume_ratio": limits.max_volume_ratio,
            "min_trailing_days": limits.min_trailing_days,
        },
    }


def check_day(lake: Lake, day: str | date, limits: GateThresholds) -> dict:
    """Run the gate for day D of a lake; record the verdict as a run record; raise if it failed."""
    from jobs.common.calendar import calendar, parse_day
    from jobs.common.lake import Dataset, NotPublished

    day = parse_day(day)
    manifest = lake.manifest(Dataset.CLEAN, day)
    if manifest is None:
        raise NotPublished(f"clean date={day} is not published in {lake.uri}")
    trailing = []
    for previous_day in calendar().gate_trailing(day):
        previous = lake.manifest(Dataset.CLEAN, previous_day)
        if previous is not None:
            trailing.append(int(previous["rows"]))  # what is published, not what a job said it wrote
    quarantine = lake.manifest(Dataset.QUARANTINE, day)
    reported = manifest.get("stats", {})
    stats = {**reported, "clean": int(manifest["rows"]),
             "quarantined_total": int(quarantine["rows"]) if quarantine else int(reported.get("quarantined_total", 0))}
    verdict = {"date": day.isoformat(), **evaluate(stats, trailing, limits)}
    for name, published in (("clean", stats["clean"]), ("quarantined_total", stats["quarantined_total"])):
        if name in reported and int(reported[name]) != published:
            verdict["passed"] = False
            verdict["failures"].append(f"{name}: the manifest holds {published} rows, the job reported "
                                       f"{reported[name]}")
    lake.write_run_record("quality_gate", day, uuid.uuid4().hex[:16], verdict)
    if not verdict["passed"]:
        raise DataQualityError(f"data-quality gate failed for {day}: " + "; ".join(verdict["failures"]))
    return verdict
