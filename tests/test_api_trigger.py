"""The UI trigger through the REST API of a real API server: a bad form value is refused, a good one runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from browser import api_server

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))

pytestmark = pytest.mark.slow

BAD_CONFS = [
    {"date": "2018-04-01; rm -rf /"},
    {"date": "$(reboot)"},
    {"date": "2018-02-30"},
    {"force_retrain": "true; id"},
    {"model": "xgboost"},
    {"window_days": 0},
    {"window_days": 91},
    {"k": 0},
    {"k": "10 --lake s3://elsewhere"},
    {"seed": -1},
]


@pytest.fixture(scope="module")
def airflow_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-api")
    with api_server(home, (home / "lake").as_uri()) as af:
        yield af


def test_token_is_required(airflow_api):
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{airflow_api.url}/api/v2/dags/fraud_nightly/dagRuns", timeout=30)
    assert exc.value.code in (401, 403)


def test_form_is_typed(airflow_api):
    status, body = airflow_api.api("GET", "/dags/fraud_nightly/details")
    assert status == 200
    params = body["params"]
    assert params["model"]["schema"]["enum"] == ["mlp", "seq"]
    assert params["window_days"]["schema"]["minimum"] == 1
    assert params["k"]["schema"]["maximum"] == 10000
    assert params["date"]["schema"]["format"] == "date"
    assert params["force_retrain"]["schema"]["type"] == "boolean"


@pytest.mark.parametrize("conf", BAD_CONFS, ids=[str(c) for c in BAD_CONFS])
def test_bad_param_is_refused_and_no_run_is_created(airflow_api, conf):
    before = len(airflow_api.dag_runs("fraud_nightly"))
    status, body = airflow_api.api("POST", "/dags/fraud_nightly/dagRuns", {"logical_date": None, "conf": conf})
    assert 400 <= status < 500, body
    assert "param" in str(body).lower()
    assert len(airflow_api.dag_runs("fraud_nightly")) == before


def test_good_param_creates_a_run(airflow_api):
    conf = {"date": "2018-04-05", "force_retrain": True, "model": "seq", "window_days": 3, "k": 25}
    status, body = airflow_api.api("POST", "/dags/fraud_nightly/dagRuns", {"logical_date": None, "conf": conf})
    assert status == 200, body
    runs = {r["dag_run_id"]: r for r in airflow_api.dag_runs("fraud_nightly")}
    assert runs[body["dag_run_id"]]["conf"] == conf
