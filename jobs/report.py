"""``python -m jobs.report --lake URI --date D``: the nightly report of day D.

Writes ``reports/date=D/`` through the lake: ``report.json`` (machine-readable), ``report.html``
(the human page, plots inline) and the plots as PNG files. Figures: counts (landed, clean,
quarantined by reason, features, scored, alerts), the data-quality verdict, the model that is
champion as of D with its promotion decision, the top alerts, and the matured-label
performance of earlier days (scored days D-37 .. D-8, whose labels have matured: AUC ROC,
average precision and Card Precision@k per day and pooled). The content depends only on the
lake, never on the clock.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
import sys
import uuid
from collections.abc import Sequence
from datetime import date

import numpy as np

from jobs.common.calendar import ONE_DAY, Calendar, calendar, day_range
from jobs.common.cli import EXIT_OK, day_parser, parse_days, run_each
from jobs.common.config import settings
from jobs.common.lake import Dataset, Lake, LakeError
from jobs.common.provenance import CHAMPION, InputRecorder, lineage

STEP = "report"
TOP_ALERTS = 10


# --- gathering -------------------------------------------------------------------------------------
def _manifest_rows(lake: Lake, dataset: str, day: date) -> int | None:
    manifest = lake.manifest(dataset, day)
    return None if manifest is None else int(manifest["rows"])


STEP_OUTPUTS = (("clean", Dataset.CLEAN), ("quality_gate", None), ("features", Dataset.FEATURES),
                ("score", Dataset.SCORES))


def step_status(lake: Lake, day: date) -> list[dict]:
    """What became of each step for D, and why where it did not publish: the report runs on a day
    whose steps failed, and says so."""
    out = []
    for step_name, dataset in STEP_OUTPUTS:
        record = lake.latest_run_record(step_name, day) or {}
        if dataset is None:  # the gate publishes nothing: its verdict is its run record
            status = "not run" if not record else "passed" if record.get("passed") else "failed"
            reason = "; ".join(record.get("failures") or []) or None
        elif lake.is_published(dataset, day):
            status, reason = "published", None
        elif (abandoned := lake.abandoned(dataset, day)) is not None:
            status, reason = "abandoned", abandoned["reason"]
        else:
            status, reason = record.get("status") or "not run", record.get("reason")
        out.append({"step": step_name, "status": status, "reason": reason})
    return out


def counts(lake: Lake, day: date) -> dict:
    clean = lake.manifest(Dataset.CLEAN, day) or {}
    stats = clean.get("stats", {})
    return {
        "landing_files": len(lake.landing_files(day)),
        "rows_in": stats.get("rows_in"),
        "clean": clean.get("rows"),
        "quarantined": stats.get("quarantined_total"),
        "quarantined_by_reason": stats.get("quarantined", {}),
        "duplicates_collapsed": stats.get("duplicates_collapsed"),
        "label_updates": stats.get("label_updates"),
        "label_events": {key: ((lake.manifest(Dataset.CLEAN_LABELS, day) or {}).get("stats") or {}).get(key)
                         for key in ("events_in", "clean", "quarantined_total", "quarantined")},
        "features": _manifest_rows(lake, Dataset.FEATURES, day),
        "scored": _manifest_rows(lake, Dataset.SCORES, day),
        "alerts": _manifest_rows(lake, Dataset.ALERTS, day),
    }


def volume_trend(lake: Lake, day: date, cal: Calendar) -> list[dict]:
    out = []
    for d in cal.expected(cal.span(day, cal.report_history_days)):
        manifest = lake.manifest(Dataset.CLEAN, d)
        if manifest is not None:
            stats = manifest.get("stats", {})
            out.append({"date": d.isoformat(), "clean": manifest["rows"], "quarantined": stats.get("quarantined_total", 0)})
    return out


def model_section(lake: Lake, day: date, cal: Calendar) -> dict:
    from jobs.torch.registry import Registry

    registry = Registry(lake, cal)
    latest = cal.schedule.latest_training_day(day)
    decision = registry.decision(latest) if latest else None
    try:
        champion = registry.champion_as_of(day)
    except Exception as exc:  # noqa: BLE001 - reported, the report still renders
        return {"champion": None, "status": f"unknown: {exc}", "latest_training_day": str(latest), "decision": decision}
    if champion is None:
        return {"champion": None, "status": "no champion yet", "latest_training_day": str(latest), "decision": decision}
    keep = ("version", "model", "train_day", "window_start", "window_end", "champion_since", "source", "role")
    return {
        "champion": {k: champion.get(k) for k in keep if k in champion},
        "status": "scored with the champion as of D",
        "latest_training_day": str(latest),
        "decision": decision,
    }


def matured_frame(lake: Lake, day: date, cal: Calendar) -> tuple[list[date], dict[str, np.ndarray]]:
    """Scores of the scored days whose labels have matured by D, with those labels as known before D
    began (inline ones and the feed's)."""
    from jobs.torch.data import LabelEvents, start_of_us

    first_date = cal.first_date
    matured = cal.expected(cal.report_matured(day))
    events = (LabelEvents.read(lake, matured, day_range(min(matured), day - ONE_DAY), cal.label_delay_days)
              if matured else None)
    days, parts = [], {"day": [], "card": [], "label": [], "score": []}
    for d in matured:
        if not lake.is_published(Dataset.SCORES, d) or not lake.is_published(Dataset.CLEAN, d):
            continue
        scores = lake.read_table(Dataset.SCORES, d, columns=["TRANSACTION_ID", "CUSTOMER_ID", "score"])
        ids = scores.column("TRANSACTION_ID").to_numpy()
        parts["day"].append(np.full(len(ids), (d - first_date).days))
        parts["card"].append(scores.column("CUSTOMER_ID").to_numpy())
        parts["label"].append(events.as_of(ids, start_of_us(day)))
        parts["score"].append(scores.column("score").to_numpy())
        days.append(d)
    arrays = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in parts.items()}
    return days, arrays


