"""The reports in the UI, in a real headless Chromium: the list, a report whose performance trend
holds more than two weeks of matured days with its plots loaded, and the report task's link that
opens it.

The lake holds 24 scored days (2018-04-02 .. 04-25) with their clean rows and labels and alert
lists, and D = 2018-05-03 is scored too; the report of D looks back on D-37 .. D-8, so on all 24. The page is read as a
person sees it: rows counted in the rendered table, images checked as decoded by the browser.
Screenshots: ``test-artifacts/browser/test_browser_reports/``.
"""

from __future__ import annotations

import json
import re
from datetime import date, datetime, timedelta

import numpy as np
import pytest
from browser import api_server

pytestmark = pytest.mark.slow

FIRST = date(2018, 4, 1)
SCORED = [FIRST + timedelta(days=i) for i in range(1, 25)]  # 04-02 .. 04-25
D = date(2018, 5, 3)
# no training day before D (a run's score step skips at once: no champion), no retries
ENV = {"FRAUD_FIRST_DATE": FIRST.isoformat(), "FRAUD_ALERT_K": "5", "FRAUD_TRAIN_EVERY_DAYS": "60", "FRAUD_RETRIES": "0"}
PLOTS = 5


def expect(target):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def publish_history(lake) -> None:
    """Clean days 04-01 .. D, each with labels inline; scores and alert lists of the scored days
    (scores that rank the frauds high, so the figures are far from chance)."""
    import pyarrow as pa

    from jobs.common.datasets import Dataset
    from jobs.common.schema import ALERTS_SCHEMA, CLEAN_SCHEMA, SCORES_SCHEMA

    rng = np.random.default_rng(7)
    n = 200
    for i in range((D - FIRST).days + 1):
        day = FIRST + timedelta(days=i)
        start = datetime.combine(day, datetime.min.time())
        label = (rng.uniform(size=n) < 0.08).astype(np.int32)
        clean = pa.table({
            "TRANSACTION_ID": np.arange(n) + i * 10_000,
            "TX_DATETIME": [start + timedelta(seconds=300 * j) for j in range(n)],
            "CUSTOMER_ID": rng.integers(0, 60, n), "TERMINAL_ID": rng.integers(0, 90, n),
            "TX_AMOUNT": rng.uniform(1, 200, n), "TX_FRAUD": label, "TX_FRAUD_SCENARIO": np.zeros(n, np.int32),
        }, schema=CLEAN_SCHEMA)  # fmt: skip
        lake.write_table(Dataset.CLEAN, day, clean, stats={"rows_in": n + 3, "clean": n, "quarantined_total": 3,
                                                           "quarantined": {"negative_amount": 2, "ragged_line": 1}})
        if day not in SCORED and day != D:  # D is scored too (its alert list), its labels have not matured
            continue
        score = np.clip(0.55 * label + rng.uniform(0, 0.5, n), 0, 1)
        scores = pa.table({"TRANSACTION_ID": clean.column("TRANSACTION_ID"), "CUSTOMER_ID": clean.column("CUSTOMER_ID"),
                           "TX_DATETIME": clean.column("TX_DATETIME"), "score": score,
                           "model_version": ["v-test"] * n}, schema=SCORES_SCHEMA)  # fmt: skip
        lake.write_table(Dataset.SCORES, day, scores)
        from jobs.torch.score import alerts_table

        def why(rows, amount=clean.column("TX_AMOUNT").to_numpy()):  # as stored by scoring: input, value, effect
            return [[{"input": "TX_AMOUNT", "value": float(amount[r]), "attribution": 1.25}] for r in rows]

        lake.write_table(Dataset.ALERTS, day, alerts_table(scores, 5, why).cast(ALERTS_SCHEMA))


@pytest.fixture(scope="module")
def airflow_ui(tmp_path_factory):
    """The API server and DAG processor on a lake with the history above and the report of D."""
    from jobs.common.lake import Lake
    from jobs.report import main as report_main

    home = tmp_path_factory.mktemp("reports-in-browser")
    lake = Lake.from_uri((home / "lake").as_uri())
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        publish_history(lake)
        assert report_main(["--lake", lake.uri, "--date", D.isoformat()]) == 0
    with api_server(home / "airflow", lake.uri, ENV) as af:
        yield af


