"""The nightly reports in the Airflow UI, served by a real API server from a lake of published reports:
login, the list, a report page with its bar, the alert list, refused paths, and the task links of a run."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from browser import api_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))
sys.path.insert(0, str(REPO / "plugins"))

FIRST = date(2018, 4, 1)
D1, D2 = date(2018, 4, 2), date(2018, 4, 3)  # reports published by the fixture
RUN_DAY = date(2018, 4, 4)  # reported by a run of the DAG in the test
NO_REPORT = date(2018, 4, 9)
ENV = {"FRAUD_FIRST_DATE": FIRST.isoformat(), "FRAUD_ALERT_K": "3"}
MARKER = "marker-" + secrets.token_hex(8)
CARDS = {D1: [11, 12, 13], D2: [21, 22]}
OTHER_CARD = 99  # scored, never alerted


def scores_and_alerts(day: date, cards: list[int]):
    """A scored day: three transactions per alerted card and two of a card that is not alerted; the
    alert list with the contract's columns and two newer ones (top transaction, attributions)."""
    import pyarrow as pa

    base = (day - FIRST).days * 1000
    rows = []
    for i, card in enumerate([*cards, OTHER_CARD]):
        for j in range(3 if card != OTHER_CARD else 2):
            score = 0.95 - 0.1 * i - 0.02 * j if card != OTHER_CARD else 0.01 + 0.001 * j
            rows.append({"TRANSACTION_ID": base + 10 * i + j, "CUSTOMER_ID": card,
                         "TX_DATETIME": datetime(day.year, day.month, day.day, 8 + j, 5 * i), "score": score,
                         "model_version": "v-test"})
    scores = pa.Table.from_pylist(rows, schema=pa.schema([
        ("TRANSACTION_ID", pa.int64()), ("CUSTOMER_ID", pa.int64()), ("TX_DATETIME", pa.timestamp("us")),
        ("score", pa.float64()), ("model_version", pa.string())]))
    attribution = pa.struct([("input", pa.string()), ("value", pa.float64()), ("attribution", pa.float64())])
    alerts = pa.Table.from_pylist([
        {"CUSTOMER_ID": card, "score": 0.95 - 0.1 * i, "n_tx": 3, "rank": i + 1, "model_version": "v-test",
         "top_transaction_id": base + 10 * i,
         "attributions": [{"input": "TX_AMOUNT", "value": 250.0 + i, "attribution": 1.5}]}
        for i, card in enumerate(cards)
    ], schema=pa.schema([("CUSTOMER_ID", pa.int64()), ("score", pa.float64()), ("n_tx", pa.int64()),
                         ("rank", pa.int32()), ("model_version", pa.string()), ("top_transaction_id", pa.int64()),
                         ("attributions", pa.list_(attribution))]))
    return scores, alerts


def build_lake(root: Path) -> dict:
    """Publish scores and alerts of D1 and D2 through the lake, then their reports with the report
    step's own code; record a stale count for D1 only. Returns what the tests compare with."""
    from jobs.common.datasets import Dataset
    from jobs.common.lake import Lake
    from jobs.report import build_report, report_files, write_report

    lake = Lake.from_uri(root.as_uri())
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ENV.items():
            mp.setenv(name, value)
        for day, cards in CARDS.items():
            scores, alerts = scores_and_alerts(day, cards)
            lake.write_table(Dataset.SCORES, day, scores)
            lake.write_table(Dataset.ALERTS, day, alerts)
            report, images = build_report(lake, day)
            write_report(lake, day, report, images)
    lake.write_run_record("report", D1, "test", {"date": D1.isoformat(), "stale_partitions": 3})
    stored = {day: {name: lake.read_bytes(path) for name, path in report_files(lake, day).items()} for day in CARDS}
    # what must never be served: a file beside the lake, one at its root, one in a report's folder
    # that its manifest does not name
    (root.parent / "outside.txt").write_text(MARKER)
    (root / "secret.txt").write_text(MARKER)
    Path(report_files(lake, D1)["report.html"]).with_name("stray.html").write_text(MARKER)
    return stored


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("reports-ui")
    stored = build_lake(home / "lake")
    with api_server(home / "airflow", (home / "lake").as_uri(), ENV) as af:
        yield af, stored


