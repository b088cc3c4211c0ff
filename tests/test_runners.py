"""What each torch runner hands to Airflow (no Docker engine or cluster needed), and the local runner for real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

ARGS = ["--lake", "s3://bucket/lake", "--date", "2018-05-02", "--k", "100"]
COMMAND = ["python", "-m", "jobs.torch.score", *ARGS]


def _cfg(monkeypatch, runner: str, **env):
    from fraud_ops.config import orchestration

    monkeypatch.setenv("FRAUD_TORCH_RUNNER", runner)
    monkeypatch.setenv("FRAUD_IMAGE", "registry.example/fraud:1.2.3")
    monkeypatch.setenv("FRAUD_FIRST_DATE", "2018-04-01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "must-not-leak")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return orchestration()


def _score(cfg, **kwargs):
    from fraud_ops.runners import torch_task

    return torch_task("score", "score", ARGS, cfg, lake="s3://bucket/lake", skip_on_exit_code=99, **kwargs)


def test_local_runner(monkeypatch):
    from fraud_ops.runners import LocalProcessOperator

    op = _score(_cfg(monkeypatch, "local"))
    assert isinstance(op, LocalProcessOperator)
    assert op.command == COMMAND
    assert op.pool == "gpu"
    assert 99 in op.skip_on_exit_code


def test_docker_runner(monkeypatch):
    from airflow.providers.docker.operators.docker import DockerOperator

    op = _score(_cfg(monkeypatch, "docker", FRAUD_GPU_COUNT="2"), file_lake_uri="file:///data/lake")
    assert isinstance(op, DockerOperator)
    assert op.image == "registry.example/fraud:1.2.3"
    assert op.command == COMMAND
    assert op.environment["FRAUD_FIRST_DATE"] == "2018-04-01"
    assert "AWS_SECRET_ACCESS_KEY" not in op.environment
    [request] = op.device_requests
    assert request["Count"] == 2 and request["Capabilities"] == [["gpu"]]
    assert [(m["Source"], m["Target"]) for m in op.mounts] == [("/data/lake", "/data/lake")]
    assert op.skip_on_exit_code == [99] or 99 in op.skip_on_exit_code
    assert op.pool == "gpu"


def test_docker_runner_without_gpu(monkeypatch):
    op = _score(_cfg(monkeypatch, "docker", FRAUD_GPU_COUNT="0"))
    assert op.device_requests is None


STORE_CONNECTION = {"conn_type": "aws", "login": "AKIA-FROM-CONNECTION", "password": "secret-from-connection-4711",
                    "extra": {"endpoint_url": "http://store.example:8333", "region_name": "eu-west-3"}}
STORE_ENV = {"FRAUD_S3_ENDPOINT_URL": "http://store.example:8333", "AWS_REGION": "eu-west-3",
             "AWS_ACCESS_KEY_ID": "AKIA-FROM-CONNECTION", "AWS_SECRET_ACCESS_KEY": "secret-from-connection-4711"}


def _connection(monkeypatch, conn_id: str = "aws_default") -> None:
    import json

    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(STORE_CONNECTION))


def test_the_store_comes_from_the_aws_connection(monkeypatch):
    from fraud_ops.store import store_environment, store_settings

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("FRAUD_S3_ENDPOINT_URL", "http://worker.example:1")
    assert store_settings("file:///data/lake") is None  # a directory lake reads no Connection
    without = store_settings("s3://bucket/lake")  # no Connection: the worker's own environment
    assert (without.access_key, without.secret_key, without.endpoint_url) == ("worker-key", "worker-secret",
                                                                             "http://worker.example:1")
    _connection(monkeypatch)
    assert store_environment("s3://bucket/lake") == STORE_ENV
    monkeypatch.setenv("FRAUD_AWS_CONN_ID", "lake_store")
    _connection(monkeypatch, "lake_store")
    monkeypatch.delenv("AIRFLOW_CONN_AWS_DEFAULT")
    assert store_environment("s3://bucket/lake") == STORE_ENV


def test_the_local_process_gets_the_store_in_its_environment(monkeypatch, tmp_path):
    import json
    from unittest import mock

    from fraud_ops.runners import LocalProcessOperator

    _connection(monkeypatch)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    seen = tmp_path / "env.json"
    op = LocalProcessOperator(
        task_id="p", lake="s3://bucket/lake",
        command=["python", "-c", f"import json, os; json.dump(dict(os.environ), open({str(seen)!r}, 'w'))"])
    op.execute({"ti": mock.MagicMock()})
    env = json.loads(seen.read_text())
    assert {k: env.get(k) for k in STORE_ENV} == STORE_ENV
    assert not any(k.startswith("AIRFLOW_CONN_") for k in env)  # the Connection itself stays with Airflow
    assert "secret-from-connection" not in json.dumps(op.command)


def test_the_container_gets_the_store_privately(monkeypatch):
    from airflow.providers.docker.operators.docker import DockerOperator

    _connection(monkeypatch)
    op = _score(_cfg(monkeypatch, "docker"))
    assert "AWS_SECRET_ACCESS_KEY" not in op.environment and "lake" in op.template_fields
    handed = {}
    monkeypatch.setattr(DockerOperator, "execute", lambda self, context: handed.update(self._private_environment))
    op.execute({})
    assert handed == STORE_ENV
    assert not {"_private_environment", "private_environment"} & set(op.template_fields)


class _SecretsApi:
    """The two calls of Kubernetes' CoreV1Api that write a Secret, answering as a cluster does."""

    def __init__(self):
        self.secrets: dict[tuple[str, str], dict] = {}

    def replace_namespaced_secret(self, name, namespace, body):
        from kubernetes.client.rest import ApiException

        if (namespace, name) not in self.secrets:
            raise ApiException(status=404)
        self.secrets[namespace, name] = body.string_data

    def create_namespaced_secret(self, namespace, body):
        self.secrets[namespace, body.metadata.name] = body.string_data


