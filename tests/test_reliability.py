"""Ways the pipeline could lose data, stop for weeks or let someone in, each pinned by a test.

Every test here failed on the code before its fix; the fix's commit message and the README's
reliability section name them.
"""

from __future__ import annotations

import os
import posixpath
import time
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs.common import lake as lake_mod
from jobs.common.lake import Dataset, Lake, NotPublished

D = date(2018, 4, 1)
REPO = Path(__file__).resolve().parents[1]


# --- a huge amount must not stop the features -------------------------------------------------------
def test_window_sums_take_any_amount_the_clean_step_lets_through():
    from jobs.spark.windows import customer_windows

    n = 5_000  # 5,000 payments of a billion on one card in one day: 5e12 in a window
    keys = np.zeros(n + 1, np.int64)
    times = np.r_[np.arange(n), [n]].astype(np.int64) * 1_000_000
    amounts = np.r_[np.full(n, 1e9), [0.01]]
    out = customer_windows(keys, times, amounts, (1,))
    count, mean = out[1]
    assert count[-1] == n + 1
    assert mean[-1] == (n * 1e9 + 0.01) / (n + 1)  # exact, not an overflow error
    assert mean[0] == 1e9


@pytest.mark.spark
def test_amounts_above_the_bound_are_quarantined(spark, lake, monkeypatch):
    from jobs.common.schema import QUARANTINE_SCHEMA, RAW_SCHEMA, QuarantineReason
    from jobs.spark import clean

    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")
    rows = [{"TRANSACTION_ID": i, "TX_DATETIME": datetime(2018, 4, 1, 10),
             "CUSTOMER_ID": 1, "TERMINAL_ID": 2, "TX_AMOUNT": amount, "TX_FRAUD": 0, "TX_FRAUD_SCENARIO": 0}
            for i, amount in enumerate([1e9, 1e9 + 0.01, 1e308], start=1)]
    lake.write_landing(D, pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    lake.mark_landing_done(D)
    assert clean.clean_days(spark, lake, [D]) == 0
    assert lake.read_table(Dataset.CLEAN, D).column("TRANSACTION_ID").to_pylist() == [1]
    rejected = lake.read_table(Dataset.QUARANTINE, D, schema=QUARANTINE_SCHEMA).to_pylist()
    assert {r["TRANSACTION_ID"]: r["reason"] for r in rejected} == {
        "2": QuarantineReason.AMOUNT_ABOVE_BOUND, "3": QuarantineReason.AMOUNT_ABOVE_BOUND}


def test_the_amount_bound_is_refused_above_what_the_window_sums_hold(monkeypatch):
    from jobs.common.config import settings

    monkeypatch.setenv("FRAUD_MAX_AMOUNT", "1e13")
    with pytest.raises(ValueError, match="FRAUD_MAX_AMOUNT must be in"):
        settings()


# --- hostile landing files: every row read, or the day refused by name ----------------------------------
def _clean_one_day(spark, lake: Lake, monkeypatch) -> dict:
    from jobs.spark import clean

    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")
    lake.mark_landing_done(D)
    assert clean.clean_days(spark, lake, [D]) == 0
    return lake.manifest(Dataset.CLEAN, D)["stats"]


def _reasons(lake: Lake) -> dict[str, str]:
    from jobs.common.schema import QUARANTINE_SCHEMA

    return {r["TRANSACTION_ID"]: r["reason"]
            for r in lake.read_table(Dataset.QUARANTINE, D, schema=QUARANTINE_SCHEMA).to_pylist()}


def _write(lake: Lake, name: str, data: bytes) -> None:
    lake.write_bytes(posixpath.join(lake.partition_path(Dataset.LANDING, D), name), data)


CSV_HEADER = "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_FRAUD,TX_FRAUD_SCENARIO"


@pytest.mark.spark
@pytest.mark.parametrize("start", [b"\n", b"\xef\xbb\xbf\n", b"\r\n", b"\n\n"],
                         ids=["blank-line", "bom-then-newline", "bare-crlf", "two-blank-lines"])
def test_a_csv_whose_first_line_is_blank_keeps_its_rows(spark, lake: Lake, monkeypatch, start):
    body = f"{CSV_HEADER}\r\n1,2018-04-01 10:00:00,1,2,5.0,0,0\r\n2,2018-04-01 11:00:00,1,2,6.0,,\r\n"
    _write(lake, "part-00000.csv", start + body.encode())
    stats = _clean_one_day(spark, lake, monkeypatch)
    assert stats["rows_in"] == 2 and stats["clean"] == 2
    assert lake.read_table(Dataset.CLEAN, D).column("TRANSACTION_ID").to_pylist() == [1, 2]


@pytest.mark.spark
def test_ragged_csv_lines_are_quarantined_not_shifted(spark, lake: Lake, monkeypatch):
    from jobs.common.schema import QuarantineReason

    _write(lake, "part-00000.csv", "\n".join([
        CSV_HEADER,
        "1,2018-04-01 10:00:00,1,2,5.0,0,0",
        "2,2018-04-01 10:00:00,1,2,1,234.50,0,0",  # an unquoted thousands separator: one field too many
        "3,2018-04-01 10:00:00,1,2,7.0",  # fields missing at the end
        "4,2018-04-01 10:00:00,1,2,8.0,,",  # empty optional fields: not ragged
    ]).encode() + b"\n")
    stats = _clean_one_day(spark, lake, monkeypatch)
    assert lake.read_table(Dataset.CLEAN, D).column("TRANSACTION_ID").to_pylist() == [1, 4]
    assert _reasons(lake) == {"2": QuarantineReason.RAGGED, "3": QuarantineReason.RAGGED}
    assert stats["rows_in"] == 4 and stats["quarantined"][QuarantineReason.RAGGED] == 2


@pytest.mark.spark
def test_java_style_numbers_and_inexact_float_ids_are_not_numbers(spark, lake: Lake, monkeypatch):
    from jobs.common.schema import QuarantineReason

    _write(lake, "part-00000.csv", "\n".join([
        CSV_HEADER,
        "1,2018-04-01 10:00:00,1,2,12d,0,0",
        "2,2018-04-01 10:00:00,1,2,0x1p3,0,0",
        "3,2018-04-01 10:00:00,1,2,1.5f,0,0",
        "4,2018-04-01 10:00:00,1,2,1.5e3,0,0",  # decimal notation with an exponent: a number
        "5.0,2018-04-01 10:00:00,1,2,3,0,0",  # a whole decimal id: accepted (pandas writes these)
        "9007199254740993.0,2018-04-01 10:00:00,1,2,3,0,0",  # above 2^53 as a float: digits may be lost
        "9007199254740993,2018-04-01 10:00:00,1,2,3,0,0",  # the same as an integer: exact
    ]).encode() + b"\n")
    _clean_one_day(spark, lake, monkeypatch)
    clean = lake.read_table(Dataset.CLEAN, D).to_pylist()
    assert sorted(r["TRANSACTION_ID"] for r in clean) == [4, 5, 9007199254740993]
    assert {r["TRANSACTION_ID"]: r["TX_AMOUNT"] for r in clean}[4] == 1500.0
    bad = QuarantineReason.BAD_NUMBER
    assert _reasons(lake) == {"1": bad, "2": bad, "3": bad, "9007199254740993.0": bad}


@pytest.mark.spark
def test_parquet_with_nanosecond_timestamps_is_read(spark, lake: Lake, monkeypatch):
    import pandas as pd

    frame = pd.DataFrame({"TRANSACTION_ID": [1, 2], "TX_DATETIME": pd.to_datetime(
        ["2018-04-01 10:00:00.123456789", "2018-04-01 23:59:59.999999999"]),
        "CUSTOMER_ID": [1, 1], "TERMINAL_ID": [2, 2], "TX_AMOUNT": [5.0, 6.0], "TX_FRAUD": [0, 1]})
    assert str(frame["TX_DATETIME"].dtype) == "datetime64[ns]"
    path = posixpath.join(lake.partition_path(Dataset.LANDING, D), "part-00000.parquet")
    lake.fs.create_dir(posixpath.dirname(path), recursive=True)
    with lake.fs.open_output_stream(path) as out:
        frame.to_parquet(out, index=False)
    stats = _clean_one_day(spark, lake, monkeypatch)
    assert stats["clean"] == 2
    times = lake.read_table(Dataset.CLEAN, D).column("TX_DATETIME").to_pylist()
    assert times == [datetime(2018, 4, 1, 10, 0, 0, 123456), datetime(2018, 4, 1, 23, 59, 59, 999999)]


@pytest.mark.spark
def test_gzip_csv_is_read_and_a_file_of_another_kind_refuses_the_day(spark, lake: Lake, monkeypatch, capsys):
    import gzip

    from jobs.spark import clean

    _write(lake, "part-00000.csv.gz", gzip.compress(
        f"{CSV_HEADER}\n1,2018-04-01 10:00:00,1,2,5.0,0,0\n".encode()))
    assert _clean_one_day(spark, lake, monkeypatch)["clean"] == 1
    published = lake.manifest(Dataset.CLEAN, D)["attempt"]
    _write(lake, "part-00001.json", b'{"TRANSACTION_ID": 2}')
    assert clean.clean_days(spark, lake, [D]) == 1
    assert "part-00001.json" in capsys.readouterr().err
    assert lake.manifest(Dataset.CLEAN, D)["attempt"] == published  # the published day is untouched


@pytest.mark.spark
def test_a_hot_key_resolves_in_one_pass(spark, lake: Lake, monkeypatch):
    """Forty thousand distinct rows under one id (collected as sets per row this was quadratic)."""
    from jobs.common.schema import RAW_SCHEMA, QuarantineReason

    n = 40_000
    rows = {"TRANSACTION_ID": [7] * n + [8], "TX_DATETIME": [datetime(2018, 4, 1, 10)] * (n + 1),
            "CUSTOMER_ID": list(range(n)) + [1], "TERMINAL_ID": [2] * (n + 1), "TX_AMOUNT": [1.0] * (n + 1),
            "TX_FRAUD": [0] * (n + 1), "TX_FRAUD_SCENARIO": [0] * (n + 1)}
    lake.write_landing(D, pa.Table.from_pydict(rows, schema=RAW_SCHEMA))
    stats = _clean_one_day(spark, lake, monkeypatch)
    assert stats["clean"] == 1 and stats["quarantined"][QuarantineReason.CONFLICTING_DUPLICATE] == n


# --- paired outputs: both from one run, or neither new ---------------------------------------------------
def _publish_pair(lake: Lake, version: int) -> tuple[str, str]:
    quarantine, clean = lake.new_attempt(Dataset.QUARANTINE, D), lake.new_attempt(Dataset.CLEAN, D)
    table = pa.table({"v": pa.array([version] * version, pa.int64())})
    companion = lake.prepare(quarantine, files=[lake.write_parquet(quarantine, table)])
    lake.publish(clean, files=[lake.write_parquet(clean, table)], companions=[companion])
    return quarantine.attempt_id, clean.attempt_id


@pytest.mark.parametrize("stop_at", ["before_the_pair", "between_the_two_manifests"])
def test_a_writer_stopped_between_a_pair_leaves_both_old_or_both_new(lake: Lake, monkeypatch, stop_at):
    _publish_pair(lake, 1)
    writes = []
    real_write_json = Lake.write_json

    def write_json(self, path, obj):
        writes.append(path)
        if (stop_at == "before_the_pair" and len(writes) == 1) or (stop_at == "between_the_two_manifests"
                                                                  and len(writes) == 2):
            raise OSError("the writer was killed here")
        return real_write_json(self, path, obj)

    monkeypatch.setattr(Lake, "write_json", write_json)
    with pytest.raises(OSError):
        _publish_pair(lake, 2)
    monkeypatch.setattr(Lake, "write_json", real_write_json)
    seen = {ds: lake.read_table(ds, D).column("v").to_pylist() for ds in (Dataset.QUARANTINE, Dataset.CLEAN)}
    expected = [1] if stop_at == "before_the_pair" else [2, 2]
    assert seen == {Dataset.QUARANTINE: expected, Dataset.CLEAN: expected}
    # the attempt the pair names is live: collecting garbage keeps it
    live = lake.manifest(Dataset.QUARANTINE, D)["attempt"]
    lake.collect_garbage(Dataset.QUARANTINE, D)
    assert lake.read_table(Dataset.QUARANTINE, D).num_rows == len(expected)
    assert lake.manifest(Dataset.QUARANTINE, D)["attempt"] == live


# --- garbage collection never deletes the live partition ----------------------------------------------
def test_collecting_garbage_never_deletes_the_attempt_the_current_manifest_names(lake: Lake, monkeypatch):
    """Writer A publishes; before A collects garbage, writer B (whose files are seven hours old: a long
    range run, or a host clock behind the store's) publishes. A must not delete B's live attempt."""
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [0]}))
    b = lake.new_attempt(Dataset.CLEAN, D)
    record_b = lake.write_parquet(b, pa.table({"a": [2, 2]}))
    old = time.time() - 7 * 3600
    for info in lake.list_files(b.path):
        os.utime(info.path, (old, old))
    record_b["bytes"] = lake.fs.get_file_info(posixpath.join(b.path, record_b["name"])).size
    a = lake.new_attempt(Dataset.CLEAN, D)
    record_a = lake.write_parquet(a, pa.table({"a": [1]}))
    real_write_json = lake.write_json

    def manifest_then_b_publishes(path, obj):
        real_write_json(path, obj)
        if obj.get("attempt") == a.attempt_id:
            monkeypatch.setattr(lake, "write_json", real_write_json)
            lake.publish(b, files=[record_b])  # B wins the race, between A's manifest and A's clean-up

    monkeypatch.setattr(lake, "write_json", manifest_then_b_publishes)
    lake.publish(a, files=[record_a])
    assert lake.manifest(Dataset.CLEAN, D)["attempt"] == b.attempt_id
    assert lake.read_table(Dataset.CLEAN, D).column("a").to_pylist() == [2, 2]  # still readable