def get(af, path: str, token: str | None = None, accept: str | None = None) -> tuple[int, dict, bytes]:
    """GET ``path`` exactly as written (no normalisation of ``..`` or of percent-escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", af.port, timeout=60)
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if accept:
        headers["Accept"] = accept
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def token(server):
    return server[0].token()


PAGES = ["/fraud-reports/", f"/fraud-reports/{D1}", f"/fraud-reports/{D1}/report.json",
         f"/fraud-reports/{D1}/alerts", f"/fraud-reports/{D1}/files/volume.png"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PAGES)
def test_every_page_needs_a_login(server, path):
    af, _ = server
    status, _, body = get(af, path)
    assert status in (401, 403), body[:300]
    assert b"data:image/png" not in body and b"data-card" not in body and b"data-day" not in body
    status, _, _ = get(af, path, token="not-a-token")
    assert status in (401, 403)
    status, headers, body = get(af, path, accept="text/html,application/xhtml+xml")  # a browser without login
    assert status in (401, 403) and headers["content-type"].startswith("text/html")
    assert re.search(rb'href="[^"]*/auth/login', body), body[:500]


@pytest.mark.slow
def test_list_shows_each_reported_day_newest_first_with_its_stale_count(server, token):
    af, _ = server
    status, headers, body = get(af, "/fraud-reports/", token)
    assert status == 200, body[:500]
    page = body.decode()
    days = re.findall(r'<tr data-day="([0-9-]+)">', page)
    assert days.index(D2.isoformat()) < days.index(D1.isoformat())
    assert days == sorted(days, reverse=True)
    stale = dict(re.findall(r'<tr data-day="([0-9-]+)">.*?<td class="stale">([^<]*)</td>', page))
    assert stale[D1.isoformat()] == "3" and stale[D2.isoformat()] == "n/a"
    assert f'href="{D1}"' in page and f'href="{D1}/alerts"' in page  # relative: any base URL
    assert "default-src 'none'" in headers["content-security-policy"]


@pytest.mark.slow
def test_report_page_is_the_stored_page_with_a_bar(server, token):
    af, stored = server
    status, _, body = get(af, f"/fraud-reports/{D1}", token)
    assert status == 200, body[:500]
    page, original = body.decode(), stored[D1]["report.html"].decode()
    before, tag, after = re.split(r"(<body\b[^>]*>)", original, maxsplit=1)
    assert page.startswith(before + tag + '<nav id="fraud-report-bar"')
    assert page.endswith(after)  # the stored markup, whole and unchanged, plots included
    assert "data:image/png;base64" in after
    bar = page[len(before + tag):page.index("</nav>")]
    assert f'data-day="{D1}"' in bar and '<span class="stale">3</span>' in bar
    assert f'rel="next" href="./{D2}"' in bar and 'rel="prev"' not in bar
    assert 'href="./"' in bar and f'href="./{D1}/alerts"' in bar and f'href="./{D1}/report.json"' in bar
    status, _, body = get(af, f"/fraud-reports/{D2}", token)
    bar = body.decode().split("</nav>", 1)[0]
    assert f'rel="prev" href="./{D1}"' in bar and '<span class="stale">n/a</span>' in bar


@pytest.mark.slow
def test_report_json_and_plots_are_the_stored_files(server, token):
    af, stored = server
    status, headers, body = get(af, f"/fraud-reports/{D2}/report.json", token)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert body == stored[D2]["report.json"] and json.loads(body)["date"] == D2.isoformat()
    status, headers, body = get(af, f"/fraud-reports/{D2}/files/volume.png", token)
    assert status == 200 and headers["content-type"] == "image/png" and body == stored[D2]["volume.png"]


@pytest.mark.slow
def test_alert_list_shows_each_card_with_its_transactions(server, token):
    af, _ = server
    status, _, body = get(af, f"/fraud-reports/{D1}/alerts", token)
    assert status == 200, body[:500]
    page = body.decode()
    assert re.findall(r'<tr class="alert" data-card="(\d+)">', page) == [str(c) for c in CARDS[D1]]  # by rank
    header = re.search(r'<table id="alerts"><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th>([^<]*)</th>", header) == ["rank", "CUSTOMER_ID", "score", "n_tx", "model_version",
                                                      "top_transaction_id", "attributions"]
    assert "TX_AMOUNT" in page  # the newer columns are shown as they come
    blocks = dict(re.findall(r'<tr class="transactions" data-card="(\d+)"><td[^>]*>(.*?)</table></td></tr>', page, re.S))
    assert list(blocks) == [str(c) for c in CARDS[D1]]
    base = (D1 - FIRST).days * 1000
    for i, card in enumerate(CARDS[D1]):
        block = blocks[str(card)]
        ids = re.findall(r'data-transaction="(\d+)"', block)
        assert ids == [str(base + 10 * i + j) for j in range(3)]  # that card's, best score first
        assert f"{0.95 - 0.1 * i:.4f}" in block and f"{0.95 - 0.1 * i - 0.04:.4f}" in block
        assert f'<tr class="top" data-transaction="{base + 10 * i}">' in block  # the alert's top transaction
    assert f'data-card="{OTHER_CARD}"' not in page
    assert f'href="../{D1}"' in page and f'rel="next" href="../{D2}/alerts"' in page


BAD_PATHS = [
    "/fraud-reports/../outside.txt",
    "/fraud-reports/../../outside.txt",
    "/fraud-reports/%2e%2e%2foutside.txt",
    "/fraud-reports/%2e%2e/outside.txt",
    "/fraud-reports/..%2f..%2foutside.txt",
    "/fraud-reports/..%2f..%2flake%2fsecret.txt",
    "/fraud-reports/%2e%2e",
    "/fraud-reports/..",
    "/fraud-reports//etc/passwd",
    "/fraud-reports/%2Fetc%2Fpasswd",
    "/fraud-reports/" + quote(str(REPO / "README.md"), safe=""),
    "/fraud-reports/2018-02-30",
    "/fraud-reports/2018-13-01",
    "/fraud-reports/2018-4-2",
    "/fraud-reports/20180402",
    f"/fraud-reports/{NO_REPORT}",
    f"/fraud-reports/{NO_REPORT}/alerts",
    f"/fraud-reports/{NO_REPORT}/report.json",
    f"/fraud-reports/{D1}%2f..%2f..%2fsecret.txt",
    f"/fraud-reports/{D1}/../../secret.txt",
    f"/fraud-reports/{D1}/files/stray.html",
    f"/fraud-reports/{D1}/files/..%2fstray.html",
    f"/fraud-reports/{D1}/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    f"/fraud-reports/{D1}/files/..",
    f"/fraud-reports/{D1}/files/_MANIFEST.json",
    f"/fraud-reports/{D1}%00/report.json",
]


@pytest.mark.slow
@pytest.mark.parametrize("path", BAD_PATHS)
def test_what_is_not_a_report_of_the_lake_is_refused(server, token, path):
    af, _ = server
    status, _, body = get(af, path, token)
    assert status in (400, 404, 422), (status, body[:300])
    assert MARKER.encode() not in body
    assert b"root:" not in body and b"data:image/png" not in body


@pytest.mark.slow
def test_a_refusal_says_why(server, token):
    af, _ = server
    status, _, body = get(af, "/fraud-reports/2018-02-30", token)
    assert status == 404 and "not a day of the calendar" in json.loads(body)["detail"]
    status, headers, body = get(af, f"/fraud-reports/{NO_REPORT}", token, accept="text/html")
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert f"no published report for {NO_REPORT}".encode() in body


@pytest.mark.slow
def test_a_run_links_its_score_and_report_tasks_to_the_day_s_pages(server, token):
    """A run made as the demo makes it (``airflow dags test`` with the day in the form, no logical
    date; the steps before score are marked done): it starts now and lasts seconds, and its score
    and report tasks link to the day's pages, which the report task has just published."""
    af, _ = server
    before = datetime.now(UTC)
    done = af.airflow("dags", "test", "fraud_nightly", "--conf", json.dumps({"date": RUN_DAY.isoformat()}),
                      "--mark-success-pattern", r"(?!(plan|score|report)$).*", check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [r for r in af.dag_runs("fraud_nightly") if (r.get("conf") or {}).get("date") == RUN_DAY.isoformat()]
    assert len(runs) == 1, runs
    run = runs[0]
    started = datetime.fromisoformat(run["start_date"].replace("Z", "+00:00"))
    ended = datetime.fromisoformat(run["end_date"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=5) <= started <= ended <= datetime.now(UTC)  # timed as it ran
    states = {t["task_id"]: t["state"] for t in af.task_instances("fraud_nightly", run["dag_run_id"])}
    assert states["report"] == "success" and states["score"] == "skipped", states  # no champion yet: skipped
    expected = {"Report": f"/fraud-reports/{RUN_DAY}", "Alert list": f"/fraud-reports/{RUN_DAY}/alerts"}
    for task_id in ("score", "report"):
        status, body = af.api("GET", f"/dags/fraud_nightly/dagRuns/{quote(run['dag_run_id'], safe='')}"
                                     f"/taskInstances/{task_id}/links")
        assert status == 200, body
        assert body["extra_links"] == expected, (task_id, body)
    status, _, page = get(af, urlsplit(expected["Report"]).path, token)
    assert status == 200 and b'<nav id="fraud-report-bar" style="' in page
    assert f'data-day="{RUN_DAY}"'.encode() in page and b"data:image/png;base64" in page


def _land(lake, day: date) -> None:
    import pyarrow as pa

    lake.write_landing(day, pa.table({"TRANSACTION_ID": [1]}))
    lake.mark_landing_done(day)


def test_the_launcher_knows_when_the_lake_lacks_the_night_the_schedule_would_run(tmp_path):
    import pyarrow as pa
    from local_airflow import missing_night

    from jobs.common.lake import Lake

    lake = Lake.from_uri((tmp_path / "lake").as_uri())
    _land(lake, FIRST)
    _land(lake, D1)
    lake.write_landing(D2, pa.table({"TRANSACTION_ID": [2]}))  # files, no _SUCCESS yet
    assert missing_night(lake.uri, now=datetime(2018, 4, 3, 6, tzinfo=UTC)) is None  # D1 has landed
    assert missing_night(lake.uri, now=datetime(2018, 4, 4, 0, 30, tzinfo=UTC)) == (D2, [FIRST, D1])
    assert missing_night(lake.uri, now=datetime(2026, 12, 4, 21, tzinfo=UTC)) == (date(2026, 12, 3), [FIRST, D1])


@pytest.mark.slow
def test_the_launcher_pauses_the_dag_while_the_lake_lacks_that_night(server):
    """What `make up` does before it starts the scheduler: paused (and says how to go on) while the
    lake holds only old days; a live lake whose night is late keeps its schedule; only the
    launcher's own pause is undone, an operator's pause stays."""
    from local_airflow import schedule_state

    from jobs.common.lake import Lake

    af, _ = server
    lake = Lake.from_uri(af.env["FRAUD_LAKE_URI"])

    def paused() -> bool:
        status, dag = af.api("GET", "/dags/fraud_nightly")
        assert status == 200
        return dag["is_paused"]

    now = datetime(2026, 12, 4, 21, tzinfo=UTC)
    said = schedule_state(af, lake.uri, now=now)  # no recent landing in the lake: an old (demo) lake
    assert paused() and "the night of 2026-12-03" in said and "make run DATE=" in said and "unpause" in said
    _land(lake, date(2026, 12, 2))  # a live lake, the night of 12-03 late: the sensor waits for it
    said = schedule_state(af, lake.uri, now=now)
    assert not paused() and "not there yet" in said and "landing sensor" in said
    _land(lake, date(2026, 12, 3))
    assert "runs on its schedule" in schedule_state(af, lake.uri, now=now) and not paused()
    af.set_paused("fraud_nightly", True)  # an operator's pause
    said = schedule_state(af, lake.uri, now=now)
    assert paused() and "paused (by you" in said


def test_the_plugin_registers_the_pages_and_loads_them_only_when_served(tmp_path):
    """Every Airflow process of the stack loads the plugin (the UI's menu item, the mounted app), but
    only the API server's first request imports FastAPI and the security code for it."""
    from local_airflow import LocalAirflow

    af = LocalAirflow(tmp_path / "af", (tmp_path / "lake").as_uri())
    probe = ("import sys, json; from airflow import plugins_manager as pm; plugins, errors = pm._get_plugins(); "
             "apps = pm.get_fastapi_plugins()[0]; "
             "print(json.dumps({'plugins': [p.name for p in plugins], 'errors': errors, "
             "'views': pm._get_ui_plugins()[0], 'apps': [a['url_prefix'] for a in apps], "
             "'loaded': [m for m in ('fastapi', 'airflow.api_fastapi.core_api.security') if m in sys.modules]}))")
    out = subprocess.run([sys.executable, "-c", probe], env=af.env, capture_output=True, text=True, timeout=120,
                         check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fraud_reports" in seen["plugins"] and seen["errors"] == {}
    assert seen["apps"] == ["/fraud-reports"]
    view = next(v for v in seen["views"] if v["name"] == "Fraud reports")
    assert view["href"] == "fraud-reports/" and view["destination"] == "nav"  # relative to the base URL
    assert seen["loaded"] == []


@pytest.mark.slow
@pytest.mark.s3
def test_an_s3_lake_is_read_with_the_store_of_the_aws_connection(s3_server, monkeypatch, tmp_path):
    """The pages' lake on S3: the keys come from the AWS Connection only (none in the process's own
    environment), and none of them appears on a page."""
    import boto3
    from fraud_ops import reports_ui

    from jobs.common.config import S3Settings
    from jobs.common.datasets import Dataset
    from jobs.common.lake import Lake
    from jobs.report import build_report, write_report

    bucket = "reports-" + secrets.token_hex(4)
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=s3_server["access_key"],
                 aws_secret_access_key=s3_server["secret_key"], region_name="us-east-1").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/lake"
    writer = Lake.from_uri(uri, S3Settings(s3_server["endpoint_url"], "us-east-1", s3_server["access_key"],
                                           s3_server["secret_key"]))
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    scores, alerts = scores_and_alerts(D1, CARDS[D1])
    writer.write_table(Dataset.SCORES, D1, scores)
    writer.write_table(Dataset.ALERTS, D1, alerts)
    write_report(writer, D1, *build_report(writer, D1))
    writer.write_run_record("report", D1, "test", {"stale_partitions": 5})

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "FRAUD_S3_ENDPOINT_URL",
                 "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("FRAUD_LAKE_URI", uri)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": s3_server["access_key"], "password": s3_server["secret_key"],
        "extra": {"endpoint_url": s3_server["endpoint_url"], "region_name": "us-east-1"}}))
    lake = reports_ui.settings_lake()
    assert reports_ui.report_days(lake) == [D1] and reports_ui.stale_count(lake, D1) == 5
    listing = reports_ui.list_page(lake.uri, [(D1, 5)])
    stored = reports_ui.report_file(lake, D1, "report.html").decode()
    columns, rows, transactions = reports_ui.alert_list(lake, D1)
    page = reports_ui.alerts_page(D1, "", (columns, rows, transactions))
    assert f"s3://{bucket}/lake" in listing and "data:image/png;base64" in stored
    assert [r["CUSTOMER_ID"] for r in rows] == CARDS[D1] and len(transactions[CARDS[D1][0]]) == 3
    for text in (listing, stored, page):
        assert s3_server["secret_key"] not in text and s3_server["access_key"] not in text


