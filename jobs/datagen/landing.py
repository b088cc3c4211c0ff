"""Write generated days to the lake's landing area, as a source system would (docs/contract.md, "The lake")."""

from __future__ import annotations

import time
from datetime import date

import numpy as np
import pyarrow as pa

from jobs.common.lake import Lake, parse_day
from jobs.common.schema import RAW_SCHEMA
from jobs.datagen.simulator import generate

FORMATS = ("parquet", "csv")
LANDING_FILE = "part-00000"
# CSV carries whole seconds ("2018-04-01 07:19:05"); the simulator never draws a fraction.
CSV_SCHEMA = pa.schema(
    [pa.field(f.name, pa.timestamp("s"), f.nullable) if f.name == "TX_DATETIME" else f for f in RAW_SCHEMA]
)


def _write_day(lake: Lake, day: date, table: pa.Table, fmt: str) -> None:
    """Withdraw _SUCCESS, write one data file, remove stale files of an earlier run, mark done."""
    lake.unmark_landing_done(day)
    written = lake.write_landing(day, table.cast(CSV_SCHEMA) if fmt == "csv" else table, fmt, LANDING_FILE)
    for info in lake.landing_files(day):
        if info.path != written:
            lake.fs.delete_file(info.path)
    lake.mark_landing_done(day)


def generate_to_lake(
    lake: Lake | str,
    start: date | str,
    days: int,
    customers: int,
    terminals: int,
    seed: int,
    fmt: str = "parquet",
) -> dict:
    """Generate ``days`` days from ``start`` into landing, one partition a day; return a summary.

    Each day's file is written before its ``_SUCCESS`` marker. The data depends only on the
    arguments; the summary's ``seconds`` is the one run fact.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if days < 1 or customers < 1 or terminals < 1:
        raise ValueError("days, customers and terminals must be positive")
    lake = Lake.from_uri(lake) if isinstance(lake, str) else lake
    start = parse_day(start)
    began = time.perf_counter()
    rows = 0
    by_scenario = np.zeros(4, dtype=np.int64)
    last = start
    for day, table in generate(customers, terminals, start, days, seed):
        _write_day(lake, day, table, fmt)
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
        "seconds": round(time.perf_counter() - began, 3),
    }
