"""The nightly reports inside the Airflow UI: a FastAPI app the API server mounts at ``/fraud-reports``.

Registered by the plugin ``plugins/fraud_reports.py`` (docs/contract.md, "Reports in the UI").
Every page is read from the lake (``FRAUD_LAKE_URI``) through ``jobs.common.lake.Lake``; an
``s3://`` lake is opened with the store of the AWS Connection (``fraud_ops.store``), so its keys
are in no URL and no log line.

- ``/``: every day with a published report, newest first, with the stale-partition count the
  report step recorded for it (a fact of its run, ``_runs/report/date=D/``);
- ``/{D}``: D's stored ``report.html``, untouched but for a bar at the top of its body (D, the
  stale count, links to the list, the previous and next reports, the alert list and the JSON);
- ``/{D}/alerts``: D's alert list, each card followed by its scored transactions of D;
- ``/{D}/report.json`` and ``/{D}/files/{name}``: stored files, only those the report's manifest
  names.

Every request needs a user of the UI who may read the runs of ``fraud_nightly`` (the UI's JWT
cookie or a Bearer token, checked by Airflow's own ``requires_access_dag``). ``D`` must be a
``YYYY-MM-DD`` date of the calendar with a published report; anything else is 404, so no request
reads outside the report partitions. Links between the pages are relative: they work under any
base URL.

At module level this file imports the standard library only: Airflow's plugin scan executes it in
every process, and FastAPI, the API server's security code and the lake are needed only when the
API server answers the first request (:class:`ReportsApp`).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime

DAG_ID = "fraud_nightly"
URL_PREFIX = "/fraud-reports"
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ALERT_COLUMNS = ("rank", "CUSTOMER_ID", "score", "n_tx", "model_version")  # first, in this order; others follow
TRANSACTION_COLUMNS = ("TRANSACTION_ID", "TX_DATETIME", "score")
LIST_WORKERS = 8  # run records read at once for the list (an S3 lake: one request each)

# The stored pages are self-contained (plots are data URIs): no script, no request elsewhere.
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
                           "frame-ancestors 'self'; base-uri 'none'; form-action 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                "Cache-Control": "private, no-cache"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png"}

STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;
vertical-align:top}th{background:#f3f5f8}td.text{text-align:left}tr.transactions>td{border:none;padding:0 0 0.8em 2.5em}
tr.transactions table{margin:0;font-size:90%}tr.top td{font-weight:bold}ol{margin:0;padding-left:1.4em;text-align:left}"""
BAR_STYLE = ("font:14px sans-serif;background:#eef2f7;border:1px solid #c9d3e0;border-radius:4px;"
             "padding:6px 10px;margin:0 0 1em 0")
BODY_OPEN = re.compile(r"<body\b[^>]*>", re.IGNORECASE)


class NotFound(Exception):
    """A request for something that is not there; its message is safe to show."""


# --- the lake ----------------------------------------------------------------------------------
def settings_lake():
    """The lake of this deployment (``FRAUD_LAKE_URI``), an S3 store with the AWS Connection's keys."""
    from fraud_ops.store import task_lake
    from jobs.common.config import settings

    return task_lake(settings().lake_uri)


def report_days(lake) -> list[date]:
    """Days with a published report, newest first."""
    from jobs.common.datasets import Dataset

    return sorted(lake.published_dates(Dataset.REPORTS), reverse=True)


def stale_count(lake, day: date) -> int | None:
    """Stale partitions the report step counted when it last reported D (None: not recorded)."""
    value = (lake.latest_run_record("report", day) or {}).get("stale_partitions")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_day(text: str) -> date:
    """``text`` as a day of the calendar, or :class:`NotFound`."""
    if not DATE_RE.match(text):
        raise NotFound("not a date: a report is named by its day, YYYY-MM-DD")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise NotFound(f"{text} is not a day of the calendar") from None


def reported_day(lake, text: str) -> date:
    """The day ``text`` names if it has a published report, else :class:`NotFound`."""
    from jobs.common.datasets import Dataset

    day = parse_day(text)
    if lake.manifest(Dataset.REPORTS, day) is None:
        raise NotFound(f"no published report for {day}")
    return day