def check_report_page(page, shots) -> int:
    """The rendered report of D: its trend table's days, every plot decoded; returns the day count."""
    expect(page.get_by_role("heading", name=f"Nightly fraud report: {D}")).to_be_visible()
    rows = page.locator("table#performance-by-day tr[data-day]")
    days = [rows.nth(i).get_attribute("data-day") for i in range(rows.count())]
    assert len(days) >= 14 and days == sorted(days), days
    assert days[0] == SCORED[0].isoformat() and days[-1] == SCORED[-1].isoformat()
    for i in (0, len(days) - 1):  # each row shows figures: an AUC ROC between 0.5 and 1
        auc = float(rows.nth(i).locator("td").nth(3).inner_text())
        assert 0.5 < auc <= 1.0
    plots = page.locator("img.plot")
    assert plots.count() == PLOTS
    decoded = plots.evaluate_all("imgs => imgs.map(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100)")
    assert decoded == [True] * PLOTS
    shots("report-top")
    plots.first.scroll_into_view_if_needed()
    shots("performance-plot", plots.first)
    page.locator("#drift").scroll_into_view_if_needed()
    shots("drift-section")
    return len(days)


def test_the_reports_page_lists_the_day_and_renders_its_trend_with_plots(logged_in_page, airflow_ui, screenshot):
    page = logged_in_page
    page.goto(f"{airflow_ui.url}/fraud-reports/")
    link = page.get_by_role("link", name=D.isoformat(), exact=True)
    expect(link).to_be_visible()
    screenshot("list")
    link.click()
    expect(page).to_have_url(re.compile(rf"/fraud-reports/{D}$"))
    assert check_report_page(page, screenshot) == len(SCORED)
    # the bar the UI adds above the stored page leads on to the day's alert list
    page.locator("#fraud-report-bar").get_by_role("link", name=re.compile("alert", re.I)).first.click()
    expect(page).to_have_url(re.compile(rf"/fraud-reports/{D}/alerts$"))
    expect(page.get_by_text("TX_AMOUNT").first).to_be_visible()
    screenshot("alert-list")


def test_the_menu_entry_opens_the_reports_inside_the_ui(logged_in_page, airflow_ui, screenshot):
    page = logged_in_page
    page.goto(f"{airflow_ui.url}/")
    page.get_by_role("link", name="Fraud reports").or_(page.get_by_role("button", name="Fraud reports")).first.click()
    frame = page.frame_locator("iframe").first
    expect(frame.get_by_role("link", name=D.isoformat(), exact=True)).to_be_visible()
    screenshot("menu-entry")


def test_the_report_task_links_to_its_day_s_report(logged_in_page, airflow_ui, screenshot):
    """A run of D (its steps before score marked done, as a run that reached the report): the report
    task's "Report" link in the task's page opens the day's report, rendered with its trend."""
    done = airflow_ui.airflow("dags", "test", "fraud_nightly", "--conf", json.dumps({"date": D.isoformat()}),
                              "--mark-success-pattern", r"(?!(plan|score|report)$).*", check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = next(r for r in airflow_ui.dag_runs("fraud_nightly") if (r.get("conf") or {}).get("date") == D.isoformat())
    states = {t["task_id"]: t["state"] for t in airflow_ui.task_instances("fraud_nightly", run["dag_run_id"])}
    assert states["score"] == "skipped" and states["report"] == "success", states
    page = logged_in_page
    page.goto(f"{airflow_ui.url}/dags/fraud_nightly/runs/{run['dag_run_id']}/tasks/report/details")
    link = page.get_by_role("link", name="Report", exact=True).or_(page.get_by_role("button", name="Report", exact=True))
    expect(link.first).to_be_visible(timeout=30_000)
    screenshot("task-page")
    href = link.first.get_attribute("href") or ""
    assert href.endswith(f"/fraud-reports/{D}"), href
    link.first.click()  # the UI opens an extra link in a new tab, or in this one
    report = None
    for _ in range(120):
        report = next((p for p in page.context.pages if p.url.endswith(f"/fraud-reports/{D}")), None)
        if report is not None:
            break
        page.wait_for_timeout(250)
    assert report is not None, [p.url for p in page.context.pages]
    report.wait_for_load_state()
    from browser import Screenshots

    shots = Screenshots(report, screenshot.folder / "opened")
    assert check_report_page(report, shots) == len(SCORED)
    if report is not page:
        report.close()
