"""Faults injected into real processes and a real S3 server: what a reader sees, and what a rerun makes.

* Each step's process is SIGKILLed at points of its write (its first attempt folder, its first data
  file): every published partition is then whole (the files its manifest names, with their hashes;
  a pair from one run), holds what it held or what an uninterrupted run writes, and a rerun
  converges to that.
* The S3 server is stopped in the middle of a Python-side task: the task fails with a clear error
  after bounded retries and publishes nothing half; the server comes back, the rerun succeeds.
* A read-only store and a full disk: a clear error, nothing published.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import S3_ACCESS_KEY, S3_SECRET_KEY, WeedServer
from pipeline import SMALL, SPARK_OPTIONS

from jobs.common import commands
from jobs.common.contracts import step as contract
from jobs.common.datasets import COMMITTED_BY, Dataset
from jobs.common.lake import ATTEMPT_PREFIX, MANIFEST, Lake, NotPublished

pytestmark = pytest.mark.slow

DAYS = (date(2018, 4, 13), date(2018, 4, 14))
TRAIN_DAY = date(2018, 4, 13)
PRIMARY_OF = {companion: primary for companion, primary in COMMITTED_BY.items()}


def _env(extra: dict | None = None) -> dict[str, str]:
    return commands.environment({**SMALL, **(extra or {})})


def _command(step: str, lake_uri: str) -> list[str]:
    days = (TRAIN_DAY, None) if step == "train" else DAYS
    return commands.step_command(step, commands.day_args(lake_uri, *days),
                                 spark_options=SPARK_OPTIONS if step in commands.SPARK_JOBS else ())


def _attempts(lake: Lake, datasets, days) -> set[str]:
    return {i.path for ds in datasets for d in days for i in lake.list_dir(lake.partition_path(ds, d))
            if i.base_name.startswith(ATTEMPT_PREFIX)}


def _kill_at(argv: list[str], env: dict, reached, timeout: float = 300) -> bool:
    """Run ``argv``; SIGKILL its whole process group the moment ``reached()``; True if it was still
    running then (the kill interrupted it)."""
    proc = subprocess.Popen(argv, cwd=commands.REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if reached():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            time.sleep(0.02)
        assert proc.poll() is not None, f"{argv} did not reach its kill point in {timeout}s"
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def _whole(lake: Lake, dataset: str, day: date) -> str | None:
    """The digest of a published partition after checking it is whole: every file its manifest
    names exists with that size and hash, and a pair's two halves come from one run."""
    manifest = lake.manifest(dataset, day)
    if manifest is None:
        return None
    folder = posixpath.join(lake.partition_path(dataset, day), f"{ATTEMPT_PREFIX}{manifest['attempt']}")
    for f in manifest["files"]:
        data = lake.read_bytes(posixpath.join(folder, f["name"]))
        assert (len(data), hashlib.sha256(data).hexdigest()) == (f["bytes"], f["sha256"]), (dataset, day, f)
    primary = PRIMARY_OF.get(dataset)
    if primary is not None and lake.manifest(primary, day) is not None:
        embedded = (lake._own_manifest(primary, day).get("companions") or {}).get(dataset)
        if embedded is not None:  # written together: the reader gets this run's half
            assert embedded["attempt"] == manifest["attempt"], (dataset, day)
    return lake.digest(dataset, day, manifest)


def _unpublish(lake: Lake, datasets, day: date) -> None:
    for dataset in datasets:
        path = posixpath.join(lake.partition_path(dataset, day), MANIFEST)
        if lake.exists(path):
            lake.fs.delete_file(path)


def _registry_state(lake: Lake) -> dict:
    from jobs.torch.registry import Registry

    registry = Registry(lake)
    for version in registry.versions():  # every registered version's bytes are whole
        registry.read_checkpoint(version["version"])
    decision = registry.decision(TRAIN_DAY)
    if decision is None:
        return {"decision": None}
    champion = registry.version(decision["champion"]) if decision["champion"] else None
    return {"decision": decision["outcome"], "champion": champion and champion["training_key"]}


@pytest.fixture
def built_lake(small_inline_lake: Path, tmp_path: Path) -> Lake:
    root = tmp_path / "lake"
    shutil.copytree(small_inline_lake, root)
    return Lake.from_uri(root.as_uri())


# where each process is killed: as its first attempt folder appears, or its first data file (the
# Spark steps at one point each, their JVM start costs seconds a run)
KILL_POINTS = {"clean": ("file",), "features": ("attempt",), "score": ("attempt", "file"), "train": ("attempt", "file")}