def test_the_pod_reads_the_store_from_a_secret_the_task_writes(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    _connection(monkeypatch)
    op = _score(_cfg(monkeypatch, "kubernetes", FRAUD_K8S_NAMESPACE="fraud"))
    assert op.env_from == []  # nothing the cluster provides: the task writes the Secret
    api = _SecretsApi()
    op.__dict__["client"] = api
    pods = []
    monkeypatch.setattr(KubernetesPodOperator, "execute", lambda self, context: pods.append(self.build_pod_request_obj(dry_run=True)))
    op.execute({})
    assert api.secrets == {("fraud", "fraud-store-aws-default"): STORE_ENV}
    [pod] = pods
    [container] = pod.spec.containers
    assert [e.secret_ref.name for e in container.env_from] == ["fraud-store-aws-default"]
    assert "secret-from-connection" not in str(pod.to_dict())  # the values are in the Secret only
    STORE_CONNECTION["password"] = "rotated-secret-0815"
    try:
        _connection(monkeypatch)
        op.env_from = []
        op.execute({})  # a rotated key updates the Secret
    finally:
        STORE_CONNECTION["password"] = "secret-from-connection-4711"
    assert api.secrets["fraud", "fraud-store-aws-default"]["AWS_SECRET_ACCESS_KEY"] == "rotated-secret-0815"


def test_kubernetes_runner(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    cfg = _cfg(
        monkeypatch,
        "kubernetes",
        FRAUD_K8S_NAMESPACE="fraud",
        FRAUD_K8S_NODE_SELECTOR='{"gpu": "a100"}',
        FRAUD_K8S_SECRET="fraud-lake-credentials",
    )
    op = _score(cfg)
    assert isinstance(op, KubernetesPodOperator)
    assert op.image == "registry.example/fraud:1.2.3"
    assert op.cmds + op.arguments == COMMAND
    assert op.namespace == "fraud"
    assert op.container_resources.limits == {"nvidia.com/gpu": "1"}
    assert op.node_selector == {"gpu": "a100"}
    assert [(t.key, t.effect) for t in op.tolerations] == [("nvidia.com/gpu", "NoSchedule")]
    assert op.env_from[0].secret_ref.name == "fraud-lake-credentials"
    env = op.env_vars if isinstance(op.env_vars, dict) else {e.name: e.value for e in op.env_vars}
    assert env["FRAUD_FIRST_DATE"] == "2018-04-01" and "AWS_SECRET_ACCESS_KEY" not in env
    assert 99 in op.skip_on_exit_code
    assert op.pool == "gpu"


def test_same_command_in_every_mode(monkeypatch):
    commands = {}
    for runner in ("local", "docker", "kubernetes"):
        op = _score(_cfg(monkeypatch, runner))
        commands[runner] = op.command if runner != "kubernetes" else op.cmds + op.arguments
    assert commands["local"] == commands["docker"] == commands["kubernetes"] == COMMAND


def test_training_on_several_gpus_goes_through_torchrun(monkeypatch):
    from fraud_ops.runners import torch_task

    cfg = _cfg(monkeypatch, "docker", FRAUD_TRAIN_PROCESSES="4", FRAUD_TORCH_QUEUE="gpu")
    train = torch_task("train", "train", ["--lake", "s3://bucket/lake", "--date", "2018-05-02"], cfg, lake="s3://bucket/lake")
    assert train.command[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert train.command[6:] == ["jobs.torch.train", "--lake", "s3://bucket/lake", "--date", "2018-05-02"]
    assert train.queue == "gpu"
    assert _score(cfg).command == COMMAND  # scoring is one process


def test_the_store_s_keys_go_only_to_executors_that_keep_them_to_themselves():
    from fraud_ops.spark import executors_take_keys_from_the_task

    assert executors_take_keys_from_the_task("spark://master:7077", "client")  # the worker's executors
    assert not executors_take_keys_from_the_task("local[2]", None)  # the driver is the executor: no file
    assert not executors_take_keys_from_the_task("spark://master:7077", "cluster")  # a driver on the cluster
    assert not executors_take_keys_from_the_task("yarn", "client")  # launch scripts on the NodeManagers
    assert not executors_take_keys_from_the_task("k8s://https://api:6443", "cluster")  # the driver's ConfigMap


def test_unknown_runner_is_refused(monkeypatch):
    from fraud_ops.config import orchestration

    monkeypatch.setenv("FRAUD_TORCH_RUNNER", "ssh")
    with pytest.raises(ValueError, match="FRAUD_TORCH_RUNNER"):
        orchestration()


def test_local_process_skip_and_failure(tmp_path):
    """Exit 99 becomes a skip with the job's last line as the reason; another code fails."""
    from unittest import mock

    from airflow.sdk.exceptions import AirflowException, AirflowSkipException
    from fraud_ops.runners import LocalProcessOperator

    ti = mock.MagicMock()
    skip = LocalProcessOperator(
        task_id="s", command=["python", "-c", "print('no champion as of 2018-04-02'); raise SystemExit(99)"],
        skip_on_exit_code=99,
    )  # fmt: skip
    with pytest.raises(AirflowSkipException, match="no champion as of 2018-04-02"):
        skip.execute({"ti": ti})
    ti.xcom_push.assert_called_once_with(key="skip_reason", value="no champion as of 2018-04-02")
    fail = LocalProcessOperator(
        task_id="f", command=["python", "-c", "raise SystemExit(3)"], skip_on_exit_code=99
    )
    with pytest.raises(AirflowException, match="exited 3"):
        fail.execute({"ti": ti})
    ok = LocalProcessOperator(task_id="o", command=["python", "-c", "import jobs.common.config"])
    assert ok.execute({"ti": ti}) is None


def test_jobs_zip_is_deterministic(tmp_path):
    import zipfile

    from fraud_ops.spark import build_jobs_zip

    first, second = build_jobs_zip(out_dir=str(tmp_path)), build_jobs_zip(out_dir=str(tmp_path))
    assert first == second
    names = zipfile.ZipFile(first).namelist()
    assert "jobs/__init__.py" in names and "jobs/common/lake.py" in names
    assert not any("__pycache__" in n for n in names)


def test_gate_verdicts():
    from fraud_ops.config import GateThresholds
    from fraud_ops.gates import evaluate

    limits = GateThresholds(max_quarantine_share=0.05, min_volume_ratio=0.5, max_volume_ratio=3.0, min_trailing_days=3)
    ok = evaluate({"rows_in": 1000, "clean": 990, "quarantined_total": 10}, [1000] * 7, limits)
    assert ok["passed"], ok
    bad_share = evaluate({"rows_in": 1000, "clean": 900, "quarantined_total": 100}, [1000] * 7, limits)
    assert not bad_share["passed"] and "quarantine share" in bad_share["failures"][0]
    collapsed = evaluate({"rows_in": 300, "clean": 300, "quarantined_total": 0}, [1000] * 7, limits)
    assert "volume collapsed" in collapsed["failures"][0]
    empty = evaluate({"rows_in": 0, "clean": 0, "quarantined_total": 0}, [], limits)
    assert "no clean rows" in empty["failures"][0]
    young = evaluate({"rows_in": 300, "clean": 300, "quarantined_total": 0}, [1000, 1000], limits)
    assert young["passed"]  # too little history to judge volume


def test_gate_on_a_lake(lake, monkeypatch):
    import pyarrow as pa
    from fraud_ops.config import gate_thresholds
    from fraud_ops.gates import DataQualityError, check_day

    from jobs.common.lake import Dataset

    for day in ("2018-04-01", "2018-04-02", "2018-04-03"):
        lake.write_table(Dataset.CLEAN, day, pa.table({"x": list(range(100))}),
                         stats={"rows_in": 100, "clean": 100, "quarantined_total": 0})
    lake.write_table(Dataset.QUARANTINE, "2018-04-04", pa.table({"x": list(range(80))}))
    lake.write_table(Dataset.CLEAN, "2018-04-04", pa.table({"x": list(range(20))}),
                     stats={"rows_in": 100, "clean": 20, "quarantined_total": 80})
    assert check_day(lake, "2018-04-03", gate_thresholds())["passed"]
    with pytest.raises(DataQualityError, match="quarantine share 80.00%"):
        check_day(lake, "2018-04-04", gate_thresholds())
    assert len(lake.list_files(lake.path("_runs", "quality_gate"))) == 2


def test_notify_posts_to_webhook(monkeypatch):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from unittest import mock

    from fraud_ops.notify import notify_failure

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    monkeypatch.setenv("FRAUD_NOTIFY_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    ti = mock.MagicMock(task_id="clean", dag_id="fraud_nightly", try_number=3)
    notify_failure({"ti": ti, "dag_run": mock.MagicMock(run_id="r1"), "exception": RuntimeError("boom")})
    server.server_close()
    assert received and received[0]["task_id"] == "clean" and received[0]["error"] == "boom"
    monkeypatch.setenv("FRAUD_NOTIFY_WEBHOOK_URL", "http://127.0.0.1:1/unreachable")
    notify_failure({"ti": ti})  # never raises
