"""The production parts that run on one machine, for real: an S3 lake (SeaweedFS) reached by Spark
through ``s3a://`` and by every other step, a Spark standalone master and worker, and the store's
credentials from an Airflow AWS Connection.

The S3 lake is the small world of ``tests/pipeline.py`` in a store of this module's own whose only
identity has a secret no other place knows. The range commands publish its history up to the day
before DAY; the nightly DAG then runs DAY (a training day) under a real scheduler with the keys in
the ``aws_default`` Connection only, and ``spark_default`` at a standalone cluster whose worker
has no keys: every output equals the directory lake's (``small_inline_lake``), and the secret is
in no task log, rendered field or Spark log. Then the store is stopped in the middle of a Spark
step: a clear error within bounded retries, nothing half-published, and a rerun succeeds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import pytest
from conftest import REPO, WeedServer, free_port
from pipeline import (
    FIRST,
    LAST,
    SMALL,
    SPARK_OPTIONS,
    TEST_JAVA_OPTIONS,
    by_training_key,
    generate,
    rows,
    run_step,
)

from jobs.common import commands
from jobs.common.calendar import day_range
from jobs.common.config import S3Settings, s3_environment
from jobs.common.datasets import Dataset
from jobs.common.lake import Lake

sys.path.insert(0, str(REPO / "deploy"))
sys.path.insert(0, str(REPO / "plugins"))

SPARK_OUTPUTS = (Dataset.CLEAN, Dataset.QUARANTINE, Dataset.CLEAN_LABELS, Dataset.QUARANTINE_LABELS, Dataset.FEATURES)
DAY = date(2018, 4, 13)  # a training day of the small world (the previous one, 04-10, is decided first)
PREVIOUS_TRAINING = date(2018, 4, 10)
STORE_VARIABLES = ("FRAUD_S3_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def test_the_session_runs_on_the_master_spark_submit_was_given(tmp_path):
    probe, seen = tmp_path / "probe.py", tmp_path / "seen.json"
    probe.write_text("import json, sys\nfrom jobs.spark.session import get_spark\n"
                     "spark = get_spark('probe')\n"
                     "context = spark.sparkContext\n"
                     "json.dump([context.master, spark.conf.get('spark.driver.memory'), context.appName], open(sys.argv[1], 'w'))\n")
    done = commands.run([commands.spark_submit(), "--master", "local[1]", "--driver-memory", "600m", "--name", "submitted",
                         str(probe), str(seen)], capture=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(seen.read_text()) == ["local[1]", "600m", "submitted"]  # not FRAUD_SPARK_MASTER's local[2] and 4g


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SeaweedFS of this module's own (stopped and started again below) whose one identity has a
    recognisable secret; yields the server and its settings."""
    secret = f"conn-secret-{uuid.uuid4().hex}"
    server = WeedServer(tmp_path_factory.mktemp("prod-seaweedfs"), access_key="fraud-prod-key", secret_key=secret)
    info = server.start()
    try:
        yield server, S3Settings(endpoint_url=info["endpoint_url"], region="us-east-1", access_key=info["access_key"],
                                 secret_key=secret)
    finally:
        server.stop()


def _client(s3: S3Settings, secret: str | None = None):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint_url, aws_access_key_id=s3.access_key,
                        aws_secret_access_key=secret or s3.secret_key, region_name=s3.region)


@pytest.fixture(scope="module")
def s3_world(store):
    """The small world in a fresh bucket: landing up to LAST, and what the night of DAY reads from
    before it, published by the range commands (clean and features, the decision of 04-10)."""
    _, s3 = store
    bucket = f"prod-{uuid.uuid4().hex[:10]}"
    _client(s3).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/lake"
    with pytest.MonkeyPatch.context() as mp:  # the operator's shell; the environment is restored afterwards
        for name, value in {**SMALL, **s3_environment(s3)}.items():
            mp.setenv(name, value)
        generate(uri)
        run_step("clean", uri, FIRST, DAY - timedelta(days=1))
        run_step("features", uri, FIRST, DAY - timedelta(days=1))
        run_step("train", uri, PREVIOUS_TRAINING)
    return Lake.from_uri(uri, s3)


