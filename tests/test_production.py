"""The production parts that run on one machine, for real: Spark reading and writing an S3 lake
(``s3a://`` through hadoop-aws, the lake's own publish), a Spark standalone master and worker
running the jobs as the DAG submits them, and the master spark-submit was given being the one used.

The S3 lake is the small world of ``tests/pipeline.py`` generated into a SeaweedFS bucket and run
through the documented range commands; the directory lake it must equal is ``small_inline_lake``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

import pytest
from conftest import REPO, free_port
from pipeline import FIRST, LAST, SMALL, generate, run_step

from jobs.common import commands
from jobs.common.calendar import day_range
from jobs.common.datasets import Dataset
from jobs.common.lake import Lake

sys.path.insert(0, str(REPO / "deploy"))
sys.path.insert(0, str(REPO / "plugins"))

SPARK_OUTPUTS = (Dataset.CLEAN, Dataset.QUARANTINE, Dataset.CLEAN_LABELS, Dataset.QUARANTINE_LABELS, Dataset.FEATURES)


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
def store_env(s3_server) -> dict[str, str]:
    """The test S3 server as a process's environment names it."""
    return {"FRAUD_S3_ENDPOINT_URL": s3_server["endpoint_url"], "AWS_ACCESS_KEY_ID": s3_server["access_key"],
            "AWS_SECRET_ACCESS_KEY": s3_server["secret_key"], "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_world(s3_server, store_env):
    """The small world in a fresh bucket, cleaned and featurised by the range commands on S3."""
    import boto3

    bucket = f"prod-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], aws_access_key_id=s3_server["access_key"],
                 aws_secret_access_key=s3_server["secret_key"], region_name="us-east-1").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/lake"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {**SMALL, **store_env}.items():
            mp.setenv(name, value)
        generate(uri)
        run_step("clean", uri, FIRST, LAST)
        run_step("features", uri, FIRST, LAST)
        yield Lake.from_uri(uri)


@pytest.mark.slow
def test_spark_jobs_on_an_s3_lake_publish_what_they_publish_on_a_directory_lake(s3_world, small_inline_lake):
    directory = Lake.from_uri(small_inline_lake.as_uri())
    for day in day_range(FIRST, LAST):
        for dataset in SPARK_OUTPUTS:
            assert s3_world.manifest(dataset, day) is not None, (dataset, day)
            assert s3_world.digest(dataset, day) == directory.digest(dataset, day), (dataset, day)
    assert s3_world.manifest(Dataset.CLEAN, LAST)["rows"] == directory.manifest(Dataset.CLEAN, LAST)["rows"] > 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, store_env):
    """A standalone master and one worker on 127.0.0.1. The worker's environment has the store's
    credentials (its executors read S3 with them) but not this repository on PYTHONPATH: the jobs'
    code reaches the executors only as the DAG ships it, ``--py-files``."""
    from spark_standalone import StandaloneCluster

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(store_env)
    spark = StandaloneCluster(tmp_path_factory.mktemp("spark-standalone"), port=free_port(), webui_port=free_port(),
                              worker_webui_port=free_port(), cores=2, memory="2g", env=env)  # fmt: skip
    try:
        yield spark.start()
    finally:
        spark.stop()


@pytest.mark.slow
def test_the_dag_s_spark_operator_runs_the_jobs_on_a_standalone_cluster(s3_world, store_env, cluster, monkeypatch):
    """clean and features of LAST again, through SparkJobOperator with ``spark_default`` at the cluster:
    the executors ran on the worker, and the republished partitions equal local mode's."""
    from fraud_ops.spark import SparkJobOperator

    for name, value in {**SMALL, **store_env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", os.pathsep.join((str(Path(sys.executable).parent), os.environ["PATH"])))  # as on a worker
    monkeypatch.setenv("AIRFLOW_CONN_SPARK_DEFAULT", json.dumps(
        {"conn_type": "spark", "host": f"spark://{cluster.host}", "port": cluster.port}))
    before = {ds: s3_world.manifest(ds, LAST) for ds in SPARK_OUTPUTS}
    for job in ("clean", "features"):
        SparkJobOperator(task_id=job, job=job, lake=s3_world.uri, day=LAST.isoformat(),
                         conn_id="spark_default").execute(context={})
    for dataset, manifest in before.items():
        after = s3_world.manifest(dataset, LAST)
        assert after["attempt"] != manifest["attempt"], dataset  # published again ...
        assert s3_world.digest(dataset, LAST, after) == s3_world.digest(dataset, LAST, manifest), dataset  # ... the same
    apps = {app["name"]: app for app in cluster.state()["completedapps"]}
    assert {"fraud-clean", "fraud-features"} <= set(apps), sorted(apps)
    # each application's executors ran in the worker's work folder, one folder per application
    ran = {p.name for p in Path(cluster.work_dir).iterdir()}
    for name in ("fraud-clean", "fraud-features"):
        assert apps[name]["id"] in ran and apps[name]["cores"] > 0, apps[name]
        assert any((Path(cluster.work_dir) / apps[name]["id"]).glob("*/stderr")), name


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


def test_the_s3a_jars_are_on_spark_s_classpath_at_the_pinned_versions():
    import re

    import pyspark

    jars = {p.name for p in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    pom = (REPO / "deploy" / "spark-jars" / "pom.xml").read_text()
    hadoop = re.search(r"<hadoop.version>(.+?)</hadoop.version>", pom).group(1)
    sdk = re.search(r"<awssdk.version>(.+?)</awssdk.version>", pom).group(1)
    assert f"hadoop-client-api-{hadoop}.jar" in jars  # the connector matches the Hadoop client pyspark ships
    assert {f"hadoop-aws-{hadoop}.jar", f"bundle-{sdk}.jar"} <= jars, "run `make venv` (it fetches them with mvn)"

