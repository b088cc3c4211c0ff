"""The nightly reports in the Airflow UI (Airflow 3.1+ plugin interface; docs/contract.md, "Reports in the UI").

- ``fastapi_apps``: the pages of ``fraud_ops.reports_ui``, served by the API server at
  ``/fraud-reports`` (under ``[api] base_url``), behind the UI's own login;
- ``external_views``: a "Fraud reports" item in the UI's navigation that opens the list inside the
  UI (``href`` is relative to the base URL, so it has no leading slash).

The task links to a day's pages ("Report", "Alert list" on ``score`` and ``report``) are operator
links of those tasks (``fraud_ops.links``), stored when each task instance ends.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fraud_ops.reports_ui import URL_PREFIX, ReportsApp


class FraudReports(AirflowPlugin):
    name = "fraud_reports"
    fastapi_apps = [{"name": "fraud_reports", "app": ReportsApp(), "url_prefix": URL_PREFIX}]
    external_views = [
        {
            "name": "Fraud reports",
            "href": URL_PREFIX.lstrip("/") + "/",
            "url_route": "fraud-reports",
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