@pytest.mark.slow
def test_spark_jobs_on_an_s3_lake_publish_what_they_publish_on_a_directory_lake(s3_world, small_inline_lake):
    directory = Lake.from_uri(small_inline_lake.as_uri())
    for day in day_range(FIRST, DAY - timedelta(days=1)):
        for dataset in SPARK_OUTPUTS:
            assert s3_world.manifest(dataset, day) is not None, (dataset, day)
            assert s3_world.digest(dataset, day) == directory.digest(dataset, day), (dataset, day)
    assert s3_world.manifest(Dataset.CLEAN, FIRST)["rows"] == directory.manifest(Dataset.CLEAN, FIRST)["rows"] > 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A standalone master and one worker on 127.0.0.1. The worker's environment has neither the
    store's keys (its executors get them from the task that submits) nor this repository on
    PYTHONPATH (the jobs' code reaches the executors only as the DAG ships it, ``--py-files``)."""
    from spark_standalone import StandaloneCluster

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and k not in STORE_VARIABLES}
    spark = StandaloneCluster(tmp_path_factory.mktemp("spark-standalone"), port=free_port(), webui_port=free_port(),
                              worker_webui_port=free_port(), cores=2, memory="2g", env=env)  # fmt: skip
    try:
        yield spark.start()
    finally:
        spark.stop()


@pytest.fixture(scope="module")
def airflow_on_s3(s3_world, store, cluster, tmp_path_factory):
    """Scheduler, API server and DAG processor (SQLite, LocalExecutor) for the S3 lake. Nothing in
    their environment names the store: its endpoint and keys are in the ``aws_default``
    Connection, added through the REST API as a user adds it in the UI."""
    from local_airflow import LocalAirflow

    _, s3 = store
    extra = {
        **SMALL,
        "FRAUD_POKE_SECONDS": "2", "FRAUD_SENSOR_MODE": "poke", "FRAUD_RETRIES": "0", "FRAUD_WAIT_TIMEOUT_HOURS": "1",
        "FRAUD_SPARK_CONF": json.dumps({"spark.driver.extraJavaOptions": TEST_JAVA_OPTIONS,
                                        "spark.executor.extraJavaOptions": TEST_JAVA_OPTIONS,
                                        "spark.executor.memory": "1g"}),
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": f"spark://{cluster.host}",
                                                  "port": cluster.port}),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # only the run asked for
    }  # fmt: skip
    af = LocalAirflow(tmp_path_factory.mktemp("airflow-s3"), s3_world.uri, parallelism=2, extra_env=extra)
    for name in STORE_VARIABLES:
        af.env.pop(name, None)
    try:
        af.init()
        af.start("api-server", "dag-processor", "scheduler")
        af.wait_ready()
        status, body = af.api("POST", "/connections", {
            "connection_id": "aws_default", "conn_type": "aws", "login": s3.access_key, "password": s3.secret_key,
            "extra": json.dumps({"endpoint_url": s3.endpoint_url, "region_name": s3.region})})  # fmt: skip
        assert status == 201, body
        af.wait_for_dag("fraud_nightly")
        yield af
    finally:
        af.stop()


def _everything_written(af, cluster) -> dict[Path, str]:
    """Every log and file Airflow and the Spark cluster wrote, but the metadata database (it holds
    the Connection: that is where the secret belongs)."""
    roots = [af.home, Path(cluster.root)]
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.name.startswith("airflow.db")]
    return {p: p.read_text(errors="replace") for p in files}


