"""``python -m jobs.torch.quality --lake URI``: the reference protocol on reference-scale data.

The reference protocol (docs/contract.md): four weekly folds whose training starts are 2018-07-25, 08-01, 08-08 and 08-15; each
trains on the week from its start (the 7-day reference window) or on the product's window ending
on the same day, skips 7 days (the label delay) and tests on the next 7 with the test-set rule
(known frauds counted from the fold's start, so both configurations face the same test rows).
Prints AUC ROC, average precision and Card Precision@100 per fold and averaged, beside the
published reference results, and a bound: the product model's scores with every fraud that
carries evidence ranked first (:func:`bound_fold`; a compromised terminal's frauds carry none until
one of them has matured past the 7-day label delay), so the distance to the bound is what a better
model could still gain. ``--folds validation`` runs the four folds a month earlier
(starts 06-27 .. 07-18, test weeks ending before the first test week): model choices are made
there, never on the test weeks.

The features come from the lake. Days missing there are computed with the project's Spark jobs
(``jobs/spark/clean.py`` then ``jobs/spark/features.py`` over the range, via spark-submit);
with ``--generate`` an empty landing area is first filled by ``python -m jobs.datagen`` at
reference scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from jobs.common import contracts
from jobs.common.calendar import MICROS_PER_DAY, Calendar, calendar, day_range
from jobs.common.config import REPO_ROOT, settings
from jobs.common.lake import Dataset, Lake
from jobs.common.progress import progress
from jobs.common.schema import CLEAN_SCHEMA
from jobs.datagen.simulator import SCENARIO2_DAYS
from jobs.torch.checkpoint import Loaded
from jobs.torch.data import (
    FeatureFrame,
    model_history_days,
    order_by_key_time,
    read_features,
    read_for_model,
)
from jobs.torch.evaluate import evaluate_scores
from jobs.torch.fit import train_model
from jobs.torch.model import scorer_for
from jobs.torch.predict import predict
from jobs.torch.train import TrainConfig

DATA_START = date(2018, 4, 1)
CAL = Calendar(DATA_START)  # the reference protocol's calendar: 7-day label delay and test weeks
TEST_STARTS = CAL.weekly(date(2018, 7, 25), 4)
VALIDATION_STARTS = CAL.weekly(date(2018, 6, 27), 4)
NAMES = ("auc_roc", "average_precision", "card_precision@100")
REFERENCE = [  # docs/contract.md (ref), test AUC / AP / CP@100
    ("logistic regression (ref)", 0.868, 0.623, 0.297),
    ("random forest (ref)", 0.870, 0.678, 0.299),
    ("XGBoost (ref)", 0.869, 0.687, 0.303),
    ("feed-forward NN (ref)", 0.876, 0.675, 0.303),
    ("LSTM, last 5 tx (ref)", 0.876, 0.665, 0.297),
]


def fold_days(start: date, window_days: int) -> tuple[list[date], list[date]]:
    """Training window ending start+6 (the reference's training week's last day), test start+14..+20."""
    return CAL.reference_fold(start, window_days)


def ground_truth(lake: Lake, frame: FeatureFrame, days: list[date]) -> np.ndarray:
    """The simulator's truth for the frame's rows (``TX_FRAUD_SCENARIO`` > 0; the inline label where
    the data has no scenario): the final labels the reference protocol evaluates on, whether or not
    a label event ever reported them."""
    clean = lake.read_days(Dataset.CLEAN, days, schema=CLEAN_SCHEMA,
                           columns=["TRANSACTION_ID", "TX_FRAUD", "TX_FRAUD_SCENARIO"])
    ids = clean.column("TRANSACTION_ID").to_numpy()
    scenario = clean.column("TX_FRAUD_SCENARIO")
    truth = np.where(scenario.is_valid().to_numpy(zero_copy_only=False), scenario.fill_null(0).to_numpy() > 0,
                     clean.column("TX_FRAUD").fill_null(0).to_numpy() == 1)
    order = np.argsort(ids)
    return truth[order[np.searchsorted(ids[order], frame.txid)]].astype(np.int8)


def run_fold(lake: Lake, cfg: TrainConfig, start: date, k: int = 100, keep_scores: bool = False) -> dict:
    """Train on the fold's window with the labels known when its test week begins (as the pipeline
    would on that day), then evaluate the test week on the final labels."""
    window, test = fold_days(start, cfg.window_days)
    t0 = time.time()
    trained = train_model(lake, cfg, window, CAL, torch.device("cpu"), labels_as_of=min(test))
    seconds = time.time() - t0
    mcfg = cfg.model_config()
    loaded = Loaded("quality", mcfg, scorer_for(mcfg, trained.transform, trained.model).eval())
    frame, history = read_for_model(lake, test, mcfg, CAL)
    frame.label = ground_truth(lake, frame, test)
    scores = predict(loaded, frame, history)
    out = evaluate_scores(lake, frame, scores, test, start, CAL, k)
    out.update(train_rows=len(trained.frame), train_frauds=int(trained.frame.label.sum()),
               train_seconds=round(seconds, 1))
    if keep_scores:
        out["scores"] = scores
    return out


def with_evidence(lake: Lake, start: date) -> tuple[FeatureFrame, np.ndarray]:
    """The test rows of a fold, and which of them are frauds that carry evidence a model could use.

    Scenario 1 and 3 frauds show in their amounts. A scenario 2 fraud (a compromised terminal: every
    transaction there is fraud for 28 days, at ordinary amounts) shows only once a fraud of that
    compromise has matured into the label window: a scenario 2 fraud at the same terminal between
    28 and 7 days before it. In the first 7 days of a compromise nothing observable distinguishes
    its transactions. This uses the simulator's ground truth (``TX_FRAUD_SCENARIO``), which no model
    ever sees.
    """
    _, test = fold_days(start, CAL.reference_window_days)
    frame = read_features(lake, test)
    frame.label = ground_truth(lake, frame, test)
    history = day_range(max(DATA_START, min(test) - timedelta(days=SCENARIO2_DAYS)), max(test))
    clean = lake.read_days(Dataset.CLEAN, history, schema=CLEAN_SCHEMA,
                           columns=["TRANSACTION_ID", "TX_DATETIME", "TERMINAL_ID", "TX_FRAUD_SCENARIO"])
    ids = clean.column("TRANSACTION_ID").to_numpy()
    scenario = clean.column("TX_FRAUD_SCENARIO").fill_null(0).to_numpy()
    terminal = clean.column("TERMINAL_ID").to_numpy()
    when = clean.column("TX_DATETIME").cast(pa.int64()).to_numpy()
    order = np.argsort(ids)
    at = order[np.searchsorted(ids[order], frame.txid)]
    # scenario 2 frauds per terminal, as of t - 7 days minus as of just before t - 28 days
    s2 = np.flatnonzero(scenario == 2)
    frauds = order_by_key_time(terminal[s2].astype(np.int64), when[s2], ids[s2])
    matured_compromise = (frauds.rows_at_or_before(frame.terminal, frame.time_us - CAL.label_delay_us)
                          - frauds.rows_at_or_before(frame.terminal, frame.time_us - SCENARIO2_DAYS * MICROS_PER_DAY - 1)) > 0
    fraud_scenario = scenario[at]
    evidence = (frame.label == 1) & ((fraud_scenario == 1) | (fraud_scenario == 3)
                                     | ((fraud_scenario == 2) & matured_compromise))
    return frame, evidence


def bound_fold(lake: Lake, start: date, scores: np.ndarray, k: int = 100) -> dict:
    """An upper bound for the fold: the model's scores with every fraud that carries evidence
    (:func:`with_evidence`) ranked above everything else. No model can find more fraud cards from
    the information the pipeline has; what remains is the frauds nothing reveals yet."""
    frame, evidence = with_evidence(lake, start)
    _, test = fold_days(start, CAL.reference_window_days)
    return evaluate_scores(lake, frame, scores + evidence, test, start, CAL, k)


def ensure_features(lake: Lake, days: list[date], generate: bool, label_delay: str = "fixed:7") -> None:
    missing = [d for d in days if not lake.is_published(Dataset.FEATURES, d)]
    if not missing:
        return
    if generate and not lake.landing_ready(DATA_START):
        _run([sys.executable, "-m", "jobs.datagen", "--lake", lake.uri, "--start", DATA_START.isoformat(),
              "--days", "183", "--customers", "5000", "--terminals", "10000", "--seed", "0",
              "--label-delay", label_delay])
    beside = Path(sys.executable).with_name("spark-submit")  # this interpreter's pyspark first
    spark_submit = str(beside) if beside.exists() else (shutil.which("spark-submit") or "spark-submit")
    for job in ("clean", "features"):
        script = REPO_ROOT / "jobs" / "spark" / f"{job}.py"
        if not script.exists():
            raise SystemExit(f"quality: {len(missing)} feature days are missing ({missing[0]}..{missing[-1]}) and "
                             f"{script.relative_to(REPO_ROOT)} does not exist to compute them; publish the features "
                             f"first (spark-submit jobs/spark/features.py --lake URI --start D1 --end D2)")
    first_missing = min(missing)
    # every clean day the features of the missing days read, and what those clean days read in turn
    # (a label event's look-back): from the step contracts, as the DAG's sensors wait for them
    upstream = contracts.upstream([("features", d) for d in missing], calendar())
    clean_days = sorted({d for dataset in contracts.step("clean").writes for d in upstream.get(dataset, [])
                         if d >= DATA_START and not lake.is_published(dataset, d)})
    if clean_days:
        _run([spark_submit, str(REPO_ROOT / "jobs/spark/clean.py"), "--lake", lake.uri,
              "--start", min(clean_days).isoformat(), "--end", max(clean_days).isoformat()])
    _run([spark_submit, str(REPO_ROOT / "jobs/spark/features.py"), "--lake", lake.uri,
          "--start", first_missing.isoformat(), "--end", max(missing).isoformat()])


def _run(cmd: list[str]) -> None:
    print("quality: running", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    # spark-submit finds SPARK_HOME by running ``python3`` from PATH: make that this interpreter, so a
    # venv that is not activated still works (otherwise: "/bin/spark-class: No such file or directory")
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    if subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode != 0:
        raise SystemExit(f"quality: command failed: {' '.join(cmd)}")


def format_table(results: dict[str, list[dict]], reference: bool) -> str:
    width = max(44, *(len(label) for label in results))
    lines = [f"{'configuration':{width}s} {'fold':10s} {'AUC':>6s} {'AP':>6s} {'CP@100':>7s}"]
    for label, folds in results.items():
        for f in folds:
            lines.append(f"{label:{width}s} {f['train_start']:10s} {f['auc_roc']:6.3f} {f['average_precision']:6.3f} "
                         f"{f['card_precision@100']:7.3f}")
        mean = [float(np.mean([f[n] for f in folds])) for n in NAMES]
        lines.append(f"{label:{width}s} {'MEAN':10s} {mean[0]:6.3f} {mean[1]:6.3f} {mean[2]:7.3f}")
    if reference:
        for name, auc, ap, cp in REFERENCE:
            lines.append(f"{name:{width}s} {'MEAN':10s} {auc:6.3f} {ap:6.3f} {cp:7.3f}")
    return "\n".join(lines)


def run_protocol(lake: Lake, product: TrainConfig, starts: list[date], generate: bool, label_delay: str) -> dict:
    configs = {f"product default ({product.model}, {product.window_days}-day window)": product}
    reference = CAL.reference_window_days
    if product.window_days != reference:
        configs[f"reference window ({product.model}, {reference} days)"] = replace(product, window_days=reference)
    longest = max(c.window_days for c in configs.values())
    mcfg = product.model_config()
    lookback = model_history_days(mcfg.lookback_days, mcfg.terminal_len, mcfg.terminal_lookback_days) if mcfg.kind == "seq" else 0
    first_train = min(min(fold_days(start, longest)[0]) for start in starts)
    needed_from = max(DATA_START, first_train - timedelta(days=lookback))
    ensure_features(lake, day_range(needed_from, max(fold_days(starts[-1], reference)[1])), generate, label_delay)

    results: dict[str, list[dict]] = {}
    # on a terminal: the folds done (each configuration's, then the bound's), after the features exist
    with progress(f"quality ({label_delay})", total=(len(configs) + 1) * len(starts), unit="folds") as advance:
        for label, cfg in configs.items():
            results[label] = []
            for start in starts:
                advance.doing(f"{cfg.window_days}-day window, {start}")
                fold = run_fold(lake, cfg, start, keep_scores=cfg is product)
                results[label].append(fold)
                print(f"quality ({label_delay}): {label} fold {start}: AUC {fold['auc_roc']:.3f} "
                      f"AP {fold['average_precision']:.3f} CP@100 {fold['card_precision@100']:.3f} "
                      f"({fold['train_rows']} rows, {fold['train_frauds']} known frauds, {fold['train_seconds']} s)",
                      flush=True)
                advance()
        product_label = next(iter(configs))
        bounds = []
        for start, fold in zip(starts, results[product_label], strict=True):
            advance.doing(f"bound, {start}")
            bounds.append(bound_fold(lake, start, fold.pop("scores")))
            advance()
    results["bound: product model, every fraud with evidence first"] = bounds
    return results


def means(folds: list[dict]) -> list[float]:
    return [float(np.mean([f[n] for f in folds])) for n in NAMES]


def format_cost(fixed: dict[str, list[dict]], late: dict[str, list[dict]]) -> str:
    """The same protocol on fixed-delay and realistic-delay labels, and what late labels cost."""
    width = max(44, *(len(label) for label in fixed))
    lines = [f"{'configuration':{width}s} {'labels':10s} {'AUC':>6s} {'AP':>6s} {'CP@100':>7s}"]
    for label in fixed:
        a, b = means(fixed[label]), means(late[label])
        lines.append(f"{label:{width}s} {'fixed:7':10s} {a[0]:6.3f} {a[1]:6.3f} {a[2]:7.3f}")
        lines.append(f"{label:{width}s} {'realistic':10s} {b[0]:6.3f} {b[1]:6.3f} {b[2]:7.3f}")
        lines.append(f"{label:{width}s} {'cost':10s} {b[0] - a[0]:+6.3f} {b[1] - a[1]:+6.3f} {b[2] - a[2]:+7.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.torch.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--lake", default="", help="lake URI (default: FRAUD_LAKE_URI)")
    parser.add_argument("--folds", choices=("test", "validation"), default="test")
    parser.add_argument("--generate", action="store_true", help="generate reference-scale data if landing is empty")
    parser.add_argument("--label-delay", default="fixed:7", help="the generator's label delay for --lake (default fixed:7)")
    parser.add_argument("--realistic-lake", default="",
                        help="also run the protocol on this lake, generated with --label-delay realistic, and print "
                             "what late labels cost")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args, train_argv = parser.parse_known_args(argv)
    s = settings()
    lake = Lake.from_uri(args.lake or s.lake_uri)
    product = TrainConfig.from_argv(["--date", "2018-01-01", *train_argv])
    torch.set_num_threads(product.threads)
    starts = TEST_STARTS if args.folds == "test" else VALIDATION_STARTS
    results = run_protocol(lake, product, starts, args.generate, args.label_delay)
    out = {"folds": args.folds, "label_delay": args.label_delay, "results": results}
    print()
    print(f"{args.folds} folds (training starts {', '.join(d.isoformat() for d in starts)}), labels {args.label_delay}:")
    print(format_table(results, reference=args.folds == "test"))
    if args.realistic_lake:
        late = run_protocol(Lake.from_uri(args.realistic_lake), product, starts, args.generate, "realistic")
        out["realistic"] = late
        print()
        print("realistic label delays (docs/contract.md, 'Labels as events'):")
        print(format_table(late, reference=False))
        print()
        print("the cost of late labels (test folds, means):")
        print(format_cost(results, late))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
