"""Run Airflow locally on 127.0.0.1: for `make up`, the demo and tests.

Two profiles. ``embedded`` (the default): SQLite metadata and the LocalExecutor, nothing else to
run. ``celery``: the distributed parts of a production deployment on one machine, PostgreSQL
metadata, a Redis broker and a Celery worker (servers from ``local_services.py``), with the same
component commands docker-compose runs.

``LocalAirflow(home)`` builds the environment (DAGs and plugins of this repo, the lake, a
``spark_default`` connection to ``local[2]``, a ``gpu`` pool, simple-auth user ``admin``), migrates
the metadata database once, starts the components as child processes and talks to the REST API
(``/api/v2``, JWT from ``/auth/token``). It drives the ``airflow`` CLI, it does not import Airflow.

``main()`` (`make up`) leaves ``fraud_nightly`` paused while the lake has no landing for the night
its schedule would run now (:func:`schedule_state`), and says how to go on.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADMIN_USER = "admin"
SQLITE_BUSY_TIMEOUT_MS = 30_000

# Written to $AIRFLOW_HOME/config/airflow_local_settings.py after the database is migrated (Airflow
# imports it before it builds the metadata engine, in every component and CLI command).
#
# Why: Airflow 3.3 opens SQLite in WAL mode with pysqlite's default transaction handling and a 5 s
# busy timeout. `airflow backfill create` (and POST /api/v2/backfills, same code) creates each run
# inside a SAVEPOINT, which starts a deferred SQLite transaction: it reads (is there a run for this
# date?) and then writes. If the scheduler commits between that read and that write, the read
# snapshot is stale and SQLite answers SQLITE_BUSY at once ("database is locked"; the busy timeout
# is not consulted for a stale snapshot). Airflow then deletes the runs it had already created, which
# the scheduler may be scheduling: the scheduler dies with ObjectDeletedError.
#
# Fix: in the backfill command, transactions begin IMMEDIATE (the write lock is taken before the first
# read: SQLAlchemy's documented pysqlite recipe), so it waits its turn instead of failing; every
# process waits up to 30 s for the lock instead of 5 s. Only the backfill command gets BEGIN
# IMMEDIATE: long-lived components open a second connection while a session is open (db migrate
# does), which would wait on itself if every transaction held the write lock.
SQLITE_LOCAL_SETTINGS = f'''"""Written by deploy/local_airflow.py: SQLite lock handling of the local Airflow (see there)."""
import os as _os
import sys as _sys

from sqlalchemy import create_engine as _create_engine
from sqlalchemy import event as _event

__all__ = ["create_metadata_engine"]


def _begin_immediate_wanted():
    return _os.environ.get("FRAUD_SQLITE_BEGIN_IMMEDIATE") == "1" or _sys.argv[1:2] == ["backfill"]


def create_metadata_engine(sql_alchemy_conn, *, engine_args, connect_args):
    engine = _create_engine(sql_alchemy_conn, connect_args=connect_args, **engine_args)
    if engine.dialect.name != "sqlite":
        return engine
    immediate = _begin_immediate_wanted()

    @_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        dbapi_connection.execute("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if immediate:
            dbapi_connection.isolation_level = None  # pysqlite stops emitting its own BEGIN

    if immediate:

        @_event.listens_for(engine, "begin")
        def _begin_immediate(connection):
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
'''


def write_secret(path: Path, text: str) -> None:
    """Write a secret readable by this user only (0600 from the start, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(roots: list[int]) -> set[int]:
    """Pids of all live descendants of ``roots`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def component_command(name: str, port: int = 8080) -> list[str]:
    """The command line of one Airflow component, here and in docker-compose."""
    return {
        "api-server": ["airflow", "api-server", "--port", str(port)],
        "scheduler": ["airflow", "scheduler"],
        "dag-processor": ["airflow", "dag-processor"],
        "triggerer": ["airflow", "triggerer"],
        "celery-worker": ["airflow", "celery", "worker"],
    }[name]


def celery_environment(database_url: str, broker_url: str, concurrency: int) -> dict[str, str]:
    """Airflow on PostgreSQL with the Celery executor: what the ``celery`` profile and docker-compose set."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        # Celery keeps task results in the metadata database, through the same SQLAlchemy URL
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
    }