def test_the_deployment_serves_the_pages_from_the_lake_it_runs_on():
    """The image carries the plugin and the jobs it reads the lake with; compose's API server gets the
    lake and its store's Connection, as the workers do."""
    import yaml

    dockerfile = (REPO / "Dockerfile").read_text()
    airflow_stage = dockerfile.split("FROM base AS airflow", 1)[1].split("FROM base AS trainer", 1)[0]
    assert "COPY plugins ./plugins" in airflow_stage and "COPY jobs ./jobs" in airflow_stage
    assert "AIRFLOW__CORE__PLUGINS_FOLDER=/opt/fraud/plugins" in dockerfile and "PYTHONPATH=/opt/fraud" in dockerfile
    services = yaml.safe_load((REPO / "docker-compose.yaml").read_text())["services"]
    env = services["airflow-api-server"]["environment"]
    assert {"FRAUD_LAKE_URI", "AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW__API__BASE_URL"} <= set(env)
    assert env["AIRFLOW__CORE__LAZY_LOAD_PLUGINS"] == "False"


def test_a_link_takes_the_day_from_the_task_s_rendered_date_else_from_the_plan(monkeypatch):
    from fraud_ops.links import AlertListLink, ReportLink

    class Task:
        def __init__(self, **fields):
            self.__dict__.update(fields)

    class Instance:
        def __init__(self, day):
            self.day = day

        def xcom_pull(self, task_ids, key):
            return self.day if (task_ids, key) == ("plan", "day") else None

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/ops/")
    local = Task(command=["python", "-m", "jobs.report", "--lake", "file:///l", "--date", "2018-04-02"])
    pod = Task(cmds=["python"], arguments=["-m", "jobs.torch.score", "--date", "2018-04-03", "--k", "20"])
    assert ReportLink().get_link(local, ti_key=Instance("2018-04-09")) == "/ops/fraud-reports/2018-04-02"
    assert AlertListLink().get_link(pod, ti_key=Instance(None)) == "/ops/fraud-reports/2018-04-03/alerts"
    assert ReportLink().get_link(Task(command=["x"]), ti_key=Instance("2018-04-09")) == "/ops/fraud-reports/2018-04-09"
    not_a_day = Task(command=["x", "--date", "2018-02-30"])
    assert ReportLink().get_link(not_a_day, ti_key=Instance("../../etc")) == ""  # no link rather than a wrong one