def report_file(lake, day: date, name: str) -> bytes:
    """One file of D's published report; only names the report's manifest lists."""
    from jobs.common.lake import LakeError
    from jobs.report import report_files

    if not FILE_NAME_RE.match(name):
        raise NotFound("no such file in the report")
    try:
        files = report_files(lake, day)
    except LakeError:
        raise NotFound(f"no published report for {day}") from None
    if name not in files:
        raise NotFound(f"the report of {day} has no file {name}")
    try:
        return lake.read_bytes(files[name])
    except (LakeError, OSError):  # republished meanwhile and its old attempt removed: gone, not an error
        raise NotFound(f"the report of {day} changed while it was read: reload the page") from None


def nearest_reports(lake, day: date) -> tuple[date | None, date | None]:
    """The published reports just before and just after ``day``: one listing of the ``date=``
    folders, then manifests read outwards from ``day`` only until one is found each way (a page
    never reads every manifest of years of reports)."""
    from jobs.common.datasets import Dataset

    folders = lake.partition_dates(Dataset.REPORTS)
    before = next((d for d in reversed(folders) if d < day and lake.is_published(Dataset.REPORTS, d)), None)
    after = next((d for d in folders if d > day and lake.is_published(Dataset.REPORTS, d)), None)
    return before, after


