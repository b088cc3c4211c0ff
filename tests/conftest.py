"""Shared fixtures: a local lake, one SparkSession, and a real S3 server (SeaweedFS ``weed mini``)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))
from browser import ARTIFACTS, airflow_ui, chromium, logged_in_page, screenshot  # noqa: E402,F401 - browser fixtures
from local_services import SeaweedFS  # noqa: E402 - the deploy folder is not a package

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

S3_ACCESS_KEY = "fraud-test-key"
S3_SECRET_KEY = "fraud-test-secret-" + "0" * 8


_STARTED = time.time()


def pytest_terminal_summary(terminalreporter):
    """Where this run's browser screenshots are (they stay after the run)."""
    folders: dict[Path, int] = {}
    for shot in ARTIFACTS.rglob("*.png") if ARTIFACTS.is_dir() else ():
        if shot.stat().st_mtime >= _STARTED:
            folders[shot.parent] = folders.get(shot.parent, 0) + 1
    if folders:
        terminalreporter.write_sep("-", "browser screenshots")
        for folder, count in sorted(folders.items()):
            terminalreporter.write_line(f"{folder.relative_to(REPO)}/  ({count})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lake_uri(tmp_path: Path) -> str:
    """A fresh ``file://`` lake root for one test."""
    root = tmp_path / "lake"
    root.mkdir()
    return root.as_uri()


@pytest.fixture
def lake(lake_uri: str):
    from jobs.common.lake import Lake

    return Lake.from_uri(lake_uri)


@pytest.fixture(scope="session")
def small_inline_lake(tmp_path_factory, worker_id) -> Path:
    """The small world of ``tests/pipeline.py`` with inline labels, built once by the pipeline's own
    commands (clean, features, training days, score, report). Read-only: tests work on copies.

    One build serves every xdist worker of the run: the first to get the lock builds it in the run's
    shared temporary folder, the others wait for it (two builds side by side would each take twice
    as long on two cores)."""
    from filelock import FileLock
    from pipeline import SMALL, build, generate

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base
    folder = shared / "small-inline"
    with FileLock(str(shared / "small-inline.lock")):
        if not (folder / "BUILT").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            with pytest.MonkeyPatch.context() as mp:
                for name, value in SMALL.items():
                    mp.setenv(name, value)
                generate((folder / "lake").as_uri())
                build((folder / "lake").as_uri())
            (folder / "BUILT").touch()
    return folder / "lake"


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for the whole run (starting Spark costs seconds)."""
    os.environ.setdefault("FRAUD_SPARK_MASTER", "local[2]")
    os.environ.setdefault("FRAUD_SPARK_SHUFFLE_PARTITIONS", "4")
    os.environ.setdefault("FRAUD_SPARK_DRIVER_MEMORY", "2g")
    from pipeline import TEST_JAVA_OPTIONS

    from jobs.spark.session import get_spark

    with pytest.MonkeyPatch.context() as mp:  # the JVM started here takes the tests' driver options, children do not
        mp.setenv("PYSPARK_SUBMIT_ARGS", f"--driver-java-options {TEST_JAVA_OPTIONS} pyspark-shell")
        session = get_spark("fraud-tests")
    yield session
    session.stop()


TEST_MAX_VOLUMES = 1000


class WeedServer(SeaweedFS):
    """The tests' S3 server: SeaweedFS with the tests' identity unless told another, and room for a
    bucket per test whatever the disk's free space."""

    def __init__(self, data: Path, s3_config: Path | None = None, access_key: str = S3_ACCESS_KEY,
                 secret_key: str = S3_SECRET_KEY):
        super().__init__(data, access_key=access_key, secret_key=secret_key, s3_config=s3_config,
                         max_volumes=TEST_MAX_VOLUMES)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint on 127.0.0.1 with credentials, for the whole test session.

    Yields ``{"endpoint_url", "access_key", "secret_key"}``; stops the server afterwards.
    """
    server = WeedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the process's configuration at the test S3 server (and a fresh bucket)."""
    import boto3

    bucket = f"lake-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("FRAUD_S3_ENDPOINT_URL", s3_server["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret_key"])
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    boto3.client(
        "s3",
        endpoint_url=s3_server["endpoint_url"],
        aws_access_key_id=s3_server["access_key"],
        aws_secret_access_key=s3_server["secret_key"],
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return {**s3_server, "bucket": bucket, "lake_uri": f"s3://{bucket}/lake"}


@pytest.fixture
def s3_lake(s3_env):
    from jobs.common.lake import Lake

    return Lake.from_uri(s3_env["lake_uri"])
