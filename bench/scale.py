"""The cost curve on this machine: the Spark features job and scoring over histories of 1M, 3M and 10M
rows, on a directory lake and on an S3 lake (SeaweedFS on 127.0.0.1), with Spark in local mode and on
a standalone master and worker; and what dominates at each size.

Each history is 30 days of generated landing data (``python -m jobs.datagen``, customers scaled so a
day holds N/30 rows), cleaned by the clean job, then copied whole into a bucket for the S3 lake.
Every figure is one command as a user types it, timed from start to exit, with the peak resident
memory of its whole process tree (sampled every 0.2 s):

- features: ``spark-submit jobs/spark/features.py --lake L --start D1 --end D30`` (one range run);
- scoring: ``python -m jobs.torch.score --lake L --start D1 --end D30`` with the product's default
  model (``seq``: it also reads each day's 14 days of history), a small champion trained on the
  history's first two days.

The fixed cost of a command (JVM and Spark session, first job, Python workers; or interpreter,
torch and the model) is the same command on one day of the smallest history; what is left grows
with the rows.

``python -m bench scale [--small]`` (--small: 100k and 300k rows, a smoke run that writes nothing)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from bench import markdown_table, write_section
from jobs.common import commands
from jobs.common.config import REPO_ROOT, S3Settings, s3_environment
from jobs.common.datasets import Dataset
from jobs.common.lake import Lake
from jobs.common.progress import progress

sys.path.insert(0, str(REPO_ROOT / "deploy"))

FIRST = date(2018, 4, 1)
DAYS = 30
SIZES = (1_000_000, 3_000_000, 10_000_000)
SMALL_SIZES = (100_000, 300_000)
DRIVER_MEMORY = "4g"
EXECUTOR_MEMORY = "4g"
SETTINGS = {"FRAUD_FIRST_DATE": FIRST.isoformat(), "FRAUD_TRAIN_EVERY_DAYS": "10000", "FRAUD_LABEL_FEED": "off",
            "FRAUD_SPARK_DRIVER_MEMORY": DRIVER_MEMORY}


@dataclass
class Run:
    seconds: float
    peak_mib: float


def run_measured(argv: list[str], env: dict[str, str], also: int | None = None) -> Run:
    """Run a command to its end; its wall time and the peak RSS of its process tree (plus the tree of
    the process ``also``: a standalone worker, whose children are the application's executors)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0.0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        roots = [psutil.Process(pid) for pid in (proc.pid, also) if pid]
        while not done.is_set():
            total = 0
            for root in roots:
                for p in (root, *root.children(recursive=True)):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            peak = max(peak, total / 2**20)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{output[-4000:]}")
    return Run(seconds, peak)


def days_of(n: int) -> list[date]:
    return [FIRST + timedelta(days=i) for i in range(n)]


def environment(s3: S3Settings | None) -> dict[str, str]:
    return commands.environment({**SETTINGS, **(s3_environment(s3) if s3 else {})})


def spark_submit(job: str, lake: str, days: list[date], master: str) -> list[str]:
    options = ["--master", master, "--driver-memory", DRIVER_MEMORY]
    if master.startswith("spark://"):
        options += ["--executor-memory", EXECUTOR_MEMORY, "--total-executor-cores", "2"]
    return commands.step_command(job, commands.day_args(lake, days[0], days[-1]), spark_options=options)


def score(lake: str, days: list[date]) -> list[str]:
    return commands.step_command("score", commands.day_args(lake, days[0], days[-1]))


def build_history(root: Path, rows: int) -> str:
    """Landing days of ``rows`` rows in all, cleaned by the clean job; returns the lake URI."""
    per_day = rows // DAYS
    customers = max(per_day // 2, 50)  # about two transactions a card a day, as in the handbook's data
    uri = (root / "lake").as_uri()
    env = environment(None)
    run_measured([sys.executable, "-m", "jobs.datagen", "--lake", uri, "--start", FIRST.isoformat(), "--days",
                  str(DAYS), "--customers", str(customers), "--terminals", str(2 * customers), "--seed", "0"], env)
    run_measured(spark_submit("clean", uri, days_of(DAYS), "local[2]"), env)
    return uri


def copy_to_store(uri: str, server, bucket: str, datasets: tuple[str, ...]) -> str:
    import pyarrow.fs as pafs

    server.client().create_bucket(Bucket=bucket)
    s3 = store_settings(server)
    target = Lake.from_uri(f"s3://{bucket}/lake", s3)
    source = Lake.from_uri(uri)
    for dataset in datasets:
        pafs.copy_files(source.path(*dataset.split("/")), target.path(*dataset.split("/")),
                        source_filesystem=source.fs, destination_filesystem=target.fs, use_threads=True)
    return target.uri


def store_settings(server) -> S3Settings:
    info = server.info
    return S3Settings(endpoint_url=info["endpoint_url"], region="us-east-1", access_key=info["access_key"],
                      secret_key=info["secret_key"])


def register_champion(uri: str, s3: S3Settings | None) -> None:
    from bench.scoring import champion

    lake = Lake.from_uri(uri, s3)
    champion(lake, "seq", window=days_of(2))


FEATURES_INPUTS = (Dataset.CLEAN, Dataset.CLEAN_LABELS)


def row(size: int, rows: int, step: str, store: str, master: str, run: Run, fixed: Run) -> list[object]:
    growing = max(run.seconds - fixed.seconds, 0.0)
    share = fixed.seconds / run.seconds if run.seconds else 0.0
    return [f"{size / 1e6:g}M", step, store, master, f"{run.seconds:.1f}", f"{fixed.seconds:.1f} ({share:.0%})",
            f"{growing / (rows / 1e6):.1f}", f"{rows / run.seconds:,.0f}", f"{run.peak_mib:,.0f}"]


def main(flags: list[str]) -> int:
    sys.path.insert(0, str(REPO_ROOT / "plugins"))
    from fraud_ops.spark import executor_environment_file, spark_defaults_file
    from local_services import SeaweedFS, free_port
    from spark_standalone import StandaloneCluster

    small = "--small" in flags
    sizes = SMALL_SIZES if small else SIZES
    table: list[list[object]] = []
    clean_rows: list[list[object]] = []
    fixed: dict[tuple[str, str, str], Run] = {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        server = SeaweedFS(Path(tmp) / "seaweedfs", access_key="bench-key", secret_key="bench-secret-0000")
        s3 = store_settings(server)
        keyless = {k: v for k, v in commands.environment().items() if not k.startswith("AWS_")}
        cluster = StandaloneCluster(Path(tmp) / "spark", port=free_port(), webui_port=free_port(),
                                    worker_webui_port=free_port(), cores=2, memory="6g", env=keyless)
        keys = {k: v for k, v in s3_environment(s3).items() if k.startswith("AWS_") and k != "AWS_REGION"}
        try:
            server.start()
            cluster.start()
            # on a terminal: the runs done (per history: its build, then per lake features on each master
            # and score)
            with executor_environment_file(keys, spark_defaults_file()) as properties, \
                    progress("bench scale", total=len(sizes) * (1 + 2 * 3), unit="runs") as advance:
                masters = {"local[2]": ("local[2]", [], None),
                           "standalone": (cluster.url, ["--properties-file", properties], cluster.procs["worker"].pid)}
                for rows in sizes:
                    advance.doing(f"{rows:,} rows, building")
                    root = Path(tmp) / str(rows)
                    started = time.perf_counter()
                    uri = build_history(root, rows)
                    clean = Lake.from_uri(uri)
                    n = sum(int(clean.manifest(Dataset.CLEAN, d)["rows"]) for d in days_of(DAYS))
                    clean_rows.append([f"{rows / 1e6:g}M", f"{n:,}", f"{n // DAYS:,}",
                                       f"{time.perf_counter() - started:.0f}"])
                    print(f"[{rows:,}] history of {n:,} clean rows built", flush=True)
                    advance()
                    lakes = {"directory": (uri, None),
                             "S3": (copy_to_store(uri, server, f"scale-{rows}", FEATURES_INPUTS), s3)}
                    for store, (lake_uri, store_s3) in lakes.items():
                        env = environment(store_s3)
                        for name, (master, extra, worker) in masters.items():
                            def features(days: list[date], lake_uri=lake_uri, master=master, extra=extra) -> list[str]:
                                argv = spark_submit("features", lake_uri, days, master)
                                return [argv[0], *extra, *argv[1:]]

                            advance.doing(f"{rows:,} rows, features, {store}, {name}")
                            key = ("features", store, name)
                            if key not in fixed:
                                fixed[key] = run_measured(features(days_of(1)), env, worker)
                            result = run_measured(features(days_of(DAYS)), env, worker)
                            table.append(row(rows, n, "features", store, name, result, fixed[key]))
                            print(" | ".join(map(str, table[-1])), flush=True)
                            advance()
                        advance.doing(f"{rows:,} rows, score, {store}")
                        register_champion(lake_uri, store_s3)
                        key = ("score", store, "")
                        if key not in fixed:
                            fixed[key] = run_measured(score(lake_uri, days_of(1)), env)
                        result = run_measured(score(lake_uri, days_of(DAYS)), env)
                        table.append(row(rows, n, "score (seq)", store, "(no Spark)", result, fixed[key]))
                        print(" | ".join(map(str, table[-1])), flush=True)
                        advance()
                    shutil.rmtree(root, ignore_errors=True)
        finally:
            cluster.stop()
            server.stop()
    end = os.getloadavg()
    header = ["history", "step", "lake", "Spark", "seconds (command, start to exit)", "fixed: 1 day (share)",
              "growing part: s per 1M rows", "rows/s", "peak RSS MiB"]
    text = markdown_table(header, table)
    built = markdown_table(["history", "clean rows (30 days)", "rows a day", "generate + clean seconds"], clean_rows)
    note = (f"Each history: 30 days from `python -m jobs.datagen` (about two transactions a card a day), cleaned by "
            f"the clean job; the S3 lake is a copy in SeaweedFS (`weed mini`, same machine, loopback). Spark: "
            f"`--driver-memory {DRIVER_MEMORY}`; the standalone cluster is one master and one worker (2 cores, "
            f"executor memory {EXECUTOR_MEMORY}) on this machine, the executors getting the store's keys from a "
            f"private properties file as the DAG gives them. Peak RSS: the command's process tree (the JVM, its Python "
            f"workers), with the standalone worker's tree (its executor) for the cluster runs. \"fixed\" is the same command on one day of the "
            f"smallest history. Load average (1/5/15 min): start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
            f"end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}.")
    print(built)
    print(text)
    print(note)
    if not small:
        write_section("scale", f"{built}\n\n{text}\n\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