def test_a_reader_of_the_previous_manifest_can_finish_its_read(lake: Lake):
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [1]}))
    files = lake.partition_files(Dataset.CLEAN, D)  # a reader has read the manifest...
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [2]}))  # ...a writer replaces the partition...
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [3]}))  # ...and another, before the read
    assert all(lake.exists(p) for p in files)  # the superseded files are still there to read


def test_an_error_while_collecting_garbage_does_not_fail_a_publish(lake: Lake, monkeypatch):
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [1]}))

    def broken(*args, **kwargs):
        raise OSError("the store refused a listing")

    monkeypatch.setattr(lake, "collect_garbage", broken)
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [2]}))
    assert lake.read_table(Dataset.CLEAN, D).column("a").to_pylist() == [2]


def test_publish_refuses_a_folder_that_does_not_hold_what_was_written(lake: Lake):
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": [1]}))
    attempt = lake.new_attempt(Dataset.CLEAN, D)
    record = lake.write_parquet(attempt, pa.table({"a": [1, 2, 3]}))
    lake.fs.delete_file(posixpath.join(attempt.path, record["name"]))  # a short listing / a lost file
    with pytest.raises(lake_mod.LakeError, match="does not hold what was written"):
        lake.publish(attempt, files=[record])
    assert lake.read_table(Dataset.CLEAN, D).column("a").to_pylist() == [1]  # the old one stands