def alert_list(lake, day: date) -> tuple[list[str], list[dict], dict] | None:
    """D's alerts (columns, rows by rank) and each alerted card's scored transactions of D, best
    first; None when D has no published alert list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.common.datasets import Dataset

    if not lake.is_published(Dataset.ALERTS, day):
        return None
    alerts = lake.read_table(Dataset.ALERTS, day)
    names = alerts.column_names
    columns = [c for c in ALERT_COLUMNS if c in names] + [c for c in names if c not in ALERT_COLUMNS]
    rows = sorted(alerts.to_pylist(), key=lambda r: (r.get("rank") is None, r.get("rank") or 0,
                                                      str(r.get("CUSTOMER_ID"))))
    cards = sorted({r["CUSTOMER_ID"] for r in rows if r.get("CUSTOMER_ID") is not None})
    transactions: dict = {}
    if cards and lake.is_published(Dataset.SCORES, day):
        scores = lake.read_table(Dataset.SCORES, day, columns=list(dict.fromkeys(["CUSTOMER_ID", *TRANSACTION_COLUMNS])))
        if scores.num_rows:
            wanted = pc.is_in(scores.column("CUSTOMER_ID"),
                              value_set=pa.array(cards, type=scores.schema.field("CUSTOMER_ID").type))
            ordered = scores.filter(wanted).sort_by([("CUSTOMER_ID", "ascending"), ("score", "descending"),
                                                     ("TRANSACTION_ID", "ascending")])
            for row in ordered.to_pylist():
                transactions.setdefault(row["CUSTOMER_ID"], []).append(row)
    return columns, rows, transactions


# --- HTML --------------------------------------------------------------------------------------
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def cell(value) -> str:
    """A value of any column as HTML: numbers rounded, lists as numbered lists, records as key=value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else esc(f"{value:.4f}")
    if isinstance(value, datetime):
        return esc(value.isoformat(sep=" "))
    if isinstance(value, dict):
        return ", ".join(f"{esc(k)}={cell(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "<ol>" + "".join(f"<li>{cell(v)}</li>" for v in value) + "</ol>" if value else ""
    return esc(value)


def _td(value) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f"<td>{cell(value)}</td>" if numeric else f'<td class="text">{cell(value)}</td>'


def page(title: str, body: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def stale_text(count: int | None) -> str:
    return "n/a" if count is None else str(count)


def list_page(lake_uri: str, rows: Iterable[tuple[date, int | None]]) -> str:
    """The list of reports: ``rows`` are (day, stale count), newest first. Links relative to ``/fraud-reports/``."""
    rows = list(rows)
    if rows:
        body = "".join(
            f'<tr data-day="{d}"><td class="text"><a href="{d}">{d}</a></td>'
            f'<td class="text"><a href="{d}/alerts">alert list</a></td>'
            f'<td class="stale">{stale_text(n)}</td></tr>'
            for d, n in rows
        )
        table = (f'<table id="reports"><tr><th>report</th><th>alerts</th><th>stale partitions</th></tr>{body}'
                 "</table>")
    else:
        table = '<p id="no-reports">No published report in the lake yet.</p>'
    return page("Fraud reports", f"<h1>Nightly fraud reports</h1><p>Lake <code>{esc(lake_uri)}</code>: "
                                 f"{len(rows)} days with a report, newest first. Stale partitions: what the "
                                 "report step counted when it ran (n/a: not recorded).</p>" + table)


def header_bar(day: date, stale: int | None, previous: date | None, following: date | None, up: str,
               current: str) -> str:
    """The bar on top of a day's pages. ``up``: the path from the page to ``/fraud-reports/``;
    ``current``: "report" or "alerts" (the page it is on)."""
    def other(d: date) -> str:
        return f"{up}{d}" + ("/alerts" if current == "alerts" else "")

    links = [f'<a href="{up}">all reports</a>']
    links.append(f'<a rel="prev" href="{other(previous)}">&larr; {previous}</a>' if previous else "<span>&larr; none</span>")
    links.append(f'<a rel="next" href="{other(following)}">{following} &rarr;</a>' if following else "<span>none &rarr;</span>")
    if current == "alerts":
        links.append(f'<a href="{up}{day}">report</a>')
    else:
        links.append(f'<a href="{up}{day}/alerts">alert list</a>')
    links.append(f'<a href="{up}{day}/report.json">report.json</a>')
    return (f'<nav id="fraud-report-bar" style="{BAR_STYLE}" data-day="{day}"><strong>Fraud report {day}</strong>'
            f' &middot; stale partitions: <span class="stale">{stale_text(stale)}</span> &middot; '
            + " &middot; ".join(links) + "</nav>")


def with_bar(stored: str, bar: str) -> str:
    """The stored page with ``bar`` right after its ``<body>`` tag (in front when it has none)."""
    found = BODY_OPEN.search(stored)
    if found is None:
        return bar + stored
    return stored[:found.end()] + bar + stored[found.end():]


def alerts_page(day: date, bar: str, alerts: tuple[list[str], list[dict], dict] | None,
                reason: str | None = None) -> str:
    if alerts is None:
        why = f": {esc(reason)}" if reason else ""
        return page(f"Alerts {day}", f"{bar}<h1>Alert list of {day}</h1>"
                                     f'<p id="no-alerts">No alert list was published for {day}{why}.</p>')
    columns, rows, transactions = alerts
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        card = row.get("CUSTOMER_ID")
        body.append(f'<tr class="alert" data-card="{esc(card)}">' + "".join(_td(row.get(c)) for c in columns) + "</tr>")
        txs = transactions.get(card, [])
        top = row.get("top_transaction_id")
        lines = "".join(
            ("<tr class=\"top\"" if top is not None and t["TRANSACTION_ID"] == top else "<tr")
            + f' data-transaction="{esc(t["TRANSACTION_ID"])}">' + "".join(_td(t[c]) for c in TRANSACTION_COLUMNS)
            + "</tr>"
            for t in txs
        )
        inner = ("<table><tr>" + "".join(f"<th>{c}</th>" for c in TRANSACTION_COLUMNS) + f"</tr>{lines}</table>"
                 if txs else "<em>no scored transaction of this card found</em>")
        body.append(f'<tr class="transactions" data-card="{esc(card)}"><td class="text" colspan="{len(columns)}">'
                    f"{len(txs)} transactions of card {esc(card)} on {day}:{inner}</td></tr>")
    table = f'<table id="alerts"><tr>{head}</tr>{"".join(body)}</table>' if rows else "<p>No card was alerted.</p>"
    return page(f"Alerts {day}", f"{bar}<h1>Alert list of {day}</h1><p>{len(rows)} cards by rank, each followed "
                                 "by its transactions of the day and their scores, highest first.</p>" + table)


def message_page(title: str, text: str, link: tuple[str, str] | None = None) -> str:
    more = f'<p><a href="{esc(link[0])}">{esc(link[1])}</a></p>' if link else ""
    return page(title, f"<h1>{esc(title)}</h1><p>{esc(text)}</p>{more}")


# --- the app -----------------------------------------------------------------------------------
def create_app(lake_factory: Callable[[], object] = settings_lake):
    """The FastAPI app of the reports (``lake_factory``: the lake, opened for each request)."""
    from airflow.api_fastapi.core_api.security import DagAccessEntity, requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    # The reports are what the runs of the DAG produced: readable by whoever may read its runs.
    allowed = requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)
    app = FastAPI(title="Fraud reports", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(allowed)])

    def not_found(exc: NotFound) -> HTTPException:
        return HTTPException(status_code=404, detail=str(exc))

    def html_page(text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers=PAGE_HEADERS)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException):
        if "text/html" not in request.headers.get("accept", ""):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        home = request.scope.get("root_path", "").rstrip("/") + "/"
        if exc.status_code in (401, 403):
            login = _login_url(str(request.url))
            text = ("You are not logged in to Airflow, or your login has expired." if exc.status_code == 401 else
                    f"Your login does not allow reading the runs of {DAG_ID}, or its token is not valid.")
            body = message_page("Fraud reports: log in", text, (login, "Log in to Airflow") if login else None)
        else:
            body = message_page(f"Fraud reports: {exc.status_code}", str(exc.detail), (home, "All reports"))
        return HTMLResponse(body, status_code=exc.status_code, headers={**PAGE_HEADERS, **(exc.headers or {})})

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        lake = lake_factory()
        days = report_days(lake)
        with ThreadPoolExecutor(LIST_WORKERS) as pool:
            counts = list(pool.map(lambda d: stale_count(lake, d), days))
        return html_page(list_page(lake.uri, zip(days, counts, strict=True)))

    @app.get("/{day}", response_class=HTMLResponse)
    def report(day: str) -> HTMLResponse:
        lake = lake_factory()
        try:
            d = reported_day(lake, day)
            stored = report_file(lake, d, "report.html").decode("utf-8", errors="replace")
        except NotFound as exc:
            raise not_found(exc) from None
        previous, following = nearest_reports(lake, d)
        bar = header_bar(d, stale_count(lake, d), previous, following, up="./", current="report")
        return html_page(with_bar(stored, bar))

    @app.get("/{day}/alerts", response_class=HTMLResponse)
    def alerts(day: str) -> HTMLResponse:
        lake = lake_factory()
        try:
            d = reported_day(lake, day)
        except NotFound as exc:
            raise not_found(exc) from None
        previous, following = nearest_reports(lake, d)
        bar = header_bar(d, stale_count(lake, d), previous, following, up="../", current="alerts")
        from jobs.common.lake import LakeError

        try:
            found = alert_list(lake, d)
        except (LakeError, OSError):  # republished while read: its old files removed
            raise not_found(NotFound(f"the alert list of {d} changed while it was read: reload the page")) from None
        if found is None:
            reason = (lake.latest_run_record("score", d) or {}).get("reason")
            return html_page(alerts_page(d, bar, None, reason), status=404)
        return html_page(alerts_page(d, bar, found))

    @app.get("/{day}/report.json")
    def report_json(day: str) -> Response:
        return stored_file(day, "report.json")

    @app.get("/{day}/files/{name}")
    def stored_file(day: str, name: str) -> Response:
        lake = lake_factory()
        try:
            data = report_file(lake, reported_day(lake, day), name)
        except NotFound as exc:
            raise not_found(exc) from None
        suffix = name[name.rfind("."):] if "." in name else ""
        kind = CONTENT_TYPES.get(suffix)
        headers = dict(PAGE_HEADERS)
        if kind is None:
            kind = "application/octet-stream"
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(data, media_type=kind, headers=headers)

    return app


def _login_url(next_url: str) -> str | None:
    """The UI's login page, coming back to ``next_url`` (None when no auth manager is running here)."""
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=next_url)
    except Exception:  # noqa: BLE001 - the refusal stands; only the link is missing
        return None


class ReportsApp:
    """The ASGI app the plugin mounts: builds :func:`create_app` at its first request, so that the
    processes that load plugins but serve no page (scheduler, workers, CLI) do not import FastAPI
    and the API server's security code for it."""

    def __init__(self, factory: Callable[[], object] = create_app):
        self._factory = factory
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            self._app = self._factory()
        await self._app(scope, receive, send)
