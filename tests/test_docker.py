"""Static checks of the Dockerfile and docker-compose.yaml (no Docker engine needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_instructions(dockerfile):
    instructions = [i for i, _ in dockerfile]
    args = dict(dockerfile)
    assert instructions[0] == "FROM" and args["FROM"] == "python:3.11-slim"
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    assert "openjdk-17-jre-headless" in runs
    assert re.search(r"torch==\$\{TORCH_VERSION\}.*--index-url.*download\.pytorch\.org/whl/\$\{TORCH_INDEX\}", runs)
    assert "-r requirements.txt -c constraints.txt" in runs
    copied = {a.split()[0] for i, a in dockerfile if i == "COPY"}
    assert {"jobs", "dags", "plugins", "requirements.txt"} <= copied
    assert any(i == "ENTRYPOINT" for i in instructions) and any(i == "USER" for i in instructions)
    env = " ".join(a for i, a in dockerfile if i == "ENV")
    assert "AIRFLOW__CORE__DAGS_FOLDER=/opt/fraud/dags" in env and "PYTHONPATH=/opt/fraud" in env


def test_dockerfile_pins_match_requirements():
    text = (REPO / "Dockerfile").read_text()
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    for path in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / path).exists(), path


def test_compose_services(compose):
    services = compose["services"]
    airflow = {"airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-init"}
    assert airflow | {"postgres", "seaweedfs"} <= set(services)
    commands = {name: services[name]["command"] for name in airflow - {"airflow-init"}}
    assert commands["airflow-api-server"][:2] == ["airflow", "api-server"]
    assert commands["airflow-scheduler"] == ["airflow", "scheduler"]
    assert commands["airflow-dag-processor"] == ["airflow", "dag-processor"]
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init and "pools set gpu" in init
    for name in airflow:
        service = services[name]
        assert service["image"] == "${FRAUD_IMAGE:-fraud-nightly:latest}"
        env = service["environment"]
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
        assert "@postgres/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-api-server:8080")
        assert env["FRAUD_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert services["seaweedfs"]["image"].startswith("chrislusf/seaweedfs")
    assert "-s3" in services["seaweedfs"]["command"]


def test_compose_gpu_reservation_on_the_task_runner(compose):
    scheduler = compose["services"]["airflow-scheduler"]
    assert scheduler["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    [device] = scheduler["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1


def test_compose_volumes_are_declared_and_mounted_paths_exist(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), (name, source)
            else:
                assert source in declared, (name, source)
            assert target.startswith("/")
    airflow_targets = {v.split(":")[1] for v in compose["services"]["airflow-scheduler"]["volumes"]}
    assert {"/opt/fraud/dags", "/opt/fraud/plugins", "/opt/fraud/jobs", "/data/lake"} <= airflow_targets


def test_ports_bound_to_localhost(compose):
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port



def test_the_image_fetches_the_spark_jars_from_the_list_make_venv_uses(dockerfile):
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    copies = [a for i, a in dockerfile if i == "COPY"]
    assert "deploy/spark-jars/pom.xml /build/pom.xml" in copies
    assert "-f /build/pom.xml dependency:copy-dependencies" in runs
    assert any(c.startswith("--from=spark-jars /build/jars/") for c in copies)
    assert "pyspark.__file__" in runs and '"jars"' in runs  # into pyspark's jars folder, as `make venv` does
    makefile = (REPO / "Makefile").read_text()
    assert "-f deploy/spark-jars/pom.xml dependency:copy-dependencies" in makefile


def test_compose_spark_cluster_runs_the_commands_the_tests_run(compose):
    import sys

    sys.path.insert(0, str(REPO / "deploy"))
    from spark_standalone import master_command, worker_command

    services = compose["services"]
    assert services["spark-master"]["command"][1:] == master_command("0.0.0.0", 7077, 8080)[1:]
    assert services["spark-worker"]["command"][1:] == worker_command("spark://spark-master:7077", "0.0.0.0", 2, "2g",
                                                                     "/tmp/spark-work", 8081)[1:]
    assert all(services[s]["command"][0] == "spark-class" for s in ("spark-master", "spark-worker"))
    conn = json.loads(services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert (conn["host"], conn["port"]) == ("spark://spark-master", 7077)
    worker_env = services["spark-worker"]["environment"]
    assert worker_env["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY:?")  # no default secret
