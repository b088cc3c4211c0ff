"""Static checks of the Dockerfile and docker-compose.yaml (no Docker engine here): pinned bases, unprivileged
users, secrets without defaults, and the compose services running the commands and settings the tests run.

The compose file is read the way Docker Compose reads it: by compose-go (``deploy/compose-check``, built
here with Go), which checks it against the compose specification, interpolates the variables and
resolves the merge keys and profiles."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_SECRET_KEY", "AIRFLOW_FERNET_KEY", "AIRFLOW_ADMIN_USER",
           "AIRFLOW_ADMIN_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
AIRFLOW_SERVICES = {"airflow-api-server": "api-server", "airflow-scheduler": "scheduler",
                    "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer",
                    "airflow-worker": "celery-worker"}
OWN_IMAGES = ("${FRAUD_IMAGE:-fraud-nightly:latest}", "${FRAUD_TRAINER_IMAGE:-fraud-trainer:latest}")


@pytest.fixture(scope="module")
def compose_check(tmp_path_factory) -> Path:
    """The compose-go loader, built from deploy/compose-check (its modules pinned by go.sum)."""
    binary = tmp_path_factory.mktemp("compose-check") / "compose-check"
    built = subprocess.run(["go", "build", "-o", str(binary), "."], cwd=REPO / "deploy" / "compose-check",
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    return binary


def load_compose(compose_check: Path, env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("FRAUD_", "AIRFLOW"))}
    return subprocess.run([str(compose_check), str(REPO / "docker-compose.yaml"), *profiles], env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def raw() -> str:
    return (REPO / "docker-compose.yaml").read_text()


@pytest.fixture(scope="module")
def compose(compose_check) -> dict:
    """The project as compose resolves it with every secret set (a recognisable value for each) and the
    gpu profile on."""
    loaded = load_compose(compose_check, {name: f"<{name}>" for name in SECRETS}, "gpu")
    assert loaded.returncode == 0, loaded.stderr
    return json.loads(loaded.stdout)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _stages(dockerfile) -> dict[str, list[tuple[str, str]]]:
    stages, name = {}, None
    for instruction, args in dockerfile:
        if instruction == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else args
            stages[name] = []
        elif name is not None:
            stages[name].append((instruction, args))
    return stages


def test_the_images_build_from_one_pinned_base(dockerfile):
    [base] = [a.split("=", 1)[1] for i, a in dockerfile if i == "ARG" and a.startswith("PYTHON_IMAGE=")]
    assert base.startswith("python:3.11-slim-bookworm@") and DIGEST.search(base), base  # bookworm: OpenJDK 17
    froms = [a for i, a in dockerfile if i == "FROM"]
    assert all(f.startswith(("${PYTHON_IMAGE}", "base ")) for f in froms), froms
    assert set(_stages(dockerfile)) == {"spark-jars", "base", "airflow", "trainer"}


def test_the_airflow_image(dockerfile):
    stage = _stages(dockerfile)["airflow"]
    runs = " ".join(a for i, a in stage if i == "RUN")
    assert "openjdk-17-jre-headless" in runs
    assert re.search(r"torch==\$\{TORCH_VERSION\}.*--index-url https://download\.pytorch\.org/whl/cpu", runs)
    assert "-r requirements.txt -c constraints.txt" in runs
    copied = {a.split()[0] for i, a in stage if i == "COPY"}
    assert {"jobs", "dags", "plugins", "deploy", "requirements.txt"} <= copied
    assert ("USER", "airflow") in stage
    env = " ".join(a for i, a in dockerfile if i == "ENV")
    assert "AIRFLOW__CORE__DAGS_FOLDER=/opt/fraud/dags" in env and "PYTHONPATH=/opt/fraud" in env


def test_the_trainer_image_is_cuda_torch_and_runs_unprivileged(dockerfile):
    stage = _stages(dockerfile)["trainer"]
    args = dict((a.split("=", 1)[0], a.split("=", 1)[1]) for i, a in stage if i == "ARG" and "=" in a)
    assert args["TORCH_INDEX"].startswith("cu")
    runs = " ".join(a for i, a in stage if i == "RUN")
    assert re.search(r"torch==\$\{TORCH_VERSION\}.*whl/\$\{TORCH_INDEX\}", runs)
    assert "-r requirements.txt -c constraints.txt" in runs
    assert ("USER", "airflow") in stage
    base = " ".join(a for i, a in _stages(dockerfile)["base"] if i == "RUN")
    assert "useradd --uid" in base and ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in _stages(dockerfile)["base"]


def test_dockerfile_pins_match_requirements():
    text = (REPO / "Dockerfile").read_text()
    torch_pin = re.search(r"^torch==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert text.count(f"ARG TORCH_VERSION={torch_pin}") == 2
    for path in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / path).exists(), path


def test_the_image_fetches_the_spark_jars_from_the_list_make_venv_uses(dockerfile):
    runs = " ".join(a for i, a in dockerfile if i == "RUN")
    copies = [a for i, a in dockerfile if i == "COPY"]
    assert "deploy/spark-jars/pom.xml /build/pom.xml" in copies
    assert "-f /build/pom.xml dependency:copy-dependencies" in runs
    assert any(c.startswith("--from=spark-jars /build/jars/") for c in copies)
    # into pyspark's jars folder, and the install's spark-defaults.conf into its conf folder, as `make venv` does
    assert "pyspark.__file__" in runs and '"$home/jars/"' in runs and '"$home/conf/"' in runs
    assert "deploy/spark-conf/spark-defaults.conf /tmp/spark-defaults.conf" in copies
    makefile = (REPO / "Makefile").read_text()
    assert "-f deploy/spark-jars/pom.xml dependency:copy-dependencies" in makefile
    assert 'cp deploy/spark-conf/spark-defaults.conf "$$home/conf/"' in makefile


def test_compose_refuses_to_start_without_every_secret(raw, compose_check):
    for name in SECRETS:
        loaded = load_compose(compose_check, {n: "x" for n in SECRETS if n != name})
        assert loaded.returncode != 0 and f"required variable {name} is missing a value" in loaded.stderr, (name, loaded)
        assert not re.search(rf"\$\{{{name}:-", raw), f"{name} has a default"


def test_compose_images_are_pinned_and_users_unprivileged(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        assert image in ("fraud-nightly:latest", "fraud-trainer:latest") or DIGEST.search(image), (name, image)
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), (name, user)


def test_compose_airflow_runs_what_the_celery_profile_runs(compose):
    from local_airflow import celery_environment, component_command

    services = compose["services"]
    for service, component in AIRFLOW_SERVICES.items():
        assert services[service]["command"] == component_command(component, 8080), service
    for name in [*AIRFLOW_SERVICES, "airflow-init", "airflow-worker-gpu"]:
        env = services[name]["environment"]
        expected = celery_environment(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__CELERY__BROKER_URL"],
                                      int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]))
        assert {k: env[k] for k in expected} == expected, name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://airflow:<POSTGRES_PASSWORD>@postgres/airflow"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:<REDIS_PASSWORD>@redis:6379/0"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith("http://airflow-api-server:8080")
    init = " ".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init and "pools set gpu" in init and "deploy/ensure_bucket.py" in init
    assert (REPO / "deploy" / "ensure_bucket.py").exists()


def test_compose_store_keys_reach_airflow_only_as_a_connection(compose):
    services = compose["services"]
    for name in [*AIRFLOW_SERVICES, "airflow-init", "airflow-worker-gpu", "spark-master", "spark-worker"]:
        env = services[name].get("environment") or {}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), name
        assert "<AWS_SECRET_ACCESS_KEY>" not in json.dumps(services[name].get("command")), name
    connection = json.loads(services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_AWS_DEFAULT"])
    assert connection["conn_type"] == "aws"
    assert (connection["login"], connection["password"]) == ("<AWS_ACCESS_KEY_ID>", "<AWS_SECRET_ACCESS_KEY>")
    assert connection["extra"]["endpoint_url"] == "http://seaweedfs:8333"
    assert services["airflow-scheduler"]["environment"]["FRAUD_LAKE_URI"].startswith("s3://")
    spark = json.loads(services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert (spark["host"], spark["port"]) == ("spark://spark-master", 7077)


def test_compose_seaweedfs_runs_the_tests_server_command(compose):
    from local_services import weed_mini_command

    service = compose["services"]["seaweedfs"]
    flags = dict(re.match(r"-([\w.]+)=(.*)", a).groups() for a in service["command"][2:] if "=" in a)
    ports = {name: int(flags[f"{name}.port"]) for name in ("s3", "master", "filer", "volume", "webdav", "admin")}
    assert service["command"] == weed_mini_command("weed", "/data", ports, ip="seaweedfs", bind="0.0.0.0")
    assert ports["s3"] == 8333
    assert set(service["environment"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_compose_spark_cluster_runs_the_commands_the_tests_run(compose):
    from spark_standalone import master_command, worker_command

    services = compose["services"]
    assert services["spark-master"]["command"][1:] == master_command("0.0.0.0", 7077, 8080)[1:]
    assert services["spark-worker"]["command"][1:] == worker_command("spark://spark-master:7077", "0.0.0.0", 2, "2g",
                                                                     "/tmp/spark-work", 8081)[1:]
    assert all(services[s]["command"][0] == "spark-class" for s in ("spark-master", "spark-worker"))


def test_compose_gpu_worker_behind_the_gpu_profile(compose):
    services = compose["services"]
    gpu = services["airflow-worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"] == "fraud-trainer:latest"
    assert gpu["command"] == ["airflow", "celery", "worker", "--queues", "gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert all("profiles" not in s for n, s in services.items() if n != "airflow-worker-gpu")  # the rest always runs
    assert services["airflow-scheduler"]["environment"]["FRAUD_TORCH_QUEUE"] == "default"


def test_compose_volumes_are_named_and_ports_bound_to_localhost(compose):
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            assert volume["type"] == "volume" and volume["source"] in declared, (name, volume)  # no host folders
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)


def test_both_torch_images_compile_the_history_loops_into_a_cache_their_user_owns(dockerfile):
    """numba caches the compiled history loops on disk: each image compiles them at build time, as
    the user its steps run as, into ``NUMBA_CACHE_DIR`` (created for that user in the base), so a
    step loads them instead of compiling them in every container."""
    env = " ".join(a for i, a in dockerfile if i == "ENV")
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", env).group(1)
    base = " ".join(a for i, a in _stages(dockerfile)["base"] if i == "RUN")
    assert '"${NUMBA_CACHE_DIR}"' in base.split("mkdir -p", 1)[1].split("&&")[0]
    assert '"${NUMBA_CACHE_DIR}"' in base.split("chown -R", 1)[1]
    assert cache.startswith("/") and not cache.startswith("/opt/fraud")  # not in the source tree the build copies
    for name in ("airflow", "trainer"):
        stage = _stages(dockerfile)[name]
        user = stage.index(("USER", "airflow"))
        compiled = [n for n, (i, a) in enumerate(stage) if i == "RUN" and "compile_history_loops()" in a]
        assert compiled and compiled[0] > user, name  # as the steps' user, after the code is copied
        assert max(n for n, (i, a) in enumerate(stage) if i == "COPY") < compiled[0]