@pytest.mark.parametrize("runner", ["local", "docker", "kubernetes"])
def test_the_score_task_has_the_links_whatever_runs_it(monkeypatch, runner):
    from fraud_ops.config import orchestration
    from fraud_ops.links import REPORT_LINKS
    from fraud_ops.runners import torch_task

    monkeypatch.setenv("FRAUD_TORCH_RUNNER", runner)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://localhost:8080")
    task = torch_task("score", "score", ["--lake", "s3://bucket/lake", "--date", "2018-04-02", "--k", "20"],
                      orchestration(), lake="s3://bucket/lake", extra_links=REPORT_LINKS)
    links = {link.name: link.get_link(task, ti_key=None) for link in task.operator_extra_links}
    assert links == {"Report": "/fraud-reports/2018-04-02", "Alert list": "/fraud-reports/2018-04-02/alerts"}


def test_the_previous_and_next_report_skip_unpublished_days_and_read_few_manifests(tmp_path, monkeypatch):
    """The bar's neighbours: the nearest published reports either way; a day whose report is being
    written (a folder, no manifest) is passed over; manifests far from the day are never read."""
    import pyarrow as pa
    from fraud_ops.reports_ui import nearest_reports

    from jobs.common.datasets import Dataset
    from jobs.common.lake import Lake

    lake = Lake.from_uri((tmp_path / "lake").as_uri())
    days = [date(2018, 4, d) for d in (1, 2, 3, 6, 9)]
    for day in days:
        lake.write_table(Dataset.REPORTS, day, pa.table({"x": [1]}))
    lake.new_attempt(Dataset.REPORTS, date(2018, 4, 4))  # being written: not a report yet
    asked = []
    real = Lake.is_published
    monkeypatch.setattr(Lake, "is_published", lambda self, ds, d: asked.append(d) or real(self, ds, d))
    assert nearest_reports(lake, date(2018, 4, 3)) == (date(2018, 4, 2), date(2018, 4, 6))
    assert date(2018, 4, 1) not in asked and date(2018, 4, 9) not in asked and date(2018, 4, 4) in asked
    assert nearest_reports(lake, date(2018, 4, 1)) == (None, date(2018, 4, 2))
    assert nearest_reports(lake, date(2018, 4, 9)) == (date(2018, 4, 6), None)