def test_an_unpublished_partition_is_still_not_empty(lake: Lake):
    with pytest.raises(NotPublished):
        lake.read_table(Dataset.FEATURES, D)


# --- the gate reads what is published, and a failed gate is not retried --------------------------------
def test_the_gate_counts_the_published_rows_not_what_the_job_said(lake: Lake, monkeypatch):
    import sys

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    sys.modules.pop("fraud_ops.gates", None)
    from fraud_ops.config import GateThresholds
    from fraud_ops.gates import DataQualityError, check_day

    limits = GateThresholds(max_quarantine_share=0.05, min_volume_ratio=0.5, max_volume_ratio=3.0, min_trailing_days=3)
    # a short partition: the job said 100 rows, the published files hold none
    lake.write_table(Dataset.QUARANTINE, D, pa.table({"reason": pa.array([], pa.string())}))
    lake.write_table(Dataset.CLEAN, D, pa.table({"a": pa.array([], pa.int64())}),
                     stats={"rows_in": 100, "clean": 100, "quarantined_total": 0})
    with pytest.raises(DataQualityError) as failed:
        check_day(lake, D, limits)
    assert "no clean rows" in str(failed.value) and "the manifest holds 0 rows, the job reported 100" in str(failed.value)


def test_a_failed_quality_gate_fails_at_once_other_errors_retry(monkeypatch, tmp_path):
    from test_dag import load_dag

    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from fraud_ops.gates import DataQualityError

    gate = load_dag().get_task("quality_gate")
    assert gate.retries >= 1
    assert gate.retry_policy.evaluate(DataQualityError("volume collapsed"), 1, gate.retries + 1).action.value == "fail"
    assert gate.retry_policy.evaluate(OSError("the store timed out"), 1, gate.retries + 1).action.value == "default"


