"""Memory at scale, tried as a new user would: every step's documented command over a 10M-row history,
with the install's defaults (no --driver-memory, no FRAUD_SPARK_* sizes), and the peak resident
memory of its whole process tree (the JVM and its Python workers; sampled every 0.2 s).

The history: 38 days from 2018-04-01 (``python -m jobs.datagen``, 131,500 customers: about 263,000
transactions a day, 10M in all). Each Spark job runs twice: over the first 7 days, then over all 38
(the documented ``--start 2018-04-01 --end 2018-05-08``), so the table shows whether a range run's
memory grows with its days. Training runs the training day 2018-04-29 (its 21-day window, 5.5M rows)
with one epoch instead of 20: the data it holds is the same, only the time differs. Scoring and the
report run 2018-05-05, the last day whose champion is decided (the default ``seq`` model reads its 14 days
of history).

``python -m bench memory [--small]`` (--small: 1M rows, a smoke run that writes nothing)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

from bench import markdown_table, write_section
from bench.scale import Run, run_measured
from jobs.common import commands
from jobs.common.progress import progress

FIRST, DAYS = date(2018, 4, 1), 38
LAST = FIRST + timedelta(days=DAYS - 1)
TRAINING_DAY = date(2018, 4, 29)
SCORED = date(2018, 5, 5)  # the last day whose champion is decided (the next training day is 05-06)
SHORT = FIRST + timedelta(days=6)
SETTINGS = {"FRAUD_FIRST_DATE": FIRST.isoformat(), "FRAUD_LABEL_FEED": "off"}
LIMIT_GIB = 12


def main(flags: list[str]) -> int:
    small = "--small" in flags
    rows = 1_000_000 if small else 10_000_000
    customers = rows // DAYS // 2
    env = commands.environment(SETTINGS)
    for name in ("FRAUD_SPARK_DRIVER_MEMORY", "FRAUD_SPARK_SHUFFLE_PARTITIONS", "FRAUD_RANGE_BATCH_DAYS"):
        env.pop(name, None)  # the defaults, as a new user has them
    table: list[list[object]] = []
    load = os.getloadavg()
    # on a terminal: the commands done (the generator, each Spark job twice, train, score, report)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, \
            progress("bench memory", total=8, unit="commands") as advance:
        lake = (Path(tmp) / "lake").as_uri()
        started = time.perf_counter()
        advance.doing("jobs.datagen")
        run_measured([sys.executable, "-m", "jobs.datagen", "--lake", lake, "--start", FIRST.isoformat(), "--days",
                      str(DAYS), "--customers", str(customers), "--terminals", str(2 * customers), "--seed", "0"], env)
        from jobs.common.datasets import Dataset
        from jobs.common.lake import Lake

        landed = sum(pq_rows(Lake.from_uri(lake), d) for d in (FIRST + timedelta(days=i) for i in range(DAYS)))
        print(f"[memory] {landed:,} landing rows in {time.perf_counter() - started:.0f} s", flush=True)
        advance()

        def measure(label: str, step: str, arguments: list[str], days: int) -> Run:
            advance.doing(f"{step}, {days} days")
            result = run_measured(commands.step_command(step, arguments), env)
            table.append([label, days, f"{result.seconds:.0f}", f"{result.peak_mib / 1024:.2f}",
                          "yes" if result.peak_mib / 1024 <= LIMIT_GIB else "**no**"])
            print(" | ".join(map(str, table[-1])), flush=True)
            advance()
            return result

        for job in ("clean", "features"):
            measure(f"`spark-submit jobs/spark/{job}.py --start {FIRST} --end {SHORT}`", job,
                    commands.day_args(lake, FIRST, SHORT), 7)
            measure(f"`spark-submit jobs/spark/{job}.py --start {FIRST} --end {LAST}`", job,
                    commands.day_args(lake, FIRST, LAST), DAYS)
        clean_rows = sum(int(Lake.from_uri(lake).manifest(Dataset.CLEAN, FIRST + timedelta(days=i))["rows"])
                         for i in range(DAYS))
        measure(f"`python -m jobs.torch.train --date {TRAINING_DAY} --epochs 1`", "train",
                [*commands.day_args(lake, TRAINING_DAY), "--epochs", "1"], 21)
        measure(f"`python -m jobs.torch.score --date {SCORED}`", "score", commands.day_args(lake, SCORED), 1)
        measure(f"`python -m jobs.report --date {SCORED}`", "report", commands.day_args(lake, SCORED), 1)
    end = os.getloadavg()
    header = ["command (defaults: no --driver-memory, no FRAUD_SPARK_* sizes)", "days", "seconds",
              "peak RSS GiB (process tree)", f"<= {LIMIT_GIB} GiB"]
    note = (f"{clean_rows:,} clean rows over {DAYS} days ({clean_rows // DAYS:,} a day) from `python -m jobs.datagen "
            f"--customers {customers}`; spark-submit starts with the install's 4 GiB driver "
            f"(`deploy/spark-conf/spark-defaults.conf`); range runs work through `FRAUD_RANGE_BATCH_DAYS` (7) days at "
            f"a time. Load average (1/5/15 min): start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, end "
            f"{end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}.")
    body = markdown_table(header, table) + "\n\n" + note
    print(body)
    if not small:
        write_section("memory", body)
    return 0


def pq_rows(lake, day: date) -> int:
    import pyarrow.parquet as pq

    from jobs.common.datasets import Dataset

    return sum(pq.ParquetFile(lake.fs.open_input_file(info.path)).metadata.num_rows
               for info in lake.landing_files(day, Dataset.LANDING))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