@pytest.mark.parametrize("step", list(KILL_POINTS))
def test_a_step_killed_mid_write_leaves_whole_partitions_and_a_rerun_converges(built_lake: Lake, step):
    lake = built_lake
    writes = [d for d in contract(step).writes if d != Dataset.MODELS]
    reference = {(ds, d): lake.digest(ds, d) for ds in writes for d in DAYS}
    expected_registry = _registry_state(lake)
    env = _env()
    interrupted = 0
    for point in KILL_POINTS[step]:
        # the last day as a first write (unpublished), the first as a rewrite of what is there
        _unpublish(lake, writes, DAYS[-1])
        if step == "train":
            models = lake.path("models")
            decision = posixpath.join(models, "registry", "decisions", f"date={TRAIN_DAY}.json")
            if lake.exists(decision):  # gone already if the previous kill came before it was written
                lake.fs.delete_file(decision)
            for version in os.listdir(posixpath.join(models, "versions")):  # the ones trained for the day
                record = posixpath.join(models, "versions", version, "version.json")
                if not os.path.exists(record) or json.loads(Path(record).read_text())["train_day"] == str(TRAIN_DAY):
                    shutil.rmtree(posixpath.join(models, "versions", version))
            before_versions = set(os.listdir(posixpath.join(models, "versions")))
            watched = posixpath.join(models, "versions")

            def reached(point=point, watched=watched, old=before_versions):
                found = set(os.listdir(watched)) - old
                return bool(found) if point == "attempt" else any(
                    os.path.exists(posixpath.join(watched, v, "model.pt")) for v in found)
        else:
            before = _attempts(lake, writes, DAYS)

            def reached(point=point, before=before):
                new = _attempts(lake, writes, DAYS) - before
                return bool(new) if point == "attempt" else any(lake.list_files(p) for p in new)
        interrupted += _kill_at(_command(step, lake.uri), env, reached)
        for (ds, d), digest in reference.items():
            assert _whole(lake, ds, d) in (digest, None if d == DAYS[-1] else digest), (step, point, ds, d)
        if step == "train":
            assert _registry_state(lake)["decision"] in (None, expected_registry["decision"])
    assert interrupted == len(KILL_POINTS[step]), "every kill must land while the step was writing"
    done = subprocess.run(_command(step, lake.uri), cwd=commands.REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode in (0, 99), done.stderr[-3000:]
    assert {key: _whole(lake, *key) for key in reference} == reference
    assert _registry_state(lake) == expected_registry


# --- the S3 server stops in the middle of a task ---------------------------------------------------------
SYNTHETIC_DAYS = 22
T1 = date(2018, 4, 15)
S3_SETTINGS = {"FRAUD_FIRST_DATE": "2018-04-01", "FRAUD_TRAIN_EVERY_DAYS": "7", "FRAUD_TRAIN_WINDOW_DAYS": "7",
               "FRAUD_ALERT_K": "20", "FRAUD_MIN_FRAUD_LABELS": "1"}


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """A SeaweedFS of this module's own, so stopping it leaves the session's server alone; a lake on it
    with synthetic history and a champion trained for T1."""
    import boto3

    from jobs.torch.synthetic import publish_synthetic, synthetic_features

    server = WeedServer(tmp_path_factory.mktemp("own-seaweedfs"))
    info = server.start()
    env = {**S3_SETTINGS, "FRAUD_S3_ENDPOINT_URL": info["endpoint_url"], "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=info["endpoint_url"], aws_access_key_id=S3_ACCESS_KEY,
                 aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1").create_bucket(Bucket="faults")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            lake = Lake.from_uri("s3://faults/lake")
            for i in range(SYNTHETIC_DAYS):
                day = date(2018, 4, 1) + timedelta(days=i)
                publish_synthetic(lake, day, synthetic_features(day, 200, cards=100))
            done = commands.run([sys.executable, "-m", "jobs.torch.train", "--lake", lake.uri, "--date",
                                 T1.isoformat(), "--epochs", "2", "--hidden", "16"], extra_env=env, capture=True)
            assert done.returncode == 0, done.stderr[-3000:]
            yield server, lake, env
    finally:
        server.stop()


def _task(task: str, lake: Lake, version: str) -> list[str]:
    python = [sys.executable, "-m"]
    return {
        "score": [*python, "jobs.torch.score", "--lake", lake.uri, "--date", "2018-04-20"],
        "report": [*python, "jobs.report", "--lake", lake.uri, "--date", "2018-04-20"],
        "train": [*python, "jobs.torch.train", "--lake", lake.uri, "--date", "2018-04-16", "--epochs", "2",
                  "--hidden", "16"],
        "registry": [*python, "jobs.torch.registry", "--lake", lake.uri, "promote", version, "--from", "2018-04-21",
                     "--reason", "by hand"],
    }[task]


OUTPUT = {"score": (Dataset.ALERTS, date(2018, 4, 20)), "report": (Dataset.REPORTS, date(2018, 4, 20))}
INTO_THE_TASK = (2.5, 1.5, 0.8, 0.3)  # seconds before the server stops: the first that lands mid-task


@pytest.mark.s3
@pytest.mark.parametrize("task", ["score", "report", "train", "registry"])
def test_the_s3_server_stopped_mid_task_gives_a_clear_error_and_a_rerun_succeeds(own_s3, task, monkeypatch):
    from jobs.torch.registry import Registry

    server, lake, env = own_s3
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = _task(task, lake, Registry(lake).champion_as_of(T1)["version"])
    output = OUTPUT.get(task)
    for delay in INTO_THE_TASK:
        before = lake.manifest(*output) if output else None
        proc = subprocess.Popen(argv, cwd=commands.REPO_ROOT, env=commands.environment(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        if proc.poll() is not None:  # done before the server went: too late, start it sooner
            proc.communicate()
            continue
        server.stop()
        started = time.monotonic()
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            server.start()
        failed_after = time.monotonic() - started
        if proc.returncode == 0:  # its last write was done when the server went: sooner
            continue
        break
    else:
        pytest.fail(f"{task} always finished before the server stopped")
    print(f"{task}: failed {failed_after:.1f}s after the server stopped ({delay}s into the task)")
    assert failed_after < 240, f"{task} took {failed_after:.0f}s to give up: retries are not bounded"
    text = (out + err).lower()
    assert any(word in text for word in ("connect", "curl", "unreachable", "timed out", "timeout")), text[-2000:]
    if output:  # nothing half-published: the partition is what it was, or whole and new
        assert lake.manifest(*output) == before or _whole(lake, *output) is not None
    for version in Registry(lake).versions():  # no half-registered model
        Registry(lake).read_checkpoint(version["version"])
    done = commands.run(argv, extra_env=env, capture=True)
    assert done.returncode == 0, done.stderr[-3000:]
    if output:
        assert _whole(lake, *output) is not None


# --- a store that refuses writes -----------------------------------------------------------------------
def test_a_full_disk_is_a_clear_error_and_publishes_nothing(built_lake: Lake):
    """The score step under a 1 KB file-size limit (a disk with no room for its Parquet file)."""
    lake = built_lake
    day = DAYS[-1]
    _unpublish(lake, (Dataset.SCORES, Dataset.ALERTS), day)
    argv = ["prlimit", "--fsize=1024", "--", *commands.step_command("score", commands.day_args(lake.uri, day))]
    done = subprocess.run(argv, cwd=commands.REPO_ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "File too large" in done.stderr or "No space" in done.stderr, done.stderr[-2000:]
    with pytest.raises(NotPublished):
        lake.read_table(Dataset.SCORES, day)
    assert lake.manifest(Dataset.ALERTS, day) is None


@pytest.mark.s3
def test_a_read_only_store_is_a_clear_error_and_publishes_nothing(tmp_path):
    """A SeaweedFS identity allowed to read and list only: the report fails saying so."""
    import boto3

    config = tmp_path / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "writer", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": "reader-key", "secretKey": "reader-secret-0000"}],
         "actions": ["Read", "List"]},
    ]}))
    server = WeedServer(tmp_path / "data", s3_config=config)  # makes its data folder
    info = server.start()
    try:
        boto3.client("s3", endpoint_url=info["endpoint_url"], aws_access_key_id=S3_ACCESS_KEY,
                     aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1").create_bucket(Bucket="read-only")
        writer = {**S3_SETTINGS, "FRAUD_S3_ENDPOINT_URL": info["endpoint_url"], "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                  "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_REGION": "us-east-1"}
        reader = {**writer, "AWS_ACCESS_KEY_ID": "reader-key", "AWS_SECRET_ACCESS_KEY": "reader-secret-0000"}
        from jobs.torch.synthetic import publish_synthetic, synthetic_features

        with pytest.MonkeyPatch.context() as mp:
            for name, value in writer.items():
                mp.setenv(name, value)
            lake = Lake.from_uri("s3://read-only/lake")
            day = date(2018, 4, 1)
            publish_synthetic(lake, day, synthetic_features(day, 50, cards=20))
            done = commands.run([sys.executable, "-m", "jobs.report", "--lake", lake.uri, "--date", day.isoformat()],
                                extra_env=reader, capture=True)
            assert done.returncode == 1, done.stderr[-2000:]
            assert "AccessDenied" in done.stderr or "Access Denied" in done.stderr, done.stderr[-2000:]
            assert lake.manifest(Dataset.REPORTS, day) is None
            assert lake.list_files(lake.partition_path(Dataset.REPORTS, day)) == []
    finally:
        server.stop()