# --- security ----------------------------------------------------------------------------------------
SECRET_NAMES = ("PASSWORD", "SECRET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AIRFLOW_ADMIN_USER")


def test_compose_refuses_to_start_without_real_secrets():
    import re

    text = (REPO / "docker-compose.yaml").read_text()
    references = re.findall(r"(?<!\$)\$\{([A-Z0-9_]+)(:[?-])?[^}]*\}", text)  # $${X} is the shell's, inside
    secret_refs = [(name, op) for name, op in references if any(s in name for s in SECRET_NAMES)]
    assert secret_refs and all(op == ":?" for _, op in secret_refs), secret_refs
    for default in ("change-me", "airflow:airflow", "fraud-secret", "POSTGRES_PASSWORD: airflow"):
        assert default not in text, default
    assert not (REPO / "deploy" / "seaweedfs-s3.json").exists()  # no committed S3 keys


def test_the_jobs_zip_is_never_taken_from_a_file_someone_else_put_there(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from fraud_ops.spark import build_jobs_zip

    honest = build_jobs_zip(out_dir=str(tmp_path))
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / os.path.basename(honest)).write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip, same name
    path = build_jobs_zip(out_dir=str(planted))
    with zipfile.ZipFile(path) as zf:
        assert "jobs/spark/clean.py" in zf.namelist()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    default = build_jobs_zip()
    folder = os.path.dirname(default)
    assert folder.startswith(str(tmp_path / "cache")) and oct(os.stat(folder).st_mode & 0o777) == "0o700"


