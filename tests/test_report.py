"""The nightly report on a small hand-made lake: JSON figures, the page and its plots, published atomically."""

from __future__ import annotations

import posixpath
from datetime import date, datetime, timedelta

import numpy as np
import pyarrow as pa

from jobs.common.lake import Dataset
from jobs.common.schema import ALERTS_SCHEMA, CLEAN_SCHEMA, SCORES_SCHEMA

FIRST = date(2018, 4, 1)
D = date(2018, 4, 20)


def _clean(day: date, n: int, rng) -> pa.Table:
    ids = np.arange(n) + (day - FIRST).days * 10_000
    return pa.table(
        {
            "TRANSACTION_ID": ids,
            "TX_DATETIME": [datetime.combine(day, datetime.min.time()) + timedelta(seconds=int(i)) for i in range(n)],
            "CUSTOMER_ID": rng.integers(0, 50, n),
            "TERMINAL_ID": rng.integers(0, 80, n),
            "TX_AMOUNT": rng.uniform(1, 100, n),
            "TX_FRAUD": (rng.uniform(size=n) < 0.1).astype(np.int32),
            "TX_FRAUD_SCENARIO": np.zeros(n, dtype=np.int32),
        },
        schema=CLEAN_SCHEMA,
    )


def _build(lake, monkeypatch):
    monkeypatch.setenv("FRAUD_FIRST_DATE", FIRST.isoformat())
    monkeypatch.setenv("FRAUD_ALERT_K", "5")
    rng = np.random.default_rng(0)
    for i in range((D - FIRST).days + 1):
        day = FIRST + timedelta(days=i)
        clean = _clean(day, 100, rng)
        lake.write_table(Dataset.CLEAN, day, clean, stats={"rows_in": 102, "clean": 100, "quarantined_total": 2,
                                                            "quarantined": {"negative_amount": 2}})  # fmt: skip
        if day >= date(2018, 4, 10):
            label = clean.column("TX_FRAUD").to_numpy()
            score = np.clip(label * 0.6 + rng.uniform(0, 0.5, len(label)), 0, 1)
            scores = pa.table({"TRANSACTION_ID": clean.column("TRANSACTION_ID"), "CUSTOMER_ID": clean.column("CUSTOMER_ID"),
                               "TX_DATETIME": clean.column("TX_DATETIME"), "score": score,
                               "model_version": ["v1"] * len(label)}, schema=SCORES_SCHEMA)  # fmt: skip
            lake.write_table(Dataset.SCORES, day, scores)
            alerts = pa.table({"CUSTOMER_ID": [3, 1], "score": [0.9, 0.8], "n_tx": [2, 1], "rank": [1, 2],
                               "model_version": ["v1", "v1"]}, schema=ALERTS_SCHEMA)  # fmt: skip
            lake.write_table(Dataset.ALERTS, day, alerts)


def test_report_figures_and_page(lake, monkeypatch):
    from jobs.report import main, read_report, report_files

    _build(lake, monkeypatch)
    assert main(["--lake", lake.uri, "--date", D.isoformat()]) == 0
    report = read_report(lake, D)
    assert report["counts"]["clean"] == 100 and report["counts"]["quarantined"] == 2
    assert report["counts"]["scored"] == 100 and report["counts"]["alerts"] == 2
    perf = report["matured_performance"]
    assert perf["days"] == [(date(2018, 4, 10) + timedelta(days=i)).isoformat() for i in range(3)]  # 04-10 .. D-8
    assert 0.5 < perf["pooled"]["auc_roc"] <= 1 and perf["pooled"]["card_precision@5"] >= 0
    assert report["top_alerts"][0]["CUSTOMER_ID"] == 3
    assert len(report["volume_trend"]) == (D - FIRST).days + 1
    files = report_files(lake, D)
    assert {"report.json", "report.html", "pr_curve.png", "score_hist.png", "volume.png"} <= set(files)
    page = lake.read_bytes(files["report.html"]).decode()
    assert "Matured-label performance" in page and page.count("data:image/png;base64") == 3
    assert lake.read_bytes(files["pr_curve.png"])[:4] == b"\x89PNG"


def test_report_is_deterministic_and_rerun_replaces_it(lake, monkeypatch):
    from jobs.report import main, read_report, report_files

    _build(lake, monkeypatch)
    main(["--lake", lake.uri, "--date", D.isoformat()])
    first, first_files = read_report(lake, D), report_files(lake, D)
    main(["--lake", lake.uri, "--date", D.isoformat()])
    assert read_report(lake, D) == first
    assert report_files(lake, D) != first_files  # a new attempt, published whole
    # the superseded attempt is marked, and kept for the grace period a reader may still need
    superseded = posixpath.dirname(first_files["report.json"])
    assert lake.exists(posixpath.join(superseded, "_SUPERSEDED"))


def test_report_before_any_score(lake, monkeypatch):
    from jobs.report import build_report

    monkeypatch.setenv("FRAUD_FIRST_DATE", FIRST.isoformat())
    lake.write_table(Dataset.CLEAN, FIRST, _clean(FIRST, 10, np.random.default_rng(1)))
    report, images = build_report(lake, FIRST)
    assert report["scoring"]["status"] == "not scored" and report["matured_performance"]["pooled"] is None
    assert report["model"]["champion"] is None and set(images) == {"pr_curve.png", "score_hist.png", "volume.png"}