@pytest.mark.slow
def test_the_nightly_dag_runs_on_the_s3_lake_with_the_store_from_a_connection(
        airflow_on_s3, s3_world, store, cluster, small_inline_lake):
    from jobs.torch.registry import Registry

    af, (_, s3) = airflow_on_s3, store
    with pytest.raises(Exception, match="(?i)denied|signature|invalid"):  # the store checks its keys
        _client(s3, secret="not-the-secret").list_objects_v2(Bucket=s3_world.uri.split("/")[2])
    backfill = af.backfill("fraud_nightly", "--from-date", DAY.isoformat(), "--to-date", DAY.isoformat())
    [run] = af.wait_for_backfill("fraud_nightly", backfill, timeout=1500)
    tasks = {t["task_id"]: t for t in af.task_instances("fraud_nightly", run["dag_run_id"])}
    assert run["state"] == "success", {k: t["state"] for k, t in tasks.items()}
    assert {"wait_for_landing", "clean", "features", "train", "score", "report"} <= {
        k for k, t in tasks.items() if t["state"] == "success"}

    # the outputs equal the directory lake's, built by the range commands in local mode
    directory = Lake.from_uri(small_inline_lake.as_uri())
    for dataset in SPARK_OUTPUTS:
        assert s3_world.digest(dataset, DAY) == directory.digest(dataset, DAY), dataset
    for dataset in (Dataset.SCORES, Dataset.ALERTS):
        got, want = by_training_key(s3_world, rows(s3_world, dataset, DAY)), by_training_key(directory, rows(directory, dataset, DAY))
        assert len(got) == len(want) > 0, dataset
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys() and all(
                abs(v - w[k]) <= 1e-6 if isinstance(v, float) else v == w[k] for k, v in g.items()), (dataset, g, w)
    decided, reference = Registry(s3_world).decision(DAY), Registry(directory).decision(DAY)
    assert decided["outcome"] == reference["outcome"]
    assert s3_world.is_published(Dataset.REPORTS, DAY)

    # the Spark steps ran on the cluster's worker, which has no keys: the task handed them over
    apps = {app["name"]: app for app in cluster.state()["completedapps"]}
    assert {"fraud-clean", "fraud-features"} <= set(apps), sorted(apps)
    for name in ("fraud-clean", "fraud-features"):
        assert apps[name]["cores"] > 0 and any((Path(cluster.work_dir) / apps[name]["id"]).glob("*/stderr")), apps[name]

    # the secret is in no log, no file the run left and no rendered field
    written = _everything_written(af, cluster)
    assert any("clean" in p.parts or "task_id=clean" in str(p) for p in written), sorted(written)[:20]  # task logs read
    leaked = [str(p) for p, text in written.items() if s3.secret_key in text]
    assert not leaked, leaked
    rendered = {k: t.get("rendered_fields") for k, t in tasks.items()}
    assert s3_world.uri in json.dumps(rendered["clean"]) and s3_world.uri in json.dumps(rendered["score"])
    assert s3.secret_key not in json.dumps(rendered)
    assert s3.secret_key not in json.dumps(run.get("conf"))