def test_a_step_process_gets_no_airflow_secret(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from fraud_ops.runners import LocalProcessOperator

    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow:hunter2@db/airflow")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "jwt-hunter2")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", "aws://key:hunter2@")
    monkeypatch.setenv("FRAUD_SEED", "7")
    seen = tmp_path / "environment"
    probe = ("import os, sys; open(sys.argv[1], 'w').write(repr(sorted(os.environ.items())))")
    LocalProcessOperator(task_id="probe", command=["python", "-c", probe, str(seen)]).execute(context={})
    environment = dict(eval(seen.read_text()))  # noqa: S307 - our own subprocess's repr
    assert not [k for k in environment if "AIRFLOW" in k] and "hunter2" not in seen.read_text()
    assert environment["FRAUD_SEED"] == "7"  # the step's own settings do reach it


def test_local_airflow_writes_its_secrets_for_this_user_only(tmp_path):
    import stat
    import sys

    sys.path.insert(0, str(REPO / "deploy"))
    from local_airflow import LocalAirflow

    af = LocalAirflow(tmp_path / "af", (tmp_path / "lake").as_uri())
    for name in ("passwords.json", "secret.key"):
        assert stat.S_IMODE(os.stat(af.home / name).st_mode) == 0o600, name


def test_the_failure_webhook_address_is_not_logged(monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from fraud_ops import notify

    monkeypatch.setenv("FRAUD_NOTIFY_WEBHOOK_URL", "http://127.0.0.1:9/hooks/T0KEN-hunter2?secret=hunter2")
    with caplog.at_level("INFO"):
        notify.notify_failure({"exception": RuntimeError("boom")})
    assert "could not post" in caplog.text and "hunter2" not in caplog.text


def test_a_version_name_read_from_a_record_cannot_leave_the_lake(lake: Lake):
    from jobs.common.calendar import TrainingSchedule
    from jobs.torch import registry as R

    registry = R.Registry(lake, TrainingSchedule(D, every_days=7, window_days=7))
    path = lake.path("models", "registry", "decisions", "date=2018-04-15.json")
    lake.write_json(path, {"train_day": "2018-04-15", "outcome": "promoted", "champion": "../../../../etc/passwd"})
    with pytest.raises(R.RegistryError, match="not a version name"):
        registry.champion_as_of(date(2018, 4, 20))


def test_a_model_whose_bytes_changed_after_registration_is_refused(lake: Lake):
    from jobs.torch import registry as R

    registry = R.Registry(lake)
    registry.register_version("mlp-20180407-0123456789", {R.CHECKPOINT: b"registered"},
                              {"checkpoint_sha256": __import__("hashlib").sha256(b"registered").hexdigest()})
    assert registry.read_checkpoint("mlp-20180407-0123456789") == b"registered"
    lake.write_bytes(registry.version_path("mlp-20180407-0123456789", R.CHECKPOINT), b"swapped")
    with pytest.raises(R.RegistryError, match="not the one registered"):
        registry.read_checkpoint("mlp-20180407-0123456789")


def test_spark_tasks_are_given_the_store_not_its_credentials(monkeypatch):
    import pickle

    monkeypatch.setenv("FRAUD_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-hunter2")
    spec = Lake.from_uri("s3://bucket/lake").worker_filesystem()
    blob = pickle.dumps(spec)
    assert b"hunter2" not in blob and b"127.0.0.1:8333" in blob


# --- an operator's way out: resolve a training day, abandon a history day -------------------------------
SCHEDULE = {"FRAUD_FIRST_DATE": "2018-04-01", "FRAUD_TRAIN_EVERY_DAYS": "7", "FRAUD_TRAIN_WINDOW_DAYS": "7",
            "FRAUD_ALERT_K": "20", "FRAUD_MIN_FRAUD_LABELS": "1"}
T1, T2 = date(2018, 4, 15), date(2018, 4, 22)
FAST = ["--epochs", "2", "--hidden", "16"]


@pytest.fixture
def synthetic_lake(lake: Lake, monkeypatch) -> Lake:
    from datetime import timedelta

    from jobs.torch.synthetic import publish_synthetic, synthetic_features

    for name, value in SCHEDULE.items():
        monkeypatch.setenv(name, value)
    for i in range(22):
        day = date(2018, 4, 1) + timedelta(days=i)
        publish_synthetic(lake, day, synthetic_features(day, 200, cards=100))
    return lake


def test_an_operator_keeps_the_champion_for_a_training_day_and_scoring_goes_on(synthetic_lake: Lake, capsys):
    from jobs.common.cli import EXIT_WAITING
    from jobs.torch import registry as R
    from jobs.torch import score, train

    lake = synthetic_lake
    assert train.main(["--lake", lake.uri, "--date", T1.isoformat(), *FAST]) == 0
    champion = R.Registry(lake).champion_as_of(T1)["version"]
    # T2's training never succeeds: scoring T2 waits for its decision, a manual promote or not
    assert score.main(["--lake", lake.uri, "--date", T2.isoformat()]) == EXIT_WAITING
    assert R.main(["--lake", lake.uri, "resolve", "--date", T2.isoformat(), "--keep-champion",
                   "--reason", "training data of the week is being re-delivered"]) == 0
    decision = R.Registry(lake).decision(T2)
    assert decision["outcome"] == R.KEPT and decision["champion"] == champion and decision["resolved_by"] == "operator"
    assert score.main(["--lake", lake.uri, "--date", T2.isoformat()]) == 0
    assert set(lake.read_table(Dataset.SCORES, T2).column("model_version").to_pylist()) == {champion}
    # training the day afterwards leaves the operator's decision as it is
    assert train.main(["--lake", lake.uri, "--date", T2.isoformat(), *FAST]) == 0
    assert "an operator resolved this day" in capsys.readouterr().out
    assert R.Registry(lake).decision(T2) == decision


def test_two_writers_racing_to_decide_one_day_record_one_decision(synthetic_lake: Lake):
    """Two processes decide T1 at once with different outcomes: one decision stands, the other
    writer exits non-zero saying so."""
    import json
    import subprocess
    import sys

    from jobs.torch import registry as R

    lake = synthetic_lake
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.torch.registry", "--lake", lake.uri, "resolve",
                               "--date", T1.isoformat(), "--keep-champion", "--reason", f"writer {i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, _, err in results if code == 1)
    assert f"the decision of {T1} was already recorded" in loser
    recorded = R.Registry(lake).decision(T1)
    winner = next(json.loads(out) for code, out, _ in results if code == 0)
    assert recorded["reason"] == winner["reason"]


def test_an_abandoned_history_day_is_not_waited_for_and_what_skipped_it_goes_stale(synthetic_lake: Lake, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "plugins"))
    from fraud_ops.sensors import InputsSensor

    from jobs import lineage
    from jobs.common.calendar import calendar
    from jobs.common.provenance import InputRecorder
    from jobs.common.provenance import lineage as make_lineage
    from jobs.common.schema import SCORES_SCHEMA
    from jobs.torch.data import read_for_model
    from jobs.torch.model import ModelConfig

    lake = synthetic_lake
    gap, day = date(2018, 4, 12), date(2018, 4, 18)
    features_of_gap = lake.read_table(Dataset.FEATURES, gap)
    lake.fs.delete_file(posixpath.join(lake.partition_path(Dataset.FEATURES, gap), "_MANIFEST.json"))
    sensor = InputsSensor(task_id="wait_for_feature_history", steps="score", dataset=Dataset.FEATURES,
                          lake=lake.uri, day=day.isoformat())
    assert sensor.poke({}) is False  # the gate failed on the 12th: scoring the 18th waits for it
    assert lineage.main(["abandon", "--lake", lake.uri, "--step", "features", "--date", gap.isoformat(),
                         "--reason", "gate failure, landing will not be re-delivered"]) == 0
    assert sensor.poke({}) is True
    cfg = ModelConfig(kind="seq", seq_len=5, lookback_days=7)
    frame, history = read_for_model(lake, [day], cfg, calendar())  # reads the history without the gap
    assert frame.txid.size > 0 and history is not None
    inputs = InputRecorder(lake).step_inputs("score", day, calendar())
    [skipped] = [i for i in inputs if i["date"] == gap.isoformat() and i["dataset"] == Dataset.FEATURES]
    assert skipped["digest"] is None and "gate failure" in skipped["abandoned"]
    lake.write_table(Dataset.SCORES, day, SCORES_SCHEMA.empty_table(), lineage=make_lineage("score", inputs))
    assert lineage.status(lake).stale == []
    lake.write_table(Dataset.FEATURES, gap, features_of_gap)  # published after all
    [finding] = [f for f in lineage.status(lake).stale if f.dataset == Dataset.SCORES]
    assert (finding.roots[0].dataset, finding.roots[0].date, finding.roots[0].change) == (
        Dataset.FEATURES, gap.isoformat(), "appeared")
    assert lake.abandoned(Dataset.FEATURES, gap) is None  # published: no longer abandoned