def matured_performance(days: list[date], frame: dict[str, np.ndarray], first_date: date, k: int) -> dict:
    from jobs.torch import metrics as M

    per_day = []
    for d in days:
        mask = frame["day"] == (d - first_date).days
        m = M.evaluate(frame["day"][mask], frame["card"][mask], frame["label"][mask], frame["score"][mask], k)
        per_day.append({"date": d.isoformat(), **{n: v for n, v in m.items() if not n.endswith("_per_day")}})
    pooled = None
    if days:
        m = M.evaluate(frame["day"], frame["card"], frame["label"], frame["score"], k)
        pooled = {n: v for n, v in m.items() if not n.endswith("_per_day")}
    return {"days": [d.isoformat() for d in days], "k": k, "per_day": per_day, "pooled": pooled}


def top_alerts(lake: Lake, day: date, n: int = TOP_ALERTS) -> list[dict]:
    if not lake.is_published(Dataset.ALERTS, day):
        return []
    rows = lake.read_table(Dataset.ALERTS, day).to_pylist()
    return sorted(rows, key=lambda r: r["rank"])[:n]


def day_scores(lake: Lake, day: date) -> np.ndarray:
    if not lake.is_published(Dataset.SCORES, day):
        return np.empty(0)
    return lake.read_table(Dataset.SCORES, day, columns=["score"]).column("score").to_numpy()


