"""Schema, configuration and the training schedule."""

from __future__ import annotations

from datetime import date

import pyarrow as pa

from jobs.common import schema
from jobs.common.calendar import Calendar, TrainingSchedule
from jobs.common.config import settings


def test_model_inputs_are_the_spec_order():
    assert schema.MODEL_INPUTS == (
        "TX_AMOUNT",
        "TX_DURING_WEEKEND",
        "TX_DURING_NIGHT",
        "CUSTOMER_ID_NB_TX_1DAY_WINDOW",
        "CUSTOMER_ID_AVG_AMOUNT_1DAY_WINDOW",
        "CUSTOMER_ID_NB_TX_7DAY_WINDOW",
        "CUSTOMER_ID_AVG_AMOUNT_7DAY_WINDOW",
        "CUSTOMER_ID_NB_TX_30DAY_WINDOW",
        "CUSTOMER_ID_AVG_AMOUNT_30DAY_WINDOW",
        "TERMINAL_ID_NB_TX_1DAY_WINDOW",
        "TERMINAL_ID_RISK_1DAY_WINDOW",
        "TERMINAL_ID_NB_TX_7DAY_WINDOW",
        "TERMINAL_ID_RISK_7DAY_WINDOW",
        "TERMINAL_ID_NB_TX_30DAY_WINDOW",
        "TERMINAL_ID_RISK_30DAY_WINDOW",
    )


def test_feature_schema_columns_and_types():
    fs = schema.FEATURE_SCHEMA
    assert fs.names[:5] == list(schema.ID_COLUMNS) and "TX_FRAUD" not in fs.names  # labels are events
    assert fs.field("TX_DURING_NIGHT").type == pa.int32()
    assert fs.field("CUSTOMER_ID_NB_TX_7DAY_WINDOW").type == pa.int32()
    assert fs.field("TERMINAL_ID_RISK_30DAY_WINDOW").type == pa.float64()
    assert fs.field("TX_DATETIME").type == pa.timestamp("us")
    assert len(schema.FEATURE_SCHEMA_VERSION) == 16


def test_quarantine_keeps_every_raw_column_as_string():
    q = schema.QUARANTINE_SCHEMA
    assert all(q.field(c).type == pa.string() for c in schema.RAW_COLUMNS)
    assert "reason" in q.names


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("FRAUD_LAKE_URI", "s3://bucket/prefix")
    monkeypatch.setenv("FRAUD_ALERT_K", "50")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-shown")
    cfg = settings()
    assert cfg.lake_uri == "s3://bucket/prefix" and cfg.alert_k == 50
    assert "not-shown" not in repr(cfg), "credentials must not appear in logs"
    monkeypatch.delenv("FRAUD_LAKE_URI")
    assert settings().lake_uri.startswith("file:///") and settings().lake_uri.endswith("/.lake")


def test_training_schedule_anchored_on_first_date():
    s = TrainingSchedule(date(2018, 4, 1), every_days=7, window_days=7)
    # the first window D-14 .. D-8 must start on or after the first date
    assert s.first_training_day == date(2018, 4, 15)
    assert Calendar(date(2018, 4, 1)).train_window(s.first_training_day, 7)[0] == date(2018, 4, 1)
    assert not s.is_training_day(date(2018, 4, 8)), "before enough labelled days"
    assert s.is_training_day(date(2018, 4, 22)) and not s.is_training_day(date(2018, 4, 23))
    assert s.latest_training_day(date(2018, 4, 14)) is None
    assert s.latest_training_day(date(2018, 4, 28)) == date(2018, 4, 22)
    assert s.previous_training_day(date(2018, 4, 22)) == date(2018, 4, 15)
    assert s.previous_training_day(date(2018, 4, 15)) is None
    assert s.training_days(date(2018, 4, 1), date(2018, 5, 1)) == [
        date(2018, 4, 15),
        date(2018, 4, 22),
        date(2018, 4, 29),
    ]


def test_training_schedule_with_other_cadence():
    s = TrainingSchedule(date(2018, 4, 1), every_days=3, window_days=2)
    # needs days D-9 .. D-8 >= first date: D >= 04-10; first multiple of 3 from 04-01 is 04-10
    assert s.first_training_day == date(2018, 4, 10)
    assert s.latest_training_day(date(2018, 4, 12)) == date(2018, 4, 10)


def test_validation_week_is_t_minus_14_to_t_minus_8():
    week = Calendar(date(2018, 4, 1)).validation_week(date(2018, 4, 29))
    assert week[0] == date(2018, 4, 15) and week[-1] == date(2018, 4, 21) and len(week) == 7


def test_code_version_is_real_and_the_same_from_the_zip_spark_ships(tmp_path):
    """The jobs package's content hash, also where the code runs from the --py-files zip (no checkout,
    no .git): what every manifest records as its code version."""
    import subprocess
    import sys
    from pathlib import Path

    from jobs.common.provenance import code_version

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "plugins"))
    from fraud_ops.spark import build_jobs_zip

    here = code_version()
    assert here.startswith("sha256:") and len(here) > 20
    shipped = build_jobs_zip(out_dir=str(tmp_path))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import jobs; assert jobs.__file__.startswith(sys.argv[1]), "
             "jobs.__file__; from jobs.common.provenance import code_version; print(code_version())")
    out = subprocess.run([sys.executable, "-c", probe, shipped], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here
