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


def _build(lake, monkeypatch, unscored: tuple[date, ...] = ()):
    monkeypatch.setenv("FRAUD_FIRST_DATE", FIRST.isoformat())
    monkeypatch.setenv("FRAUD_ALERT_K", "5")
    rng = np.random.default_rng(0)
    for i in range((D - FIRST).days + 1):
        day = FIRST + timedelta(days=i)
        clean = _clean(day, 100, rng)
        lake.write_table(Dataset.CLEAN, day, clean, stats={"rows_in": 102, "clean": 100, "quarantined_total": 2,
                                                            "quarantined": {"negative_amount": 2}})  # fmt: skip
        if day >= date(2018, 4, 10) and day not in unscored:
            label = clean.column("TX_FRAUD").to_numpy()
            score = np.clip(label * 0.6 + rng.uniform(0, 0.5, len(label)), 0, 1)
            scores = pa.table({"TRANSACTION_ID": clean.column("TRANSACTION_ID"), "CUSTOMER_ID": clean.column("CUSTOMER_ID"),
                               "TX_DATETIME": clean.column("TX_DATETIME"), "score": score,
                               "model_version": ["v1"] * len(label)}, schema=SCORES_SCHEMA)  # fmt: skip
            lake.write_table(Dataset.SCORES, day, scores)
            # alert lists written before attributions were kept: their first five columns only
            alerts = pa.table({"CUSTOMER_ID": [3, 1], "score": [0.9, 0.8], "n_tx": [2, 1], "rank": [1, 2],
                               "model_version": ["v1", "v1"]}, schema=pa.schema(list(ALERTS_SCHEMA)[:5]))  # fmt: skip
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
    assert {"report.json", "report.html", "performance.png", "pr_curve.png", "score_hist.png", "input_drift.png",
            "volume.png"} <= set(files)
    page = lake.read_bytes(files["report.html"]).decode()
    assert 'id="performance-by-day"' in page and page.count('class="plot"') == len(images_of(files)) == 5
    assert page.count("<tr data-day=") == 3 and "not recorded (scored before attributions" in page
    assert lake.read_bytes(files["pr_curve.png"])[:4] == b"\x89PNG"


def images_of(files: dict) -> list[str]:
    return [name for name in files if name.endswith(".png")]


def test_alert_precision_and_missing_days_are_per_day(lake, monkeypatch):
    """Each matured day carries the precision of the alert list published that day; a day of the
    window without scores is named with its reason, not skipped."""
    from jobs.report import build_report

    gap = date(2018, 4, 11)
    _build(lake, monkeypatch, unscored=(gap,))
    lake.abandon(Dataset.SCORES, gap, "scores lost in a test")
    report, _ = build_report(lake, D)
    perf = report["matured_performance"]
    assert gap.isoformat() not in perf["days"]
    assert {"date": gap.isoformat(), "reason": "abandoned: scores lost in a test"} in perf["missing"]
    for row in perf["per_day"]:
        d = date.fromisoformat(row["date"])
        clean = lake.read_table(Dataset.CLEAN, d).to_pandas()
        fraud_cards = set(clean.loc[clean.TX_FRAUD == 1, "CUSTOMER_ID"])
        hits = sum(card in fraud_cards for card in (3, 1))
        assert (row["alerts"], row["alerts_with_fraud"]) == (2, hits) and row["alert_precision"] == hits / 2
    assert report["quarantine"] == [{"reason": "negative_amount", "rows": 2, "share": 2 / 102}]


def test_drift_is_measured_against_the_champions_training_data(lake, monkeypatch):
    """With a champion whose drift reference was taken on other data, the day's inputs and scores
    are compared with it: a shifted input is flagged, an unchanged one is not."""
    from jobs.common.schema import MODEL_INPUTS
    from jobs.monitoring import PSI_DRIFT, drift_reference
    from jobs.report import build_report, render_html
    from jobs.torch import registry as R
    from jobs.torch.synthetic import synthetic_features

    _build(lake, monkeypatch)
    features = synthetic_features(D, 2_000, seed=3)
    lake.write_table(Dataset.FEATURES, D, features.drop_columns(["TX_FRAUD"]))
    x = np.stack([features.column(n).to_numpy().astype(np.float64) for n in MODEL_INPUTS], axis=1)
    x_ref = x.copy()
    x_ref[:, 0] = x_ref[:, 0] * 3 + 50  # the training data had other amounts
    rng = np.random.default_rng(0)
    reference = drift_reference(x_ref, MODEL_INPUTS, rng.uniform(0, 0.5, 5_000))
    registry = R.Registry(lake)
    registry.register_version("v1", {R.REFERENCE: R.canonical_json(reference)},
                              {"model": "mlp", "train_day": "2018-04-08", "window_start": "2018-04-01",
                               "window_end": "2018-04-07"})
    registry.add_event("promote", "v1", date(2018, 4, 9), "a champion for the report")
    report, images = build_report(lake, D)
    drift = report["drift"]
    assert drift["version"] == "v1" and drift["threshold"] == PSI_DRIFT
    by_input = {r["input"]: r for r in drift["inputs"]}
    assert by_input["TX_AMOUNT"]["psi"] > PSI_DRIFT and "TX_AMOUNT" in drift["drifted_inputs"]
    assert by_input[MODEL_INPUTS[3]]["psi"] < 0.05 and by_input[MODEL_INPUTS[3]]["verdict"] == "stable"
    assert drift["score"]["psi"] is not None and len(drift["score"]["day_shares"]) == 10
    assert report["model"]["lineage"]["training_window"] == ["2018-04-01", "2018-04-07"]
    assert "TX_AMOUNT" in render_html(report, images)
    # D published with no scores at all: the score has no index, and the report still renders
    lake.write_table(Dataset.SCORES, D, SCORES_SCHEMA.empty_table())
    report, images = build_report(lake, D)
    assert report["drift"]["score"]["psi"] is None and report["drift"]["score"]["verdict"] == "n/a"
    assert images["score_hist.png"][:4] == b"\x89PNG" and "Drift against" in render_html(report, images)


def test_psi_reads_zero_for_the_same_population_and_grows_with_a_shift():
    from jobs.monitoring import cut_points, psi, shares

    rng = np.random.default_rng(1)
    ref = rng.normal(size=50_000)
    cuts = cut_points(ref)
    assert len(cuts) == 9
    base = shares(ref, cuts)
    assert psi(base, shares(rng.normal(size=50_000), cuts)) < 0.01
    small, large = (psi(base, shares(rng.normal(loc=m, size=50_000), cuts)) for m in (0.2, 1.0))
    assert 0.01 < small < 0.1 < 0.25 < large
    flag = cut_points(np.r_[np.zeros(90), np.ones(10)])  # a 0/1 input: equal cut points merged
    assert flag == sorted(set(flag)) and len(flag) <= 2


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
    assert report["model"]["champion"] is None and report["drift"]["status"].startswith("no champion")
    assert set(images) == {"performance.png", "pr_curve.png", "score_hist.png", "input_drift.png", "volume.png"}
    assert report["matured_performance"]["missing"] == []  # no scored day can have matured yet
