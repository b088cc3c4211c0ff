"""``make run`` / ``python -m jobs.demo [--date D]``: a demo lake, then the nightly DAG for one date.

1. generates a small history into a local lake (``.lake/``, or ``FRAUD_LAKE_URI``);
2. bootstraps it the way an operator would, paying Spark's start-up once per step: the range
   commands of docs/contract.md ("Command line") (clean and features over the history, training on each training day in
   order, scoring the history);
3. runs the DAG ``fraud_nightly`` for D with ``airflow dags test`` (Airflow metadata on SQLite in
   ``.airflow/``, ``spark_default`` = ``local[2]``): landing sensor, Spark clean, quality gate,
   Spark features, training (D is a training day by default), scoring, report;
4. prints a summary: rows, quality, model and metrics, matured-label performance day by day, top
   alerts and why, and where everything is, ending with the report's address in the UI (``make
   up``) and its file.

Each step is skipped when its output is already in the lake, so a second ``make run`` only reruns
the DAG. ``make clean`` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from jobs.common.config import REPO_ROOT

DEFAULT_FIRST = date(2018, 4, 1)
# A training day (first date + 8 weeks): the DAG run trains too, and the report looks back on the
# 21 days scored from the first training day (04-29) to D-8 (05-19), whose labels have matured.
DEFAULT_DATE = date(2018, 5, 27)
AIRFLOW_HOME = REPO_ROOT / ".airflow"


class Demo:
    def __init__(self, args: argparse.Namespace):
        self.day: date = args.date
        self.first: date = args.first_date
        self.args = args
        os.environ.setdefault("FRAUD_LAKE_URI", (REPO_ROOT / ".lake").as_uri())
        os.environ["FRAUD_FIRST_DATE"] = self.first.isoformat()
        os.environ.setdefault("FRAUD_SPARK_DRIVER_MEMORY", "2g")
        os.environ.setdefault("FRAUD_SPARK_SHUFFLE_PARTITIONS", "4")
        os.environ.setdefault("FRAUD_POKE_SECONDS", "5")
        os.environ.setdefault("FRAUD_RETRIES", "0")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        from jobs.common.config import settings
        from jobs.common.lake import Lake

        self.lake_uri = settings().lake_uri
        self.lake = Lake.from_uri(self.lake_uri)
        self.timings: list[tuple[str, float]] = []

    # --- helpers ---------------------------------------------------------------------------------
    def run(self, label: str, argv: list[str], ok_codes: tuple[int, ...] = (0,)) -> int:
        print(f"\n==> {label}\n    $ {' '.join(argv)}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=os.environ.copy())
        self.timings.append((label, time.monotonic() - started))
        if proc.returncode not in ok_codes:
            raise SystemExit(f"demo: step failed ({label}), exit code {proc.returncode}")
        return proc.returncode

    def spark(self, job: str, *args: str) -> list[str]:
        spark_submit = str(Path(sys.executable).parent / "spark-submit")
        memory = os.environ["FRAUD_SPARK_DRIVER_MEMORY"]
        return [spark_submit, "--master", "local[2]", "--driver-memory", memory, f"jobs/spark/{job}.py", *args]

    # --- steps -----------------------------------------------------------------------------------
    def generate(self) -> None:
        if self.lake.landing_ready(self.day) and self.lake.landing_ready(self.first):
            print(f"landing {self.first} .. {self.day} already generated")
            return
        days = (self.day - self.first).days + 1
        self.run("generate the demo history", [
            sys.executable, "-m", "jobs.datagen", "--lake", self.lake_uri, "--start", self.first.isoformat(),
            "--days", str(days), "--customers", str(self.args.customers), "--terminals", str(self.args.terminals),
            "--seed", "0",
        ])  # fmt: skip

    def bootstrap(self) -> None:
        """Publish what the nightly run for D reads from before D, as the step contracts declare:
        the clean and feature history (one range run each), the decisions of the training days
        before D in order, and the scores the report looks back on."""
        from jobs.common import commands
        from jobs.common.calendar import ONE_DAY, calendar
        from jobs.common.contracts import ORDER, upstream
        from jobs.common.lake import Dataset
        from jobs.torch.registry import Registry

        cal = calendar()
        end = self.day - ONE_DAY
        training = cal.schedule.training_days(self.first, end)
        runs = [(s, self.day) for s in ORDER] + [("train", t) for t in training]
        needed = {ds: [d for d in days if d <= end] for ds, days in upstream(runs, cal).items()}
        for job in ("clean", "features"):
            days = needed[Dataset.CLEAN if job == "clean" else Dataset.FEATURES]
            missing = [d for d in days if not self.lake.is_published(getattr(Dataset, job.upper()), d)]
            if missing:
                args = commands.day_args(self.lake_uri, min(missing), end)
                self.run(f"{job} the history {min(missing)}..{end} (one Spark start)", self.spark(job, *args))
        registry = Registry(self.lake, cal)
        for train_day in training:
            if registry.decision(train_day) is None:
                self.run(f"train on training day {train_day}",
                         commands.step_command("train", commands.day_args(self.lake_uri, train_day)))
        scored = [d for d in needed.get(Dataset.SCORES, []) if d >= cal.schedule.first_training_day]
        if scored and not self.lake.is_published(Dataset.SCORES, end):
            self.run("score the history", commands.step_command(
                "score", commands.day_args(self.lake_uri, min(scored), end)), ok_codes=(0, 99))

    def nightly(self) -> None:
        sys.path.insert(0, str(REPO_ROOT / "deploy"))
        from local_airflow import LocalAirflow

        # the UI of `make up` (same home) reads the login from this home's passwords file: keep its password
        password_file = AIRFLOW_HOME / "admin.password"
        password = password_file.read_text().strip() if password_file.exists() else "admin"
        af = LocalAirflow(AIRFLOW_HOME, self.lake_uri, password=password)
        os.environ.update({k: v for k, v in af.env.items() if k.startswith(("AIRFLOW", "FRAUD", "PATH"))})
        started = time.monotonic()
        af.init()
        self.timings.append(("airflow metadata (SQLite) and gpu pool", time.monotonic() - started))
        # D goes in the run's form (the plan task takes the form's date first), with no logical date:
        # `dags test` starts a run at its logical date, so a 2018 one would show in the UI as started
        # in 2018 and lasting years. Without one the run is a manual run of now, timed as it runs.
        conf = json.dumps({"date": self.day.isoformat()})
        self.run(f"nightly DAG fraud_nightly for {self.day} (airflow dags test)", [
            "airflow", "dags", "test", "fraud_nightly", "--conf", conf,
        ])  # fmt: skip

    # --- summary ---------------------------------------------------------------------------------
    def summary(self, total: float) -> None:
        from jobs.common.calendar import format_days
        from jobs.report import read_report, report_files

        report = read_report(self.lake, self.day)
        c, q, m, perf = report["counts"], report["quality"] or {}, report["model"], report["matured_performance"]
        k = perf["k"]
        champion = m.get("champion") or {}
        decision = m.get("decision") or {}
        print("\n" + "=" * 78)
        print(f"Nightly fraud pipeline, day {report['date']}   (lake {self.lake_uri})")
        print("=" * 78)
        reasons = ", ".join(f"{r['rows']} {r['reason']}" for r in report["quarantine"] if r["rows"]) or "none"
        print(f"rows landed {c['rows_in']}, clean {c['clean']}, quarantined {c['quarantined']} ({reasons}), "
              f"duplicates collapsed {c['duplicates_collapsed']}")
        verdict = "passed" if q.get("passed") else f"failed: {q.get('failures')}"
        print(f"quality gate: {verdict} (quarantine share {q.get('quarantine_share', 0):.2%}, "
              f"volume ratio {q.get('volume_ratio') or float('nan'):.2f} vs trailing median)")  # fmt: skip
        print(f"model: {m['status']}: {champion.get('version')} ({champion.get('model')}, trained "
              f"{champion.get('train_day')}, window {champion.get('window_start')}..{champion.get('window_end')})")  # fmt: skip
        if decision:
            shown = {key: decision.get(key) for key in ("train_day", "promoted", "outcome", "reason") if key in decision}
            print(f"decision of {m.get('latest_training_day')}: {json.dumps(shown, default=str)}")
        pooled = perf.get("pooled")
        if pooled:
            print(f"matured-label performance by scored day ({len(perf['days'])} days, labels as known on D):")
            print(f"  {'day':10s} {'tx':>6s} {'frauds':>6s} {'AUC':>6s} {'AP':>6s} {f'CP@{k}':>7s} {'alerts hit':>10s}")
            for r in perf["per_day"] + [{**pooled, "date": "all days"}]:
                hit = f"{r['alerts_with_fraud']}/{r['alerts']}" if r.get("alerts") else "-"
                print(f"  {r['date']:10s} {r['n_transactions']:6d} {r['n_fraud']:6d} {r['auc_roc']:6.3f} "
                      f"{r['average_precision']:6.3f} {r[f'card_precision@{k}']:7.3f} {hit:>10s}")
        else:
            print("matured-label performance: no scored day has matured labels yet")
        if pooled:
            print(f"  (CP@{k} over all days: a card caught on an earlier day is not counted again)")
        by_reason: dict[str, list[date]] = {}
        for gap in perf.get("missing", []):
            by_reason.setdefault(gap["reason"], []).append(date.fromisoformat(gap["date"]))
        for reason, days in by_reason.items():
            print(f"  no scores for {format_days(days)} ({len(days)} days): {reason}")
        drift = report.get("drift") or {}
        if drift.get("score") and drift["score"]["psi"] is not None:
            print(f"drift vs the champion's training data: score PSI {drift['score']['psi']:.3f} "
                  f"({drift['score']['verdict']}); inputs above {drift['threshold']}: "
                  f"{', '.join(drift['drifted_inputs']) or 'none'}")
        else:
            print(f"drift: {drift.get('status')}")
        print(f"scored {c['scored']} transactions; top alerts (of {c['alerts']}) and the input that moved each most:")
        for alert in report["top_alerts"][:5]:
            why = (alert.get("attributions") or [{}])[0]
            reason = f"{why['input']} = {why['value']:.4g} ({why['attribution']:+.2f} log-odds)" if why else "n/a"
            print(f"  #{alert['rank']:<3} card {alert['CUSTOMER_ID']:<6} score {alert['score']:.4f}  ({alert['n_tx']} tx)  "
                  f"{reason}")
        files = report_files(self.lake, self.day)
        print("\nwhere things are:")
        print(f"  report JSON   {self.lake.to_uri(files['report.json'])}")
        print(f"  lake          {self.lake_uri}  (clean/ quarantine/ features/ models/ scores/ alerts/ reports/)")
        print(f"  Airflow       {AIRFLOW_HOME} (SQLite metadata, task logs under logs/)")
        print("\ntimings:")
        for label, seconds in self.timings:
            print(f"  {seconds:7.1f} s  {label}")
        print(f"  {total:7.1f} s  total")
        port = os.environ.get("FRAUD_AIRFLOW_PORT", "8080")
        print(f"\nthe report of {self.day}:")
        print(f"  in the UI     http://127.0.0.1:{port}/fraud-reports/{self.day}  (after `make up`)")
        print(f"  as a file     {self.lake.to_uri(files['report.html'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--date", type=date.fromisoformat, default=DEFAULT_DATE, help=f"day D (default {DEFAULT_DATE})")
    parser.add_argument("--first-date", type=date.fromisoformat, default=DEFAULT_FIRST)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--terminals", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.date <= args.first_date:
        parser.error("--date must be after --first-date")
    started = time.monotonic()
    demo = Demo(args)
    demo.generate()
    demo.bootstrap()
    demo.nightly()
    demo.summary(time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