# --- plots -----------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def plots(frame: dict[str, np.ndarray], scores: np.ndarray, trend: list[dict], day: date) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    out = {}
    fig, ax = plt.subplots(figsize=(5, 4))
    if frame["label"].size and frame["label"].max() > 0:
        precision, recall, _ = precision_recall_curve(frame["label"], frame["score"])
        ax.plot(recall, precision)
        ax.set_title("Precision-recall, matured scored days")
    else:
        ax.text(0.5, 0.5, "no matured scored days yet", ha="center", va="center")
        ax.set_title("Precision-recall")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    out["pr_curve.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    if scores.size:
        ax.hist(scores, bins=50, log=True)
    else:
        ax.text(0.5, 0.5, "day not scored", ha="center", va="center")
    ax.set_title(f"Scores of {day}")
    ax.set_xlabel("score")
    out["score_hist.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    if trend:
        x = [t["date"][5:] for t in trend]
        ax.bar(x, [t["clean"] for t in trend], label="clean")
        ax.bar(x, [t["quarantined"] for t in trend], bottom=[t["clean"] for t in trend], label="quarantined")
        ax.legend()
        ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.set_title("Daily volume")
    out["volume.png"] = _png(fig)
    plt.close(fig)
    return out


# --- page ------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else html.escape(str(value))


def _table(rows: list[dict], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(report: dict, images: dict[str, bytes]) -> str:
    c, q, m = report["counts"], report["quality"], report["model"]
    perf = report["matured_performance"]
    k = perf["k"]
    img = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        for name, data in images.items()
    )
    quality = "n/a" if q is None else ("passed" if q.get("passed") else "FAILED: " + "; ".join(q.get("failures", [])))
    champion = m.get("champion") or {}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Fraud report {report['date']}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{margin:0.5em;border:1px solid #eee}}</style></head><body>
<h1>Nightly fraud report: {report['date']}</h1>
<h2>Counts</h2>{_table([c], ["rows_in", "clean", "quarantined", "duplicates_collapsed", "label_updates", "features", "scored", "alerts"])}
<p>Quarantined by reason: {html.escape(json.dumps(c.get("quarantined_by_reason") or {}))}</p>
<h2>Steps</h2>{_table(report["steps"], ["step", "status", "reason"])}
<h2>Data quality</h2><p>{html.escape(quality)}</p>
<h2>Model</h2><p>{html.escape(m["status"])}; champion {_fmt(champion.get("version"))} ({_fmt(champion.get("model"))},
trained {_fmt(champion.get("train_day"))}, champion since {_fmt(champion.get("champion_since"))}).
Latest training day: {_fmt(m.get("latest_training_day"))}.</p>
<h2>Matured-label performance (scored days D-37 .. D-8)</h2>
{_table(perf["per_day"] + ([{"date": "pooled", **perf["pooled"]}] if perf["pooled"] else []),
        ["date", "n_transactions", "n_fraud", "auc_roc", "average_precision", f"card_precision@{k}"])}
<h2>Top alerts</h2>{_table(report["top_alerts"], ["rank", "CUSTOMER_ID", "score", "n_tx", "model_version"])}
<h2>Plots</h2>{img}
</body></html>
"""


# --- entry point -----------------------------------------------------------------------------------
def build_report(lake: Lake, day: date, k: int | None = None) -> tuple[dict, dict[str, bytes]]:
    cal = calendar()
    k = k or settings().alert_k
    days, frame = matured_frame(lake, day, cal)
    scores = day_scores(lake, day)
    trend = volume_trend(lake, day, cal)
    score_run = lake.latest_run_record("score", day)
    report = {
        "date": day.isoformat(),
        "counts": counts(lake, day),
        "steps": step_status(lake, day),
        "quality": lake.latest_run_record("quality_gate", day),
        "model": model_section(lake, day, cal),
        "scoring": {
            "status": "scored" if scores.size or lake.is_published(Dataset.SCORES, day) else "not scored",
            "reason": None if lake.is_published(Dataset.SCORES, day) else (score_run or {}).get("reason"),
        },
        "matured_performance": matured_performance(days, frame, cal.first_date, k),
        "top_alerts": top_alerts(lake, day),
        "volume_trend": trend,
    }
    if report["quality"]:
        report["quality"] = {key: v for key, v in report["quality"].items() if key != "date"}
    return report, plots(frame, scores, trend, day)


def report_lineage(lake: Lake, day: date, report: dict, k: int) -> dict:
    """What the report of D was made from: the partitions its contract names (absent ones recorded
    as such) and the champion it describes."""
    cal = calendar()
    inputs = InputRecorder(lake).step_inputs(STEP, day, cal)
    champion = (report["model"].get("champion") or {}).get("version")
    inputs.append({"dataset": CHAMPION, "date": day.isoformat(), "digest": champion})
    return lineage(STEP, inputs, {"k": k})


def write_report(lake: Lake, day: date, report: dict, images: dict[str, bytes], provenance: dict | None = None) -> str:
    """Publish ``reports/date=D/`` (replacing the previous report whole); return the page's URI."""
    attempt = lake.new_attempt(Dataset.REPORTS, day)
    files = {"report.json": json.dumps(report, indent=2, sort_keys=True, default=str).encode()}
    files["report.html"] = render_html(report, images).encode()
    files.update(images)
    records = [lake.write_file(attempt, name, data) for name, data in files.items()]
    lake.publish(attempt, stats={"files": sorted(files)}, lineage=provenance, files=records)
    return lake.to_uri(posixpath.join(attempt.path, "report.html"))


def report_files(lake: Lake, day: date) -> dict[str, str]:
    """Paths of the published report files of D (name -> file-system path)."""
    manifest = lake.manifest(Dataset.REPORTS, day)
    if manifest is None:
        raise LakeError(f"no published report for {day} in {lake.uri}")
    folder = posixpath.join(lake.partition_path(Dataset.REPORTS, day), f"attempt={manifest['attempt']}")
    return {name: posixpath.join(folder, name) for name in manifest["stats"]["files"]}


def read_report(lake: Lake, day: date) -> dict:
    return lake.read_json(report_files(lake, day)["report.json"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = day_parser("python -m jobs.report", __doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=0, help="k of Card Precision@k (default FRAUD_ALERT_K)")
    args = parse_days(parser, argv)
    lake = Lake.from_uri(args.lake)
    k = args.k or settings().alert_k

    def one(day: date) -> None:
        report, images = build_report(lake, day, k)
        page = write_report(lake, day, report, images, report_lineage(lake, day, report, k))
        print(f"report of {day}: {page}")

    code = run_each(STEP, args.days, one)
    if code == EXIT_OK:
        from jobs.lineage import stale_count

        stale = stale_count(lake)
        for day in args.days:
            lake.write_run_record(STEP, day, uuid.uuid4().hex[:16], {"date": day.isoformat(), "stale_partitions": stale})
        print(f"report: {stale} stale partitions in the lake (python -m jobs.lineage status --lake {lake.uri})")
    return code


if __name__ == "__main__":
    sys.exit(main())