def _spark_step(lake: Lake, s3: S3Settings, day: date) -> subprocess.Popen:
    argv = commands.step_command("clean", commands.day_args(lake.uri, day), spark_options=SPARK_OPTIONS)
    return subprocess.Popen(argv, cwd=commands.REPO_ROOT, env=commands.environment({**SMALL, **s3_environment(s3)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _attempt_written(lake: Lake, s3: S3Settings, day: date) -> bool:
    bucket, prefix = lake.base.split("/", 1)
    try:
        listed = _client(s3).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{Dataset.QUARANTINE}/date={day}/attempt=")
    except Exception:  # noqa: BLE001 - the store may be going away
        return False
    return listed.get("KeyCount", 0) > 0


@pytest.mark.slow
def test_the_store_stopped_in_the_middle_of_a_spark_step(s3_world, store, small_inline_lake, monkeypatch):
    """The clean step of LAST: once its first file is in the store, the store stops. The step
    fails within its bounded retries naming the connection, publishes nothing, and once the store
    is back a rerun publishes what the directory lake holds."""
    server, s3 = store
    day = LAST
    assert s3_world.manifest(Dataset.CLEAN, day) is None
    proc = _spark_step(s3_world, s3, day)
    deadline = time.monotonic() + 300
    while not _attempt_written(s3_world, s3, day) and proc.poll() is None:
        assert time.monotonic() < deadline, "the clean step never wrote a file"
        time.sleep(0.05)
    assert proc.poll() is None, "the clean step finished before the store stopped"
    server.stop()
    stopped = time.monotonic()
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        failed_after = time.monotonic() - stopped
        server.start()
    print(f"clean failed {failed_after:.1f}s after the store stopped")
    assert proc.returncode != 0, out[-2000:]
    assert failed_after < 240, f"{failed_after:.0f}s to give up: the retries are not bounded"
    said = out + err  # spark-submit passes the Python driver's stderr on as its stdout
    assert re.search(rf"clean: failed on {day}: \S*Error: .*(?i:connect|unreachable|refused|timed? ?out)", said), said[-3000:]
    assert f"clean: days not done: {day}" in said, said[-3000:]
    for dataset in SPARK_OUTPUTS[:4]:  # nothing half-published
        assert s3_world.manifest(dataset, day) is None, dataset
    for name, value in {**SMALL, **s3_environment(s3)}.items():
        monkeypatch.setenv(name, value)
    run_step("clean", s3_world.uri, day)  # the store is back: the rerun publishes the day whole
    directory = Lake.from_uri(small_inline_lake.as_uri())
    for dataset in SPARK_OUTPUTS[:4]:
        assert s3_world.digest(dataset, day) == directory.digest(dataset, day), dataset


def test_a_deployment_creates_the_lake_s_bucket_through_the_connection(store):
    """What docker-compose's airflow-init runs: the bucket of FRAUD_LAKE_URI, created once, with the
    store reached through the AWS Connection alone."""
    _, s3 = store
    bucket = f"deploy-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in commands.environment().items() if k not in STORE_VARIABLES}
    env.update(FRAUD_LAKE_URI=f"s3://{bucket}/lake", AIRFLOW_CONN_AWS_DEFAULT=json.dumps({
        "conn_type": "aws", "login": s3.access_key, "password": s3.secret_key,
        "extra": {"endpoint_url": s3.endpoint_url, "region_name": s3.region}}))
    said = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(REPO / "deploy" / "ensure_bucket.py")], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        said.append(done.stdout.strip().splitlines()[-1])
    assert said == [f"bucket {bucket} created", f"bucket {bucket} exists"]
    assert bucket in {b["Name"] for b in _client(s3).list_buckets()["Buckets"]}


def test_an_s3_lake_gives_spark_the_endpoint_and_never_the_keys(monkeypatch):
    from jobs.common.config import settings
    from jobs.spark.session import s3a_conf

    monkeypatch.setenv("FRAUD_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-hunter2")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-hunter2")
    conf = s3a_conf(settings().s3)
    assert conf["spark.hadoop.fs.s3a.endpoint"] == "http://127.0.0.1:8333"
    assert conf["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "false"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith("EnvironmentVariableCredentialsProvider")
    assert "hunter2" not in json.dumps(conf)


def test_the_executors_keys_go_in_a_private_properties_file_beside_spark_s_defaults(tmp_path, monkeypatch):
    from fraud_ops.spark import executor_environment_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    defaults = tmp_path / "spark-defaults.conf"
    defaults.write_text("spark.eventLog.enabled true\n")
    with executor_environment_file({"AWS_SECRET_ACCESS_KEY": "s3cr3t\\x"}, defaults) as path:
        assert os.stat(path).st_mode & 0o777 == 0o600
        text = Path(path).read_text()
    assert not Path(path).exists()  # removed once spark-submit is done
    assert "spark.eventLog.enabled true" in text  # what spark-submit would have read without the file
    assert "spark.executorEnv.AWS_SECRET_ACCESS_KEY=s3cr3t\\\\x" in text  # a properties file's escaping
    with executor_environment_file({}, defaults) as path:
        assert path is None  # no keys (a directory lake, a role): spark-submit reads its defaults itself


def test_the_s3a_jars_are_on_spark_s_classpath_at_the_pinned_versions():
    import pyspark

    jars = {p.name for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    pom = (REPO / "deploy" / "spark-jars" / "pom.xml").read_text()
    hadoop = re.search(r"<hadoop.version>(.+?)</hadoop.version>", pom).group(1)
    sdk = re.search(r"<awssdk.version>(.+?)</awssdk.version>", pom).group(1)
    assert f"hadoop-client-api-{hadoop}.jar" in jars  # the connector matches the Hadoop client pyspark ships
    assert {f"hadoop-aws-{hadoop}.jar", f"bundle-{sdk}.jar"} <= jars, "run `make venv` (it fetches them with mvn)"
