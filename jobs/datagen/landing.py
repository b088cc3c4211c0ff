"""Write generated days to the lake's landing area, as a source system would (docs/contract.md, "The lake")."""

from __future__ import annotations

import time
from datetime import date

import numpy as np
import pyarrow as pa

from jobs.common.calendar import epoch_day, parse_day
from jobs.common.datasets import Dataset
from jobs.common.lake import Lake
from jobs.common.progress import track
from jobs.common.schema import RAW_LABEL_SCHEMA, RAW_SCHEMA
from jobs.datagen.labels import LabelDelay, by_report_day, events_of_day
from jobs.datagen.simulator import generate

FORMATS = ("parquet", "csv")
LANDING_FILE = "part-00000"
# CSV carries whole seconds ("2018-04-01 07:19:05"); the simulator never draws a fraction.
CSV_SCHEMA = pa.schema(
    [pa.field(f.name, pa.timestamp("s"), f.nullable) if f.name == "TX_DATETIME" else f for f in RAW_SCHEMA]
)


def _write_day(lake: Lake, day: date, table: pa.Table, fmt: str, dataset: str = Dataset.LANDING) -> None:
    """Withdraw _SUCCESS, write one data file, remove stale files of an earlier run, mark done."""
    lake.unmark_landing_done(day, dataset)
    if fmt == "csv" and "TX_DATETIME" in table.column_names:
        table = table.cast(CSV_SCHEMA)
    elif fmt == "csv":  # label events: whole seconds too
        table = table.set_column(2, "REPORTED_AT", table.column("REPORTED_AT").cast(pa.timestamp("s")))
    written = lake.write_landing(day, table, fmt, LANDING_FILE, dataset)
    for info in lake.landing_files(day, dataset):
        if info.path != written:
            lake.fs.delete_file(info.path)
    lake.mark_landing_done(day, dataset)


def generate_to_lake(
    lake: Lake | str,
    start: date | str,
    days: int,
    customers: int,
    terminals: int,
    seed: int,
    fmt: str = "parquet",
    label_delay: str = "fixed:7",
    labels: str | None = None,
) -> dict:
    """Generate ``days`` days from ``start`` into landing, one partition a day; return a summary.

    Each day's transactions and its label events (``landing/labels``: those reported that day,
    whichever day their transactions are from; a day without any is an empty partition) are
    written before their ``_SUCCESS`` markers. ``labels`` is ``inline`` (in the transaction rows,
    the default for ``fixed:7``) or ``feed`` (label events only, the default otherwise). The data
    depends only on the arguments; the summary's ``seconds`` is the one run fact.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    delay = LabelDelay.parse(label_delay)
    labels = labels or ("inline" if str(delay) == "fixed:7" else "feed")
    if labels not in ("inline", "feed"):
        raise ValueError(f"labels must be inline or feed, got {labels!r}")
    if labels == "inline" and str(delay) != "fixed:7":
        raise ValueError("inline labels count as reported 7 days after the transaction: use --label-delay fixed:7")
    if days < 1 or customers < 1 or terminals < 1:
        raise ValueError("days, customers and terminals must be positive")
    lake = Lake.from_uri(lake) if isinstance(lake, str) else lake
    start = parse_day(start)
    began = time.perf_counter()
    rows = 0
    by_scenario = np.zeros(4, dtype=np.int64)
    last = start
    pending: dict[int, list[pa.Table]] = {}
    events = 0
    # on a terminal, the days written of ``days`` (jobs.common.progress); nothing in a log
    for day, table in track(generate(customers, terminals, start, days, seed), "datagen", total=days):
        if labels == "feed":
            for report_day, part in by_report_day(events_of_day(table, delay, seed, day)).items():
                pending.setdefault(report_day, []).append(part)
            table = table.set_column(5, "TX_FRAUD", pa.nulls(table.num_rows, pa.int32()))
        _write_day(lake, day, table, fmt)
        arrived = pending.pop(epoch_day(day), [])
        day_events = pa.concat_tables(arrived) if arrived else RAW_LABEL_SCHEMA.empty_table()
        day_events = day_events.sort_by([("REPORTED_AT", "ascending"), ("TRANSACTION_ID", "ascending")])
        _write_day(lake, day, day_events, fmt, Dataset.LANDING_LABELS)
        events += day_events.num_rows
        rows += table.num_rows
        by_scenario += np.bincount(table["TX_FRAUD_SCENARIO"].to_numpy(), minlength=4)[:4]
        last = day
    frauds = int(by_scenario[1:].sum())
    return {
        "lake": lake.uri,
        "start": start.isoformat(),
        "end": last.isoformat(),
        "days": days,
        "rows": rows,
        "frauds": frauds,
        "fraud_share": frauds / rows if rows else 0.0,
        "frauds_by_scenario": {str(s): int(by_scenario[s]) for s in (1, 2, 3)},
        "format": fmt,
        "label_delay": str(delay),
        "labels": labels,
        "label_events": events,
        "seconds": round(time.perf_counter() - began, 3),
    }