# --- the report: the run record it means, and a report on a day whose steps failed ------------------------
def test_the_latest_run_record_is_the_one_written_last_and_temporary_files_are_not_records(lake: Lake):
    lake.write_run_record("score", D, "b0000000", {"status": "skipped", "reason": "no champion"})
    time.sleep(0.01)
    lake.write_run_record("score", D, "a0000000", {"status": "scored", "rows": 10})
    time.sleep(0.01)
    lake.write_run_record("score", D, "9zzzzzzz", {"status": "failed", "reason": "disk full"})
    folder = posixpath.dirname(lake.run_record_path("score", D, "x"))
    with open(posixpath.join(folder, ".tmp-0123-ffffffff.json"), "w") as f:
        f.write('{"status": "half-writ')  # another writer's temporary file
    assert lake.latest_run_record("score", D)["reason"] == "disk full"


@pytest.mark.spark
def test_the_report_runs_on_a_day_whose_clean_step_failed_and_says_why(spark, lake: Lake, monkeypatch):
    from jobs import report
    from jobs.common.schema import RAW_SCHEMA
    from jobs.spark import clean

    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")
    rows = [{"TRANSACTION_ID": 1, "TX_DATETIME": datetime(2018, 4, 1, 10), "CUSTOMER_ID": 1, "TERMINAL_ID": 2,
             "TX_AMOUNT": 5.0, "TX_FRAUD": 0, "TX_FRAUD_SCENARIO": 0}]
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA).drop_columns(["TERMINAL_ID"])
    lake.write_landing(D, table)
    lake.mark_landing_done(D)
    assert clean.clean_days(spark, lake, [D]) == 1
    assert report.main(["--lake", lake.uri, "--date", D.isoformat()]) == 0
    steps = {s["step"]: s for s in report.read_report(lake, D)["steps"]}
    assert steps["clean"]["status"] == "failed" and "TERMINAL_ID" in steps["clean"]["reason"]
    assert steps["features"]["status"] == "not run" and steps["score"]["status"] == "not run"


@pytest.mark.parametrize("store", ["file", "s3"])
def test_a_conditional_put_whose_answer_was_lost_is_not_recorded_twice(store, lake: Lake, request):
    """The client retries a create whose answer was lost; the store says "exists": the same bytes
    there are this writer's own record (one record, and the writer is told it created it); other
    bytes are another writer's."""
    target = request.getfixturevalue("s3_lake") if store == "s3" else lake
    path = target.path("models", "registry", "events", "00000000.json")
    assert target.put_if_absent(path, b'{"seq": 0, "kind": "promote"}') is True
    assert target.put_if_absent(path, b'{"seq": 0, "kind": "promote"}') is True  # the retried request
    assert target.put_if_absent(path, b'{"seq": 0, "kind": "rollback"}') is False
    assert [i.base_name for i in target.list_dir(posixpath.dirname(path))] == ["00000000.json"]
