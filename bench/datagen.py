"""Generator benchmark: the reference scale and a 50,000-customer month, each in its own process.

Each run writes parquet landing partitions to a temporary lake. A child process does the work so
that its peak RSS (``ru_maxrss``) is the generator's alone; ``seconds`` is generation plus
writing as the generator reports it, ``wall`` adds the interpreter start and imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import markdown_table, write_section
from jobs.common.progress import track

REPO = Path(__file__).resolve().parents[1]

RUNS = [
    {
        "name": "reference",
        "start": "2018-04-01",
        "days": 183,
        "customers": 5000,
        "terminals": 10000,
        "seed": 0,
    },
    {
        "name": "50k customers",
        "start": "2018-04-01",
        "days": 30,
        "customers": 50000,
        "terminals": 10000,
        "seed": 0,
    },
]

_CHILD = """
import json, resource, sys
from jobs.datagen import generate_to_lake
args = json.loads(sys.argv[1])
summary = generate_to_lake(args["lake"], args["start"], args["days"], args["customers"], args["terminals"],
                           args["seed"])
summary["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(summary))
"""


def run_child(run: dict, lake_uri: str) -> dict:
    """Generate one configuration in a fresh interpreter; return its summary with peak RSS and wall."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    )
    args = json.dumps({**run, "lake": lake_uri})
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, args], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["wall"] = time.perf_counter() - began
    return summary


def main(flags: list[str]) -> int:
    rows = []
    load = os.getloadavg()[0]
    for run in track(RUNS, "bench datagen", unit="runs"):  # on a terminal only
        with tempfile.TemporaryDirectory(prefix="bench-datagen-") as tmp:
            s = run_child(run, Path(tmp).as_uri())
        scenarios = s["frauds_by_scenario"]
        rows.append(
            [
                run["name"],
                f"{run['customers']:,} / {run['terminals']:,} / {run['days']}",
                f"{s['rows']:,}",
                f"{s['frauds']:,} ({s['fraud_share']:.3%})",
                f"{scenarios['1']:,} / {scenarios['2']:,} / {scenarios['3']:,}",
                f"{s['seconds']:.1f}",
                f"{s['wall']:.1f}",
                f"{s['rows'] / s['seconds'] / 1e6:.2f}",
                f"{s['peak_rss_mib']:.0f}",
            ]
        )
    header = [
        "run",
        "customers / terminals / days",
        "rows",
        "frauds (share)",
        "scenario 1 / 2 / 3",
        "seconds (generate + write parquet)",
        "wall s (with start-up)",
        "M rows/s",
        "peak RSS MiB",
    ]
    table = markdown_table(header, rows)
    body = (
        "`python -m bench datagen`: `generate_to_lake` into a temporary `file://` lake, seed 0, one child process "
        "per run.\n"
        "Reference set *(ref)*: 1,754,155 rows, 14,681 frauds (0.837%), scenario 1 / 2 / 3 = 973 / 9,077 / 4,631.\n"
        f"Load average when the benchmark started: {load:.2f} (the machine is shared).\n\n{table}"
    )
    print(table)
    write_section("datagen", body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
