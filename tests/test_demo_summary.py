"""What `make run` prints at the end: the matured-label figures day by day, the missing days by
reason, the alerts and why, and as its last lines where the report is (in the UI and as a file)."""

from __future__ import annotations

import argparse
import os
from datetime import date

from test_report import FIRST, D, _build

from jobs.common.lake import Dataset


def test_the_summary_shows_each_matured_day_and_ends_with_the_report(lake, monkeypatch, capsys):
    from jobs.demo import Demo
    from jobs.report import main as report_main
    from jobs.report import report_files

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the demo sets its defaults in the environment
    monkeypatch.setenv("FRAUD_LAKE_URI", lake.uri)
    monkeypatch.setenv("FRAUD_AIRFLOW_PORT", "8123")
    gap = date(2018, 4, 11)
    _build(lake, monkeypatch, unscored=(gap,))
    lake.abandon(Dataset.SCORES, gap, "lost")
    assert report_main(["--lake", lake.uri, "--date", D.isoformat()]) == 0
    capsys.readouterr()
    Demo(argparse.Namespace(date=D, first_date=FIRST, customers=10, terminals=10)).summary(12.5)
    out = capsys.readouterr().out.splitlines()
    for day in ("2018-04-10", "2018-04-12"):  # the matured scored days, one line each with figures
        line = next(x for x in out if x.strip().startswith(day))
        assert len(line.split()) == 7 and 0 < float(line.split()[3]) <= 1
    assert any(x.strip().startswith("all days") for x in out)
    assert any("no scores for 2018-04-11 (1 days): abandoned: lost" in x for x in out)
    assert "quarantined 2 (2 negative_amount)" in "\n".join(out)
    assert out[-2].split() == ["in", "the", "UI", f"http://127.0.0.1:8123/fraud-reports/{D}", "(after", "`make", "up`)"]
    assert out[-1].split()[-1] == lake.to_uri(report_files(lake, D)["report.html"])

