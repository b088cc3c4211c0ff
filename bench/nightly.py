"""What users wait for: one nightly DAG run, and `airflow backfill create` over a month, at the
generator's reference scale (5,000 customers, 10,000 terminals: about 9,700 transactions a day), on
the embedded default (SQLite, LocalExecutor, a real scheduler), with each Spark step a spark-submit
of its own ("submit") and with the Spark steps on a warm Spark Connect server ("connect", what
`make up` starts).

A lake is generated from 2018-04-01 and its history published up to 2018-04-28 with the range
commands (as `make run` does); each mode then works on its own copy:

- nightly: a run for 2018-04-29 (a training day: the first champion) then one for 2018-04-30
  (a plain day), triggered through the REST API; the time of a run is from its first task's start
  to the end of ``report``, with each task's share;
- backfill: ``airflow backfill create --from-date 2018-04-29 --to-date 2018-05-28`` (30 days, the
  5 training days 04-29, 05-06, 05-13, 05-20 and 05-27 among them), as typed (up to 10 runs in flight), timed from
  the first task's start to the last task's end.

The two modes' outputs (clean, quarantine, features, scores, alerts) are compared day by day.

``python -m bench nightly [--small] [--no-nightly] [--no-backfill] [--modes=submit,connect]``
(--small: 500 customers and a 6-day backfill; a smoke run that writes nothing)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from collections import defaultdict
from datetime import date, datetime, timedelta
from pathlib import Path

from bench import markdown_table, write_section
from jobs.common.config import REPO_ROOT
from jobs.common.progress import Step, progress

sys.path.insert(0, str(REPO_ROOT / "deploy"))

FIRST = date(2018, 4, 1)
TRAINING_DAY, PLAIN_DAY = date(2018, 4, 29), date(2018, 4, 30)
BACKFILL_DAYS = 30
MODES = ("submit", "connect")
COMPARED = ("clean/transactions", "quarantine/transactions", "features/transactions", "scores/transactions",
            "alerts/cards")
SETTINGS = {"FRAUD_FIRST_DATE": FIRST.isoformat()}
# the order tasks run in, for the table
TASK_ORDER = ("plan", "wait_for_landing", "wait_for_label_history", "clean", "wait_for_clean_history",
              "wait_for_clean_labels", "quality_gate", "features", "train_today", "no_training",
              "wait_for_training_inputs", "wait_for_previous_decision", "train", "wait_for_decision",
              "wait_for_feature_history", "score", "report")


def days(start: date, count: int) -> list[date]:
    return [start + timedelta(days=i) for i in range(count)]


def build_lake(root: Path, customers: int, terminals: int, last: date) -> Path:
    """Landing data from FIRST to ``last``; clean and features published up to the day before the
    first training day, as `make run` bootstraps its lake."""
    from jobs.demo import Demo

    lake = root / "lake"
    saved = dict(os.environ)
    os.environ["FRAUD_LAKE_URI"] = lake.as_uri()
    try:
        demo = Demo(Namespace(date=last, first_date=FIRST, customers=customers, terminals=terminals))
        demo.generate()
        demo.day = TRAINING_DAY  # publish what the run of the first training day reads
        demo.bootstrap()
    finally:  # the demo's own settings (its poke interval, retries, Spark sizes) are not the stacks'
        os.environ.clear()
        os.environ.update(saved)
    return lake


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


class Stack:
    """Airflow (API server, DAG processor, scheduler; SQLite, LocalExecutor) on a copy of the lake,
    with or without a Spark Connect server for the Spark steps."""

    def __init__(self, root: Path, lake: Path, mode: str):
        from local_airflow import LocalAirflow
        from local_services import free_port
        from spark_connect import SparkConnectServer

        root.mkdir(parents=True, exist_ok=True)
        self.lake = root / f"lake-{mode}"
        shutil.copytree(lake, self.lake)
        env = {**os.environ, **SETTINGS, "FRAUD_LAKE_URI": self.lake.as_uri()}
        self.connect = None
        if mode == "connect":
            self.connect = SparkConnectServer(root / f"connect-{mode}", port=free_port(), env=env)
        from local_airflow import LOCAL_SLOTS

        self.af = LocalAirflow(root / f"airflow-{mode}", self.lake.as_uri(), extra_env=SETTINGS, parallelism=LOCAL_SLOTS,
                               spark_connect=None if self.connect is None else f"127.0.0.1:{self.connect.port}")

    def __enter__(self) -> Stack:
        if self.connect:
            self.connect.start()
        self.af.init()
        self.af.start("api-server", "dag-processor", "scheduler", "triggerer")
        self.af.wait_ready()
        self.af.wait_for_dag("fraud_nightly")
        self.stop_scheduled_runs(wait=20)
        return self

    def stop_scheduled_runs(self, wait: float = 0) -> None:
        """The scheduler starts the latest real night as soon as the DAG is on; its landing never
        comes in this lake: marked failed, so it takes no slot from what is measured."""
        from urllib.parse import quote

        deadline = time.monotonic() + wait
        while True:
            scheduled = [r for r in self.af.dag_runs("fraud_nightly") if r["run_type"] == "scheduled"
                         and r["state"] not in ("success", "failed")]
            for run in scheduled:
                self.af.api("PATCH", f"/dags/fraud_nightly/dagRuns/{quote(run['dag_run_id'], safe='')}",
                            {"state": "failed"})
            if scheduled or time.monotonic() > deadline:
                return
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.af.stop()
        if self.connect:
            self.connect.stop()

    def trigger(self, day: date) -> str:
        self.stop_scheduled_runs()
        status, body = self.af.api("POST", "/dags/fraud_nightly/dagRuns", {
            "dag_run_id": f"bench__{day.isoformat()}", "logical_date": f"{day.isoformat()}T00:00:00Z",
            "conf": {"date": day.isoformat()}})
        if status != 200:
            raise RuntimeError(f"trigger of {day} answered {status}: {body}")
        return body["dag_run_id"]

    def wait(self, run_id: str, timeout: float = 1800) -> dict:
        from urllib.parse import quote

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, run = self.af.api("GET", f"/dags/fraud_nightly/dagRuns/{quote(run_id, safe='')}")
            if status == 200 and run["state"] in ("success", "failed"):
                return run
            time.sleep(1)
        raise TimeoutError(f"run {run_id} not finished in {timeout}s")

    def tasks(self, run_id: str) -> dict[str, dict]:
        return {t["task_id"]: t for t in self.af.task_instances("fraud_nightly", run_id)}


CPU_CLASSES = (  # (class, words of the command line that mark it), first match wins
    ("Spark Connect server (JVM)", ("SparkConnectServer",)),
    ("Spark Python workers", ("pyspark.daemon", "pyspark.worker")),
    ("step clean (Spark client)", ("jobs/spark/clean.py",)),
    ("step features (Spark client)", ("jobs/spark/features.py",)),
    ("step train", ("jobs.torch.train",)),
    ("step score", ("jobs.torch.score",)),
    ("step report", ("jobs.report",)),
    ("Airflow scheduler (and its executor workers)", ("airflow scheduler", "LocalExecutor <idle>")),
    ("Airflow API server", ("api-server", "api_server", "uvicorn")),
    ("Airflow triggerer", ("triggerer",)),
    ("Airflow DAG processor", ("dag-processor", "dag_processor")),
    ("Airflow task processes (supervisor, task runner, sensors, gates)", ("airflow",)),
)


class CpuSampler:
    """CPU seconds by kind of process while a backfill runs: every process's user + system time is
    read every ``every`` seconds and its last reading kept, so a process that lives shorter than one
    interval can be missed (the totals are a lower bound; the "unseen" line compares them with the
    machine's own count)."""

    def __init__(self, every: float = 0.5):
        import threading

        self.every, self.seen, self.stop_event = every, {}, threading.Event()
        self.before: dict[tuple, float] = {}  # processes already running: their CPU before the start
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _classify(self, cmdline: list[str]) -> str | None:
        text = " ".join(cmdline)
        return next((name for name, words in CPU_CLASSES if any(w in text for w in words)), None)

    def _sample(self) -> dict[tuple, tuple[str, float]]:
        import psutil

        out = {}
        for proc in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
            info = proc.info
            times = info.get("cpu_times")
            kind = self._classify(info.get("cmdline") or [])
            if times is not None and kind is not None:
                out[info["pid"], info["create_time"]] = (kind, times.user + times.system)
        return out

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.seen.update(self._sample())

    def __enter__(self) -> CpuSampler:
        import psutil

        self.before = {key: seconds for key, (_, seconds) in self._sample().items()}
        self.machine_start = sum(psutil.cpu_times()[:3])  # user, nice, system of all cores
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self.stop_event.set()
        self.thread.join()
        self.machine = sum(psutil.cpu_times()[:3]) - self.machine_start

    def by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for key, (kind, seconds) in self.seen.items():
            out[kind] += seconds - self.before.get(key, 0.0)
        return dict(out)


def run_span(tasks: dict[str, dict]) -> float:
    """Seconds from the first task's start to the end of report."""
    starts = [parse_time(t["start_date"]) for t in tasks.values() if t["start_date"]]
    return (parse_time(tasks["report"]["end_date"]) - min(starts)).total_seconds()


def task_seconds(task: dict) -> float | None:
    start, end = parse_time(task.get("start_date")), parse_time(task.get("end_date"))
    return (end - start).total_seconds() if start and end else None


def nightly(root: Path, lake: Path, modes: list[str], advance: Step | None = None) -> tuple[dict, dict]:
    """Per mode and day: the run's span and its tasks (each run counted done by ``advance``)."""
    advance = advance or Step()
    spans, tasks = {}, {}
    for mode in modes:
        with Stack(root, lake, mode) as stack:
            for day in (TRAINING_DAY, PLAIN_DAY):
                advance.doing(f"nightly, {mode}, {day}")
                run_id = stack.trigger(day)
                run = stack.wait(run_id)
                tasks[mode, day] = stack.tasks(run_id)
                if run["state"] != "success":
                    failed = [t for t, ti in tasks[mode, day].items() if ti["state"] == "failed"]
                    raise RuntimeError(f"{mode} run of {day} failed at {failed}; logs under {stack.af.home}")
                spans[mode, day] = run_span(tasks[mode, day])
                print(f"[nightly] {mode} {day}: {spans[mode, day]:.1f} s", flush=True)
                advance()
    return spans, tasks


def backfill(root: Path, lake: Path, modes: list[str], count: int, advance: Step | None = None) -> dict:
    advance = advance or Step()
    results = {}
    for mode in modes:
        advance.doing(f"backfill, {mode}")
        with Stack(root / "backfill", lake, mode) as stack:
            first, last = TRAINING_DAY, TRAINING_DAY + timedelta(days=count - 1)
            started = time.monotonic()
            with CpuSampler() as cpu:
                backfill_id = stack.af.backfill("fraud_nightly", "--from-date", first.isoformat(),
                                                "--to-date", last.isoformat())
                runs = stack.af.wait_for_backfill("fraud_nightly", backfill_id, timeout=4 * 3600)
            wall = time.monotonic() - started
            runs = [r for r in runs if r["run_type"] == "backfill"]
            tasks = [t for r in runs for t in stack.af.task_instances("fraud_nightly", r["dag_run_id"])]
            starts = [parse_time(t["start_date"]) for t in tasks if t["start_date"]]
            ends = [parse_time(t["end_date"]) for t in tasks if t["end_date"]]
            by_task = defaultdict(list)
            for t in tasks:
                if (s := task_seconds(t)) is not None and t["state"] == "success":
                    by_task[t["task_id"]].append(s)
            results[mode] = {
                "runs": len(runs), "succeeded": sum(r["state"] == "success" for r in runs),
                "retried": sum(1 for t in tasks if (t.get("try_number") or 1) > 1),
                "deferred": sum("waited for is there" in p.read_text(errors="replace")
                                for p in (stack.af.home / "logs").rglob("*.log")),
                "span": (max(ends) - min(starts)).total_seconds(), "wall": wall,
                "mean": {k: sum(v) / len(v) for k, v in by_task.items()},
                "lake": stack.lake, "days": days(first, count),
                "cpu": cpu.by_kind(), "cpu_machine": cpu.machine,
            }
            print(f"[backfill] {mode}: {results[mode]['span']:.0f} s for {len(runs)} runs", flush=True)
        advance()
    return results


def compare(lake_a: Path, lake_b: Path, dates: list[date]) -> tuple[int, list[str]]:
    """Partitions compared, and those whose rows differ (model outputs within 1e-6, by training key)."""
    from jobs.common.lake import Lake, NotPublished
    from jobs.torch.registry import Registry

    def content(lake: Lake, dataset: str, day: date):
        try:
            table = lake.read_table(dataset, day)
        except NotPublished:
            return None
        keys = [c for c in ("TRANSACTION_ID", "rank", "CUSTOMER_ID") if c in table.column_names][:1]
        rows = table.sort_by([(k, "ascending") for k in keys]).to_pylist()
        registry = Registry(lake)
        for row in rows:
            if row.get("model_version") is not None:
                row["model_version"] = registry.version(row["model_version"])["training_key"]
        return rows

    def same(a, b) -> bool:
        if (a is None) != (b is None) or (a is not None and len(a) != len(b)):
            return False
        for x, y in zip(a or [], b or [], strict=True):
            for key, value in x.items():
                other = y.get(key)
                if isinstance(value, float) and isinstance(other, float):
                    if abs(value - other) > 1e-6:
                        return False
                elif value != other:
                    return False
        return True

    a, b = Lake.from_uri(lake_a.as_uri()), Lake.from_uri(lake_b.as_uri())
    compared, differing = 0, []
    for day in dates:
        for dataset in COMPARED:
            compared += 1
            if not same(content(a, dataset, day), content(b, dataset, day)):
                differing.append(f"{dataset} {day}")
    return compared, differing


def main(flags: list[str]) -> int:
    small = "--small" in flags
    modes = next((f.split("=", 1)[1].split(",") for f in flags if f.startswith("--modes=")), list(MODES))
    count = 6 if small else BACKFILL_DAYS
    customers, terminals = (500, 1000) if small else (5000, 10000)
    load = os.getloadavg()
    runs = 1 + ("--no-nightly" not in flags) * 2 * len(modes) + ("--no-backfill" not in flags) * len(modes)
    # on a terminal: the runs done (building the lake, each nightly run, each mode's backfill)
    with tempfile.TemporaryDirectory(prefix="bench-nightly-") as tmp, \
            progress("bench nightly", total=runs, unit="runs") as advance:
        root = Path(tmp)
        started = time.monotonic()
        advance.doing("building the lake")
        lake = build_lake(root, customers, terminals, TRAINING_DAY + timedelta(days=count - 1))
        built = time.monotonic() - started
        advance()
        sections = {}
        if "--no-nightly" not in flags:
            spans, tasks = nightly(root / "nightly", lake, modes, advance)
            sections["nightly"] = nightly_table(spans, tasks, modes, customers, terminals, built, load)
        if len(modes) == 2 and "nightly" in sections:
            compared, differing = compare(*(root / "nightly" / f"lake-{m}" for m in modes), [TRAINING_DAY, PLAIN_DAY])
            sections["nightly"] += (f"\n- Outputs of the two modes: {compared - len(differing)} of {compared} "
                                    f"partitions equal{'' if not differing else ': differing ' + ', '.join(differing)}.")
        if "--no-backfill" not in flags:
            results = backfill(root, lake, modes, count, advance)
            sections["backfill"] = backfill_table(results, modes, count, load)
            if len(modes) == 2:
                compared, differing = compare(results[modes[0]]["lake"], results[modes[1]]["lake"],
                                              results[modes[0]]["days"])
                sections["backfill"] += (f"\n- Outputs of the two modes: {compared - len(differing)} of {compared} "
                                         f"partitions equal{'' if not differing else ': differing ' + ', '.join(differing)}.")
            # the backfill's first two nights against the nightly runs of the same days
            mode = modes[-1]
            if "nightly" not in sections:
                compared = None
            else:
                compared, differing = compare(root / "nightly" / f"lake-{mode}", results[mode]["lake"],
                                          [TRAINING_DAY, PLAIN_DAY])
            if compared is not None:
                sections["backfill"] += (f"\n- Backfill ({mode}) against the nightly runs of {TRAINING_DAY} and {PLAIN_DAY}: "
                                     f"{compared - len(differing)} of {compared} partitions equal"
                                     f"{'' if not differing else ': differing ' + ', '.join(differing)}.")
    for name, body in sections.items():
        print(f"\n## {name}\n\n{body}")
        if not small:
            write_section(name, body)
    return 0


def nightly_table(spans: dict, tasks: dict, modes: list[str], customers: int, terminals: int, built: float,
                  load: tuple[float, float, float]) -> str:
    header = ["task"] + [f"{mode}, {day} ({'training' if day == TRAINING_DAY else 'plain'} day)"
                         for mode in modes for day in (TRAINING_DAY, PLAIN_DAY)]
    rows = []
    for task in TASK_ORDER:
        cells = []
        for mode in modes:
            for day in (TRAINING_DAY, PLAIN_DAY):
                ti = tasks[mode, day].get(task, {})
                seconds = task_seconds(ti)
                if seconds is None or ti.get("state") != "success":
                    cells.append(ti.get("state") or "")
                else:
                    cells.append(f"{seconds:.1f} s ({seconds / spans[mode, day]:.0%})")
        rows.append([task, *cells])
    busy = []
    for mode in modes:
        for day in (TRAINING_DAY, PLAIN_DAY):
            total = sum(task_seconds(t) or 0 for t in tasks[mode, day].values())
            busy.append(f"{total:.1f} s ({total / spans[mode, day]:.0%})")
    rows.append(["sum of task times (the rest: between tasks)", *busy])
    rows.append(["**run: first task start to report end**",
                 *[f"**{spans[mode, day]:.1f} s**" for mode in modes for day in (TRAINING_DAY, PLAIN_DAY)]])
    rows.append(["target", *["<= 45 s" if day == PLAIN_DAY else "" for _ in modes for day in (TRAINING_DAY, PLAIN_DAY)]])
    from local_airflow import LOCAL_SLOTS as slots

    end = os.getloadavg()
    rows_a_day = "about 9,700" if customers == 5000 else "about 970"
    note = (f"`python -m bench nightly`: {customers:,} customers, {terminals:,} terminals ({rows_a_day} transactions a "
            f"day), history from {FIRST} published by the range commands ({built:.0f} s); each mode on its own copy of "
            f"that lake and its own Airflow as `make up` runs it (API server, DAG processor, scheduler, triggerer; "
            f"SQLite, LocalExecutor, {slots} task slots), runs triggered through the REST API one after the other. submit: a spark-submit per Spark step "
            f"(local[2]); connect: the Spark steps are clients of one Spark Connect server (local[2]) started with "
            f"the stack, as `make up` does. Load average (1/5/15 min): start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
            f"end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}.")
    return markdown_table(header, rows) + "\n\n" + note


def backfill_table(results: dict, modes: list[str], count: int, load: tuple[float, float, float]) -> str:
    header = ["mode", "runs (succeeded)", "tasks retried", "waits deferred", "first task start to last task end", "days per hour",
              "mean clean", "mean features", "mean train", "mean score", "mean report", "target"]
    rows = []
    for mode in modes:
        r = results[mode]
        mean = r["mean"]
        rows.append([mode, f"{r['runs']} ({r['succeeded']})", r["retried"], r["deferred"], f"**{r['span'] / 60:.1f} min**",
                     f"{r['runs'] / (r['span'] / 3600):.0f}",
                     *[f"{mean[t]:.1f} s" if t in mean else "" for t in ("clean", "features", "train", "score", "report")],
                     "<= 10 min"])
    end = os.getloadavg()
    note = (f"`airflow backfill create --dag-id fraud_nightly --from-date {TRAINING_DAY} --to-date "
            f"{TRAINING_DAY + timedelta(days=count - 1)}` ({count} nights, 5 training days), as typed (the backfill's "
            f"own default of 10 runs in flight), against the running scheduler with a triggerer (the waiting nights' "
            f"sensors are deferred to it), each mode on a fresh copy of the lake and a fresh Airflow. \"mean\" columns: "
            f"a task's average duration (the fixed cost of a Spark step is most of it at this size). Load average: "
            f"start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}.")
    cpu_rows = []
    kinds = [name for name, _ in CPU_CLASSES]
    for kind in kinds:
        cpu_rows.append([kind, *[f"{results[m]['cpu'].get(kind, 0.0):.0f} s "
                                 f"({results[m]['cpu'].get(kind, 0.0) / count:.1f} s a night)" for m in modes]])
    seen = {m: sum(results[m]["cpu"].values()) for m in modes}
    cpu_rows.append(["all of the above", *[f"{seen[m]:.0f} s ({seen[m] / count:.1f} s a night)" for m in modes]])
    cpu_rows.append(["the machine's own count (all processes; the rest: processes shorter than a sample, "
                     "the benchmark itself, the system)",
                     *[f"{results[m]['cpu_machine']:.0f} s, {results[m]['cpu_machine'] / results[m]['wall']:.2f} "
                       f"cores busy on average" for m in modes]])
    cpu_table = markdown_table(["CPU seconds while the backfill ran (user + system)", *modes], cpu_rows)
    return markdown_table(header, rows) + "\n\n" + note + "\n\n" + cpu_table


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