# Task slots of `make up`: on a warm Spark the Spark tasks are clients (the work is in the server) and
# the sensors' resumes take a second, so four slots on two cores keep the cores busy in a backfill.
LOCAL_SLOTS = 4


def spark_connect_environment(address: str) -> dict[str, str]:
    """The Spark steps on the Spark Connect server at ``host:port``, through the Connection
    ``spark_connect_default``: what ``make up`` and docker-compose set."""
    host, _, port = address.rpartition(":")
    return {
        "FRAUD_SPARK_CONNECT_CONN_ID": "spark_connect_default",
        "AIRFLOW_CONN_SPARK_CONNECT_DEFAULT": json.dumps({"conn_type": "spark_connect", "host": host,
                                                          "port": int(port)}),
    }


class LocalAirflow:
    def __init__(
        self,
        home: Path,
        lake_uri: str,
        port: int | None = None,
        parallelism: int = 2,
        extra_env: dict[str, str] | None = None,
        password: str | None = None,
        celery: tuple[str, str] | None = None,
        spark_connect: str | None = None,
    ):
        """``celery``: (database URL, broker URL) for the distributed profile; SQLite and the
        LocalExecutor without it. ``spark_connect``: ``host:port`` of a Spark Connect server the
        Spark steps run on (``spark_connect_default``); a spark-submit each without it."""
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = password or secrets.token_urlsafe(12)
        self.procs: dict[str, subprocess.Popen] = {}
        bin_dir = Path(sys.executable).parent
        passwords = self.home / "passwords.json"
        write_secret(passwords, json.dumps({ADMIN_USER: self.password}))
        secret_file = self.home / "secret.key"
        if not secret_file.exists():
            write_secret(secret_file, secrets.token_urlsafe(32))
        secret = secret_file.read_text()
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
            "PYSPARK_PYTHON": sys.executable,
            "PYSPARK_DRIVER_PYTHON": sys.executable,
            "FRAUD_LAKE_URI": lake_uri,
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            # the launcher's DAG is unpaused at once: without this the scheduler would start every
            # night since FRAUD_FIRST_DATE beside the runs asked for (set it to true to see catch-up)
            "FRAUD_CATCHUP": os.environ.get("FRAUD_CATCHUP", "false"),
            # a waiting sensor's trigger looks at the lake every 2 s, not every 30 s: on a local lake a look
            # is a file listing, and a backfill's next night starts that much sooner after the one it waits for
            "FRAUD_POKE_SECONDS": os.environ.get("FRAUD_POKE_SECONDS", "2"),
            # a task's slot is free within 1 s of its end, not 5: the supervisor otherwise notices its
            # process's exit only at its next heartbeat wake-up
            "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
            # plugins/fraud_preload.py loaded when each process starts: the tasks forked from the
            # scheduler's workers find the task runner and the DAG file's imports already loaded
            "AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secret,
            "AIRFLOW__API_AUTH__JWT_SECRET": secret,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
            **(celery_environment(*celery, concurrency=parallelism) if celery else {}),
            **(spark_connect_environment(spark_connect) if spark_connect else {}),
            **(extra_env or {}),
        }

    # --- set-up --------------------------------------------------------------------------------
    def airflow(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["airflow", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc

    def init(self) -> None:
        """Migrate the metadata database (once per home) and create the gpu pool."""
        stamp = self.home / ".migrated"  # which database was migrated (a fresh server's is empty again)
        database = self.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        if not stamp.exists() or stamp.read_text() != database:
            self.airflow("db", "migrate")
            write_secret(stamp, database)
        config_dir = self.home / "config"
        config_dir.mkdir(exist_ok=True)
        (config_dir / "airflow_local_settings.py").write_text(SQLITE_LOCAL_SETTINGS)
        pool = self.env.get("FRAUD_GPU_POOL", "gpu")
        slots = self.env.get("FRAUD_GPU_POOL_SLOTS", "1")
        self.airflow("pools", "set", pool, slots, "GPU tasks (train, score)")

    # --- processes -----------------------------------------------------------------------------
    def start(self, *components: str) -> None:
        for name in components:
            if name in self.procs:
                continue
            argv = component_command(name, self.port)
            if name == "api-server":
                argv += ["--host", "127.0.0.1", "--workers", "1"]
            log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
            self.procs[name] = subprocess.Popen(
                argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def stop(self) -> None:
        """Stop every component and every process they started (task processes run in their own
        process groups, e.g. a spark-submit under the LocalExecutor, so killing the groups of the
        components is not enough)."""
        descendants = _descendants([p.pid for p in self.procs.values()])
        for _name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _name, proc in self.procs.items():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in descendants | _descendants(list(descendants)):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    def crash(self, name: str) -> dict[int, str]:
        """SIGKILL a component with every process under it, as a host or container going down does;
        returns their pids and command lines, all gone when this returns. The tree is frozen first
        (SIGSTOP), so no process escapes by being started, or re-parented, while it is killed."""
        import psutil  # an Airflow dependency

        root = psutil.Process(self.procs.pop(name).pid)
        tree: dict[int, psutil.Process] = {}
        while new := [p for p in (root, *root.children(recursive=True)) if p.pid not in tree]:
            for p in new:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.suspend()
                tree[p.pid] = p
        commands = {}
        for pid, p in tree.items():
            with contextlib.suppress(psutil.Error):
                commands[pid] = " ".join(p.cmdline())
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(tree.values(), timeout=30)
        if alive:
            raise RuntimeError(f"processes of {name} still alive after SIGKILL: {[p.pid for p in alive]}")
        return commands

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited ({proc.returncode}):\n{self.log_tail(name)}")

    # --- REST API ------------------------------------------------------------------------------
    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"API server not ready in {timeout}s:\n{self.log_tail('api-server')}")

    def token(self) -> str:
        body = json.dumps({"username": ADMIN_USER, "password": self.password}).encode()
        req = urllib.request.Request(
            f"{self.url}/auth/token", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """Call ``/api/v2<path>``; returns (HTTP status, JSON body) without raising on 4xx."""
        if not hasattr(self, "_token"):
            self._token = self.token()
        req = urllib.request.Request(
            f"{self.url}/api/v2{path}",
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"},
            method=method,
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def set_paused(self, dag_id: str, paused: bool) -> None:
        status, body = self.api("PATCH", f"/dags/{dag_id}", {"is_paused": paused})
        if status != 200:
            raise RuntimeError(f"PATCH /dags/{dag_id} answered {status}: {body}")

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.api("GET", f"/dags/{dag_id}")
            if status == 200:
                return body
            time.sleep(2)
        _, errors = self.api("GET", "/importErrors")
        raise RuntimeError(f"DAG {dag_id} not parsed in {timeout}s; import errors: {errors}")

    def dag_runs(self, dag_id: str) -> list[dict]:
        status, body = self.api("GET", f"/dags/{dag_id}/dagRuns?limit=100&order_by=logical_date")
        assert status == 200, body
        return body["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        from urllib.parse import quote

        status, body = self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances?limit=100")
        assert status == 200, body
        return body["task_instances"]

    def backfill(self, dag_id: str, *args: str) -> int:
        """``airflow backfill create --dag-id <dag_id> <args>`` as a user types it, while the scheduler
        runs; returns the new backfill's id."""
        before = {b["id"] for b in self.backfills(dag_id)}
        self.airflow("backfill", "create", "--dag-id", dag_id, *args)
        created = [b for b in self.backfills(dag_id) if b["id"] not in before]
        if len(created) != 1:
            raise RuntimeError(f"expected one new backfill, found {created}")
        return created[0]["id"]

    def backfills(self, dag_id: str) -> list[dict]:
        status, body = self.api("GET", f"/backfills?dag_id={dag_id}&limit=100")
        if status != 200:
            raise RuntimeError(f"GET /backfills answered {status}: {body}")
        return body["backfills"]

    def wait_for_backfill(self, dag_id: str, backfill_id: int, timeout: float) -> list[dict]:
        """Wait until the scheduler marks the backfill completed and every run of the DAG is
        finished; return the DAG's runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.api("GET", f"/backfills/{backfill_id}")
            if status != 200:
                raise RuntimeError(f"GET /backfills/{backfill_id} answered {status}: {body}")
            runs = self.dag_runs(dag_id)
            if body["completed_at"] and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            time.sleep(3)
        runs = [(r["dag_run_id"], r["state"]) for r in self.dag_runs(dag_id)]
        raise TimeoutError(f"backfill {backfill_id} not done in {timeout}s: {runs}\n{self.log_tail('scheduler')}")

    def wait_for_runs(self, dag_id: str, count: int, timeout: float) -> list[dict]:
        """Wait until ``count`` runs exist and all are finished; return them."""
        deadline = time.monotonic() + timeout
        runs: list[dict] = []
        while time.monotonic() < deadline:
            self._check_alive()
            runs = self.dag_runs(dag_id)
            if len(runs) >= count and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            time.sleep(5)
        raise TimeoutError(f"runs not finished in {timeout}s: {[(r['run_id'], r['state']) for r in runs]}")


LATE_LANDING_DAYS = 2  # a lake whose newest landing is this recent is a live one whose night is late


def missing_night(lake_uri: str, now: datetime | None = None) -> tuple[date, list[date]] | None:
    """The night the nightly schedule would run at ``now`` (the last complete UTC day) when the
    lake has no landing for it, with the landing days the lake has; None when it has that night.

    A demo lake holds days of 2018: unpaused, the schedule would start a run for yesterday at once,
    and that run would wait on its landing sensor for data that never comes."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from jobs.common.datasets import Dataset
    from jobs.common.lake import Lake

    night = (now or datetime.now(UTC)).astimezone(UTC).date() - timedelta(days=1)
    lake = Lake.from_uri(lake_uri)
    if lake.landing_ready(night):
        return None
    return night, [d for d in lake.partition_dates(Dataset.LANDING) if lake.landing_ready(d)]


def schedule_state(af: LocalAirflow, lake_uri: str, dag_id: str = "fraud_nightly", now: datetime | None = None) -> str:
    """Before the scheduler starts: pause the DAG when the lake holds only old days (its newest
    landing more than ``LATE_LANDING_DAYS`` before the night the schedule would run now: a demo or
    history lake), so no run is created for a night that will never land. A live lake whose night
    is merely late keeps its schedule (the landing sensor waits for it). Only a pause made here is
    undone here (a marker in the Airflow home): an operator's own pause stays. Returns what to tell
    the user."""
    marker = af.home / "paused-by-launcher"

    def pause(message: str) -> str:
        af.set_paused(dag_id, True)
        marker.write_text(message + "\n")
        return message

    try:
        missing = missing_night(lake_uri, now)
    except Exception as exc:  # noqa: BLE001 - an unreadable lake: hold the schedule, say why
        return pause(f"DAG {dag_id} is paused: the lake could not be read ({exc}); unpause it in the UI once it can.")
    night = (missing or (None,))[0]
    days = (missing or (None, []))[1]
    live = missing is None or (days and days[-1] >= night - timedelta(days=LATE_LANDING_DAYS))
    if live:
        if marker.exists():  # this launcher paused it for an old lake: the lake is live now
            af.set_paused(dag_id, False)
            marker.unlink()
        state = "paused (by you: unpause it in the UI)" if af.api("GET", f"/dags/{dag_id}")[1].get("is_paused") \
            else "on its schedule"
        if missing is None:
            return f"DAG {dag_id} runs {state}: the lake has the landing of the latest night."
        return (f"DAG {dag_id} runs {state}: the landing of {night} is not there yet (newest: {days[-1]}); "
                "its run waits for it on the landing sensor.")
    held = f"{days[0]} .. {days[-1]}" if days else "none"
    example = days[-1] if days else "YYYY-MM-DD"
    where = "this UI" if af.home.resolve() == (REPO / ".airflow").resolve() else "the UI of `make up` (.airflow/)"
    return pause(
        f"DAG {dag_id} is paused: its schedule would now run the night of {night}, which the lake has no "
        f"landing for\n(landing days in the lake: {held}): that run would only wait on its sensor.\n"
        f"  to run a night of the lake now: `make run DATE={example}` (airflow dags test; the run shows in {where})\n"
        f"  to schedule: unpause {dag_id} (its toggle, or `airflow dags unpause {dag_id}`) once the lake gets "
        "each day's landing.\n  While it is paused, runs you trigger and backfills wait; unpaused, they run, "
        "and the latest night starts at once.")


def main() -> int:
    """``python deploy/local_airflow.py``: start Airflow on this machine (what `make up` runs)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--home", default=str(REPO / ".airflow"))
    parser.add_argument("--lake", default=os.environ.get("FRAUD_LAKE_URI") or (REPO / ".lake").as_uri())
    parser.add_argument("--port", type=int, default=int(os.environ.get("FRAUD_AIRFLOW_PORT", "8080")))
    parser.add_argument("--profile", choices=("embedded", "celery"), default="embedded",
                        help="embedded: SQLite and the LocalExecutor; celery: PostgreSQL, Redis and a Celery worker")
    parser.add_argument("--spark", choices=("connect", "submit"), default="connect",
                        help="connect: the Spark steps share a warm Spark Connect server started here (default); "
                             "submit: a spark-submit each")
    args = parser.parse_args()
    home = Path(args.home) if args.profile == "embedded" else Path(f"{args.home}-{args.profile}")
    password_file = home / "admin.password"
    password = password_file.read_text().strip() if password_file.exists() else secrets.token_urlsafe(12)
    home.mkdir(parents=True, exist_ok=True)
    write_secret(password_file, password)
    services, celery = [], None
    if args.profile == "celery":
        from local_services import Postgres, Redis

        database_password = home / "postgres.password"  # the data folder outlives a run: so does its password
        if not database_password.exists():
            write_secret(database_password, secrets.token_urlsafe(16))
        services = [Postgres(home / "postgres", password=database_password.read_text()).start(),
                    Redis(home / "redis").start()]
        celery = (services[0].sqlalchemy_url, services[1].url)
    connect = None
    if args.spark == "connect":
        from spark_connect import DEFAULT_PORT, SparkConnectServer

        print("starting the Spark Connect server the Spark steps share ...", flush=True)
        port = int(os.environ.get("SPARK_CONNECT_PORT", DEFAULT_PORT))
        connect = SparkConnectServer(home / "spark-connect", port=port, env={**os.environ, "FRAUD_LAKE_URI": args.lake},
                                     driver_memory=os.environ.get("FRAUD_SPARK_DRIVER_MEMORY", "4g")).start()
        services.append(connect)
    af = LocalAirflow(home, args.lake, port=args.port, password=password, celery=celery, parallelism=LOCAL_SLOTS,
                      spark_connect=f"{connect.host}:{connect.port}" if connect else None)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped by a process manager: stop what was started
    try:
        af.init()
        af.start("api-server", "dag-processor")
        af.wait_ready()
        af.wait_for_dag("fraud_nightly")
        schedule = schedule_state(af, args.lake)  # before the scheduler, which would start the latest night
        af.start("scheduler", "triggerer", *(["celery-worker"] if celery else []))
        print(f"\nAirflow ({args.profile}) is up: {af.url}  (user {ADMIN_USER}; the password is in {password_file})")
        print(f"DAG fraud_nightly: {af.url}/dags/fraud_nightly   lake: {args.lake}")
        print(f"reports: {af.url}/fraud-reports/ (\"Fraud reports\" in the UI's menu; \"Report\" and \"Alert list\" "
              "on the score and report tasks)")
        print(schedule)
        if connect:
            print(f"Spark: the steps run on the Spark Connect server {connect.url} (log {connect.log_path})")
        print(f"logs: {home}/*.log   stop with Ctrl-C")
        while True:
            af._check_alive()
            time.sleep(5)
    except KeyboardInterrupt:
        pass
    finally:
        af.stop()
        for service in reversed(services):
            getattr(service, "close", service.stop)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
