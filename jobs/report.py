"""``python -m jobs.report --lake URI --date D``: the nightly report of day D, as monitoring over time.

Writes ``reports/date=D/`` through the lake: ``report.json`` (machine-readable), ``report.html``
(the human page, plots inline) and the plots as PNG files. Sections (docs/contract.md, "The
nightly report"):

- the day: counts, quarantine by reason, the steps' outcomes, the data-quality verdict;
- performance over time: the last 30 scored days whose labels have matured by D (D-37 .. D-8),
  day by day: AUC ROC, average precision, Card Precision@k, and the precision of the alert list
  that was published that day; a day of the window without published scores is named with the
  reason, never skipped silently;
- drift: the population stability index of D's scores and of each model input against the
  champion's training data (``jobs.monitoring``), flagged above its threshold;
- volume and quarantine by reason over the last weeks;
- the champion and its lineage (training window, decision, metrics);
- the alerts: each card's top transaction and the inputs that drove its score (stored with the
  alerts at scoring time, ``jobs.torch.explain``), and the card's transactions of the day.

The content depends only on the lake, never on the clock or on run facts (those, such as the
stale-partition count, go in the step's run record and beside the report in the UI).
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


def quarantine_table(c: dict) -> list[dict]:
    """D's quarantined rows by reason (the reasons that occurred), most frequent first, with their
    share of the rows landed."""
    rows_in = c.get("rows_in") or 0
    reasons = sorted(((r, n) for r, n in (c.get("quarantined_by_reason") or {}).items() if n),
                     key=lambda kv: (-kv[1], kv[0]))
    return [{"reason": r, "rows": n, "share": (n / rows_in) if rows_in else None} for r, n in reasons]


def volume_trend(lake: Lake, day: date, cal: Calendar) -> list[dict]:
    """Per day of the report's history up to D: clean and quarantined rows (by reason); a day
    without a clean partition is there with ``clean`` None."""
    out = []
    for d in cal.expected(cal.span(day, cal.report_history_days)):
        manifest = lake.manifest(Dataset.CLEAN, d)
        if manifest is None:
            out.append({"date": d.isoformat(), "clean": None, "quarantined": None, "quarantined_by_reason": {}})
            continue
        stats = manifest.get("stats", {})
        out.append({"date": d.isoformat(), "clean": manifest["rows"], "quarantined": stats.get("quarantined_total", 0),
                    "quarantined_by_reason": dict(stats.get("quarantined") or {})})
    return out


def model_section(lake: Lake, day: date, cal: Calendar) -> dict:
    """The champion as of D and its lineage: training window, the decision that made it champion
    (with the validation figures it was decided on), its training metrics."""
    from jobs.torch.registry import METRICS, Registry

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
    own = registry.decision(champion["train_day"]) if champion.get("train_day") else None
    promoted_by = None
    if own is not None and own.get("champion") == champion["version"]:
        validation = own.get("validation") or {}
        promoted_by = {
            "train_day": own.get("train_day"), "outcome": own.get("outcome"), "reason": own.get("reason"),
            "validation_week": validation.get("week"),
            "candidate": _metrics(validation.get("candidate")), "previous_champion": own.get("previous_champion"),
            "previous_champion_metrics": _metrics(validation.get("champion")),
        }
    try:
        train_metrics = json.loads(registry.read_file(champion["version"], METRICS)).get("train", {})
    except (OSError, LakeError, ValueError):
        train_metrics = {}
    return {
        "champion": {k: champion.get(k) for k in keep if k in champion},
        "status": "scored with the champion as of D",
        "latest_training_day": str(latest),
        "decision": decision,
        "lineage": {
            "training_window": [champion.get("window_start"), champion.get("window_end")],
            "promoted_by": promoted_by,
            "training_metrics": {k: train_metrics.get(k) for k in ("rows", "frauds", "auc_roc", "average_precision")},
        },
    }


def _metrics(block: dict | None) -> dict | None:
    if not block:
        return None
    return {k: v for k, v in block.items() if k in ("auc_roc", "average_precision", "n_transactions", "n_fraud")
            or k.startswith("card_precision@") and not k.endswith("_per_day")}


def missing_reason(lake: Lake, d: date, cal: Calendar) -> str:
    """Why the scores of ``d`` are not published, as the lake knows it."""
    abandoned = lake.abandoned(Dataset.SCORES, d)
    if abandoned is not None:
        return f"abandoned: {abandoned['reason']}"
    first = cal.schedule.first_training_day
    if d < first and lake.latest_run_record("score", d) is None:
        return f"before the first training day ({first}): no champion to score with yet"
    record = lake.latest_run_record("score", d)
    if record is None:
        return "not scored: no scoring run recorded"
    if record.get("status") == "skipped":
        return f"skipped: {record.get('reason')}"
    return f"not published ({record.get('status') or 'unknown'}{': ' + record['reason'] if record.get('reason') else ''})"


def matured_frame(lake: Lake, day: date, cal: Calendar) -> tuple[list[date], dict[str, np.ndarray], list[dict]]:
    """Scores of the scored days whose labels have matured by D, with those labels as known before D
    began (inline ones and the feed's), and the days of that window whose scores are missing."""
    from jobs.torch.data import LabelEvents, start_of_us

    first_date = cal.first_date
    matured = cal.expected(cal.report_matured(day))
    events = (LabelEvents.read(lake, matured, day_range(min(matured), day - ONE_DAY), cal.label_delay_days)
              if matured else None)
    days, missing, parts = [], [], {"day": [], "card": [], "label": [], "score": []}
    for d in matured:
        if not lake.is_published(Dataset.SCORES, d) or not lake.is_published(Dataset.CLEAN, d):
            reason = missing_reason(lake, d, cal) if not lake.is_published(Dataset.SCORES, d) else "clean partition missing"
            missing.append({"date": d.isoformat(), "reason": reason})
            continue
        scores = lake.read_table(Dataset.SCORES, d, columns=["TRANSACTION_ID", "CUSTOMER_ID", "score"])
        ids = scores.column("TRANSACTION_ID").to_numpy()
        parts["day"].append(np.full(len(ids), (d - first_date).days))
        parts["card"].append(scores.column("CUSTOMER_ID").to_numpy())
        parts["label"].append(events.as_of(ids, start_of_us(day)))
        parts["score"].append(scores.column("score").to_numpy())
        days.append(d)
    arrays = {k: (np.concatenate(v) if v else np.empty(0)) for k, v in parts.items()}
    return days, arrays, missing


def alert_precision(lake: Lake, d: date, card: np.ndarray, label: np.ndarray) -> dict:
    """The alert list published for ``d`` against the matured labels: the share of its cards with a
    fraud that day (None where no list was published)."""
    if not lake.is_published(Dataset.ALERTS, d):
        return {"alerts": None, "alerts_with_fraud": None, "alert_precision": None}
    alerted = lake.read_table(Dataset.ALERTS, d, columns=["CUSTOMER_ID"]).column("CUSTOMER_ID").to_numpy()
    fraud_cards = np.unique(card[label > 0])
    hits = int(np.isin(alerted, fraud_cards).sum())
    return {"alerts": int(len(alerted)), "alerts_with_fraud": hits,
            "alert_precision": hits / len(alerted) if len(alerted) else None}


def matured_performance(lake: Lake, days: list[date], frame: dict[str, np.ndarray], missing: list[dict],
                        first_date: date, k: int) -> dict:
    from jobs.torch import metrics as M

    per_day = []
    for d in days:
        mask = frame["day"] == (d - first_date).days
        m = M.evaluate(frame["day"][mask], frame["card"][mask], frame["label"][mask], frame["score"][mask], k)
        per_day.append({"date": d.isoformat(), **{n: v for n, v in m.items() if not n.endswith("_per_day")},
                        **alert_precision(lake, d, frame["card"][mask], frame["label"][mask])})
    pooled = None
    if days:
        m = M.evaluate(frame["day"], frame["card"], frame["label"], frame["score"], k)
        pooled = {n: v for n, v in m.items() if not n.endswith("_per_day")}
        alerts = sum(r["alerts"] or 0 for r in per_day)
        hits = sum(r["alerts_with_fraud"] or 0 for r in per_day)
        pooled.update(alerts=alerts, alerts_with_fraud=hits, alert_precision=hits / alerts if alerts else None)
    return {"days": [d.isoformat() for d in days], "k": k, "per_day": per_day, "pooled": pooled, "missing": missing}


def drift_section(lake: Lake, day: date, model: dict) -> dict:
    """PSI of D's scores and inputs against the champion's training data (``jobs.monitoring``)."""
    from jobs.common.schema import FEATURE_SCHEMA, MODEL_INPUTS
    from jobs.monitoring import drift
    from jobs.torch.registry import Registry

    version = (model.get("champion") or {}).get("version")
    if version is None:
        return {"status": "no champion as of D: nothing to compare with"}
    if not lake.is_published(Dataset.SCORES, day) or not lake.is_published(Dataset.FEATURES, day):
        return {"status": "D is not scored: no drift figures", "version": version}
    reference = Registry(lake).reference(version)
    if reference is None:
        return {"status": f"the champion {version} has no drift reference (trained before references were kept): "
                          f"python -m jobs.torch.registry reference {version} stores it",
                "version": version}
    features = lake.read_table(Dataset.FEATURES, day, schema=FEATURE_SCHEMA, columns=list(MODEL_INPUTS))
    inputs = {name: features.column(name).to_numpy(zero_copy_only=False).astype(np.float64) for name in MODEL_INPUTS}
    scores = day_scores(lake, day)
    return {"status": "compared with the champion's training data", "version": version,
            **drift(reference, inputs, scores)}


def top_alerts(lake: Lake, day: date, n: int = TOP_ALERTS, per_card: int = 20) -> list[dict]:
    """The first ``n`` alerts of D, each with the inputs that drove its top score (as stored with the
    alerts) and the card's transactions of the day with their scores, highest first."""
    if not lake.is_published(Dataset.ALERTS, day):
        return []
    rows = sorted(lake.read_table(Dataset.ALERTS, day).to_pylist(), key=lambda r: r["rank"])[:n]
    if not rows or not lake.is_published(Dataset.SCORES, day):
        return rows
    scores = lake.read_table(Dataset.SCORES, day, columns=["TRANSACTION_ID", "CUSTOMER_ID", "TX_DATETIME", "score"])
    card = scores.column("CUSTOMER_ID").to_numpy()
    for row in rows:
        mine = np.flatnonzero(card == row["CUSTOMER_ID"])
        table = scores.take(mine).sort_by([("score", "descending"), ("TRANSACTION_ID", "ascending")])
        row["transactions"] = [
            {"TRANSACTION_ID": t["TRANSACTION_ID"], "TX_DATETIME": str(t["TX_DATETIME"]), "score": t["score"]}
            for t in table.slice(0, per_card).to_pylist()]
    return rows


def day_scores(lake: Lake, day: date) -> np.ndarray:
    if not lake.is_published(Dataset.SCORES, day):
        return np.empty(0)
    return lake.read_table(Dataset.SCORES, day, columns=["score"]).column("score").to_numpy()


# --- plots -----------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def plots(report: dict, frame: dict[str, np.ndarray], scores: np.ndarray, day: date, cal: Calendar) -> dict[str, bytes]:
    """The report's figures: performance over time, precision-recall, scores and inputs against the
    training data, volume and quarantine over time. Every time axis marks D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    from jobs.monitoring import PSI_DRIFT, PSI_WATCH

    out = {}
    perf, drift, trend = report["matured_performance"], report["drift"], report["volume_trend"]
    k = perf["k"]
    d_mark = np.datetime64(day)

    def mark_day(ax, label: str = "D") -> None:
        ax.axvline(d_mark, color="black", linestyle="--", linewidth=1)
        ax.annotate(label, (d_mark, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
        ax.tick_params(axis="x", labelsize=7, rotation=45)

    fig, ax = plt.subplots(figsize=(8, 3.6))
    if perf["per_day"]:
        x = np.array([r["date"] for r in perf["per_day"]], dtype="datetime64[D]")
        for key, name, style in (("auc_roc", "AUC ROC", "o-"), ("average_precision", "average precision", "o-"),
                                 (f"card_precision@{k}", f"Card Precision@{k}", "o-"),
                                 ("alert_precision", "alert list precision", "s--")):
            y = np.array([np.nan if r.get(key) is None else r[key] for r in perf["per_day"]], dtype=float)
            ax.plot(x, y, style, markersize=3, label=name)
        not_matured = np.datetime64(day) - np.timedelta64(cal.last_labelled_offset - 1, "D")
        ax.axvspan(not_matured, d_mark, color="0.9", label="labels not yet matured")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
    else:
        ax.text(0.5, 0.5, "no matured scored days yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Performance by scored day, labels matured ({len(perf['per_day'])} days)")
    ax.set_ylabel("metric (0-1)")
    ax.set_xlabel("scored day")
    mark_day(ax)
    out["performance.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    if frame["label"].size and frame["label"].max() > 0:
        precision, recall, _ = precision_recall_curve(frame["label"], frame["score"])
        ax.plot(recall, precision)
        ax.set_title(f"Precision-recall, {len(perf['days'])} matured days")
    else:
        ax.text(0.5, 0.5, "no matured scored days yet", ha="center", va="center")
        ax.set_title("Precision-recall")
    ax.set_xlabel("recall (share of frauds caught)")
    ax.set_ylabel("precision (share of flags that are fraud)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    out["pr_curve.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    if drift.get("score") and drift["score"]["psi"] is not None:
        ref, got = drift["score"]["reference_shares"], drift["score"]["day_shares"]
        pos = np.arange(len(ref))
        ax.bar(pos - 0.2, ref, width=0.4, label="champion's training data")
        ax.bar(pos + 0.2, got, width=0.4, label=str(day))
        ax.set_xticks(pos, [f"{i + 1}" for i in pos], fontsize=7)
        ax.set_xlabel("score bin (deciles of the training scores)")
        ax.set_ylabel("share of transactions")
        ax.legend(fontsize=7)
        ax.set_title(f"Scores of {day}: PSI {drift['score']['psi']:.3f} ({drift['score']['verdict']})", fontsize=9)
    elif scores.size:
        ax.hist(scores, bins=50, log=True)
        ax.set_xlabel("score (fraud probability)")
        ax.set_ylabel("transactions (log)")
        ax.set_title(f"Scores of {day}")
    else:
        ax.text(0.5, 0.5, "day not scored", ha="center", va="center")
        ax.set_title(f"Scores of {day}")
    out["score_hist.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.2))
    shown = [r for r in drift.get("inputs", []) if r["verdict"] != "follows the calendar"]
    if shown:
        rows = shown[::-1]
        values = [r["psi"] or 0.0 for r in rows]
        colors = ["tab:red" if v > PSI_DRIFT else "tab:orange" if v > PSI_WATCH else "tab:green" for v in values]
        ax.barh([r["input"] for r in rows], values, color=colors)
        ax.axvline(PSI_WATCH, color="tab:orange", linestyle=":", linewidth=1)
        ax.axvline(PSI_DRIFT, color="tab:red", linestyle="--", linewidth=1, label=f"drift threshold {PSI_DRIFT}")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlim(0, max(0.35, 1.15 * max(values)))
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, drift.get("status", "no drift figures"), ha="center", va="center", wrap=True, fontsize=8)
    ax.set_xlabel("population stability index vs the champion's training data")
    ax.set_title(f"Input drift on {day} (the weekend flag follows the calendar: left out)", fontsize=9)
    out["input_drift.png"] = _png(fig)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 4.8), sharex=True)
    if trend:
        x = np.array([t["date"] for t in trend], dtype="datetime64[D]")
        top.bar(x, [t["clean"] or 0 for t in trend], color="tab:blue")
        absent = [xi for xi, t in zip(x, trend, strict=True) if t["clean"] is None]
        for xi in absent:
            top.axvspan(xi - np.timedelta64(12, "h"), xi + np.timedelta64(12, "h"), color="tab:red", alpha=0.2)
        reasons = sorted({r for t in trend for r, n in t["quarantined_by_reason"].items() if n})
        bottom_acc = np.zeros(len(trend))
        for reason in reasons:
            y = np.array([t["quarantined_by_reason"].get(reason, 0) for t in trend], dtype=float)
            bottom.bar(x, y, bottom=bottom_acc, label=reason)
            bottom_acc += y
        if reasons:
            bottom.legend(fontsize=6, ncol=3, loc="upper left")
        else:
            bottom.text(0.5, 0.5, "nothing quarantined on these days", ha="center", va="center",
                        transform=bottom.transAxes)
            bottom.set_yticks([])
    top.set_title("Daily volume (clean rows; red: no clean partition) and quarantined rows by reason")
    top.set_ylabel("clean rows")
    bottom.set_ylabel("quarantined rows")
    bottom.set_xlabel("day")
    mark_day(top)
    mark_day(bottom)
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


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    data = images.get(name)
    if data is None:
        return ""
    stem = name.rsplit(".", 1)[0].replace("_", "-")
    return (f'<img class="plot" id="plot-{stem}" alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _performance_table(perf: dict) -> str:
    k = perf["k"]
    cols = [("n_transactions", "transactions"), ("n_fraud", "frauds"), ("auc_roc", "AUC ROC"),
            ("average_precision", "AP"), (f"card_precision@{k}", f"CP@{k}"), ("alerts", "alerts"),
            ("alerts_with_fraud", "alerts with fraud"), ("alert_precision", "alert precision")]
    head = "<tr><th>scored day</th>" + "".join(f"<th>{html.escape(t)}</th>" for _, t in cols) + "</tr>"
    body = "".join(f'<tr data-day="{r["date"]}"><td>{r["date"]}</td>'
                   + "".join(f"<td>{_fmt(r.get(c))}</td>" for c, _ in cols) + "</tr>" for r in perf["per_day"])
    if perf["pooled"]:
        body += '<tr class="pooled"><th>all days (CP: a card caught on an earlier day is not counted again)</th>' + "".join(
            f"<th>{_fmt(perf['pooled'].get(c))}</th>" for c, _ in cols) + "</tr>"
    return f'<table id="performance-by-day">{head}{body}</table>'


def _alerts_html(alerts: list[dict]) -> str:
    if not alerts:
        return "<p>No alert list published for D.</p>"
    parts = []
    for a in alerts:
        why = a.get("attributions")
        if why:
            top = ", ".join(f"{html.escape(e['input'])} = {e['value']:.4g} ({e['attribution']:+.3f})" for e in why[:4])
            reason = f"top transaction {a.get('top_transaction_id')}; inputs that drove it (log-odds vs an average " \
                     f"transaction): {top}"
        else:
            reason = "why: not recorded (scored before attributions were kept; rescoring the day adds them)"
        txs = _table(a.get("transactions") or [], ["TRANSACTION_ID", "TX_DATETIME", "score"])
        parts.append(f'<details class="alert" data-card="{a["CUSTOMER_ID"]}"><summary>#{a["rank"]} card '
                     f'{a["CUSTOMER_ID"]}: score {_fmt(a["score"])}, {a["n_tx"]} transactions. '
                     f'{reason}</summary>{txs}</details>')
    return "".join(parts)


def render_html(report: dict, images: dict[str, bytes]) -> str:
    c, q, m = report["counts"], report["quality"], report["model"]
    perf, drift = report["matured_performance"], report["drift"]
    k = perf["k"]
    pooled = perf["pooled"] or {}
    quality = "n/a" if q is None else ("passed" if q.get("passed") else "FAILED: " + "; ".join(q.get("failures", [])))
    champion = m.get("champion") or {}
    lineage_ = m.get("lineage") or {}
    promoted = lineage_.get("promoted_by") or {}
    train_m = lineage_.get("training_metrics") or {}
    missing = perf.get("missing") or []
    drifted = drift.get("drifted_inputs") or []
    score_drift = drift.get("score") or {}
    glance = (f"{len(perf['per_day'])} matured scored days ({perf['days'][0]} .. {perf['days'][-1]}): AUC "
              f"{_fmt(pooled.get('auc_roc'))}, AP {_fmt(pooled.get('average_precision'))}, CP@{k} "
              f"{_fmt(pooled.get(f'card_precision@{k}'))}, alert precision {_pct(pooled.get('alert_precision'))}"
              if perf["per_day"] else "no scored day has matured labels yet")
    drift_line = (f"score PSI {_fmt(score_drift.get('psi'))} ({score_drift.get('verdict')}); inputs drifted: "
                  f"{', '.join(drifted) or 'none'}" if score_drift else html.escape(drift.get("status", "")))
    drift_rows = [{"input": r["input"], "psi": r["psi"], "verdict": r["verdict"]} for r in drift.get("inputs", [])]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Fraud report {report['date']}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1150px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{margin:0.5em;border:1px solid #eee}}
.glance{{background:#f4f6fa;padding:0.6em 1em;border-left:4px solid #4a6fa5}}details{{margin:0.3em 0}}</style></head><body>
<h1>Nightly fraud report: {report['date']}</h1>
<div class="glance" id="at-a-glance"><p><b>Performance:</b> {html.escape(glance)}</p>
<p><b>Missing scored days:</b> {len(missing)} of {len(perf['days']) + len(missing)} in the matured window.
<b>Drift:</b> {drift_line}. <b>Data quality:</b> {html.escape(quality)}.</p></div>
<section id="performance"><h2>Performance over time (scored days D-37 .. D-8, labels matured)</h2>
{_img(images, "performance.png", "performance by matured scored day")}{_img(images, "pr_curve.png", "precision-recall curve")}
{_performance_table(perf)}
<h3>Scored days missing from the window</h3>{_table(missing, ["date", "reason"]) if missing else "<p>none</p>"}</section>
<section id="drift"><h2>Drift against the champion's training data</h2>
<p>{html.escape(drift.get("status", "")[:1].upper() + drift.get("status", "")[1:])}. Population stability index per input; above
{drift.get("threshold", 0.25)} an input is flagged as drifted, above {drift.get("watch", 0.1)} it moved.</p>
{_img(images, "score_hist.png", "score distribution against the training data")}{_img(images, "input_drift.png", "input drift")}
{_table(drift_rows, ["input", "psi", "verdict"]) if drift_rows else ""}</section>
<section id="day"><h2>The day</h2>{_table([c], ["rows_in", "clean", "quarantined", "duplicates_collapsed", "label_updates", "features", "scored", "alerts"])}
<h3>Quarantined by reason</h3>{_table(report["quarantine"], ["reason", "rows", "share"]) if report["quarantine"] else "<p>nothing quarantined</p>"}
<h3>Steps</h3>{_table(report["steps"], ["step", "status", "reason"])}
<p>Data quality: {html.escape(quality)}</p>
{_img(images, "volume.png", "daily volume and quarantine by reason")}</section>
<section id="model"><h2>Champion and lineage</h2><p>{html.escape(m["status"])}; champion {_fmt(champion.get("version"))}
({_fmt(champion.get("model"))}), trained for {_fmt(champion.get("train_day"))} on {_fmt(champion.get("window_start"))} ..
{_fmt(champion.get("window_end"))}, champion since {_fmt(champion.get("champion_since"))} ({_fmt(champion.get("source"))}).
Latest training day: {_fmt(m.get("latest_training_day"))}.</p>
<p>Decision that made it champion: {_fmt(promoted.get("outcome"))}, {_fmt(promoted.get("reason"))}
(validation week {_fmt(", ".join(promoted.get("validation_week") or []) or None)}).</p>
{_table([{"model": "champion (candidate then)", **(promoted.get("candidate") or {})},
         {"model": f"previous champion {promoted.get('previous_champion') or ''}", **(promoted.get("previous_champion_metrics") or {})}],
        ["model", "auc_roc", "average_precision", f"card_precision@{k}", "n_fraud"]) if promoted.get("candidate") else ""}
<p>On its training window: {_fmt(train_m.get("rows"))} rows, {_fmt(train_m.get("frauds"))} frauds, AUC {_fmt(train_m.get("auc_roc"))},
AP {_fmt(train_m.get("average_precision"))}.</p></section>
<section id="alerts"><h2>Top alerts of D and why</h2>{_alerts_html(report["top_alerts"])}</section>
</body></html>
"""


# --- entry point -----------------------------------------------------------------------------------
def build_report(lake: Lake, day: date, k: int | None = None) -> tuple[dict, dict[str, bytes]]:
    cal = calendar()
    k = k or settings().alert_k
    days, frame, missing = matured_frame(lake, day, cal)
    scores = day_scores(lake, day)
    day_counts = counts(lake, day)
    model = model_section(lake, day, cal)
    score_run = lake.latest_run_record("score", day)
    report = {
        "date": day.isoformat(),
        "counts": day_counts,
        "quarantine": quarantine_table(day_counts),
        "steps": step_status(lake, day),
        "quality": lake.latest_run_record("quality_gate", day),
        "model": model,
        "scoring": {
            "status": "scored" if scores.size or lake.is_published(Dataset.SCORES, day) else "not scored",
            "reason": None if lake.is_published(Dataset.SCORES, day) else (score_run or {}).get("reason"),
        },
        "matured_performance": matured_performance(lake, days, frame, missing, cal.first_date, k),
        "drift": drift_section(lake, day, model),
        "top_alerts": top_alerts(lake, day),
        "volume_trend": volume_trend(lake, day, cal),
    }
    if report["quality"]:
        report["quality"] = {key: v for key, v in report["quality"].items() if key != "date"}
    return report, plots(report, frame, scores, day, cal)


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
