"""A warm Spark shared by the runs: Spark 4's Spark Connect server, started from the pyspark installation.

Each spark-submit pays a JVM start, a Python-worker start and a first-job warm-up, most of a small
day's clean or features step. A Spark Connect server pays them once: the Spark steps connect to it
as clients (``SPARK_REMOTE=sc://host:15002``, set by the DAG from the ``spark_connect`` Airflow
Connection named in ``FRAUD_SPARK_CONNECT_CONN_ID``), run the same job code, and their Python
functions (``mapInArrow``) run in the server's Python workers, which import the ``jobs`` package
of this checkout: restart the server when the code changes (``make up`` and docker-compose start
it with the rest). The server reaches the lake's store with its own environment and settings,
given here at start. spark-submit stays the path for YARN, Kubernetes and standalone clusters.

    python deploy/spark_connect.py            # server on 127.0.0.1:15002, local[2]; Ctrl-C stops
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"
DEFAULT_PORT = 15002
REPO_ROOT = Path(__file__).resolve().parent.parent


def spark_submit() -> str:
    """``spark-submit`` beside this interpreter (a venv's pyspark), else the one on PATH."""
    beside = Path(sys.executable).with_name("spark-submit")
    return str(beside) if beside.exists() else (shutil.which("spark-submit") or "spark-submit")


def local_cores(master: str) -> int | None:
    """N of ``local[N]`` (the machine's cores for ``local[*]``), None for a cluster master."""
    if not master.startswith("local"):
        return None
    inside = master[master.find("[") + 1:master.find("]")] if "[" in master else "1"
    return os.cpu_count() or 1 if inside.startswith("*") else int(inside.split(",")[0])


def server_conf(host: str, port: int, master: str, ui: bool = False) -> dict[str, str]:
    """The server's conf: where it listens, the cores its sessions report (a Connect session has no
    SparkContext to ask) and the store's ``s3a`` settings every session's reads and writes use."""
    from jobs.common.config import settings
    from jobs.spark.session import s3a_conf

    conf = {
        "spark.connect.grpc.binding.address": host,
        "spark.connect.grpc.binding.port": str(port),
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.enabled": str(ui).lower(),
        "spark.ui.showConsoleProgress": "false",
        "spark.log.level": "WARN",
        **s3a_conf(settings().s3),
    }
    cores = local_cores(master)
    if cores:
        conf["spark.default.parallelism"] = str(cores)
    return conf


def server_command(host: str = "127.0.0.1", port: int = DEFAULT_PORT, master: str = "local[2]",
                   driver_memory: str = "4g", conf: dict[str, str] | None = None, ui: bool = False) -> list[str]:
    argv = [spark_submit(), "--class", SERVER_CLASS, "--name", "fraud-spark-connect", "--master", master,
            "--driver-memory", driver_memory]
    for key, value in {**server_conf(host, port, master, ui), **(conf or {})}.items():
        argv += ["--conf", f"{key}={value}"]
    return argv


def server_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: its Python workers run this interpreter with this checkout importable."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def healthy(url: str, timeout: float = 120.0) -> bool:
    """Whether a client session on ``url`` runs a query (the port open is not enough: the server
    binds it before its sessions can plan). Asked from a child process: a Spark Connect client
    marks its process's environment as Spark Connect mode, which what this process starts next
    (spark-submit) must not inherit."""
    probe = ("import sys; from pyspark.sql import SparkSession; "
             "spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate(); "
             "sys.exit(0 if spark.range(3).count() == 3 else 1)")
    try:
        return subprocess.run([sys.executable, "-c", probe, url], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class SparkConnectServer:
    """The server as a child process; ``start()`` returns once a client query has run on it."""

    root: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    master: str = "local[2]"
    driver_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] | None = None
    ui: bool = False
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"sc://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "spark-connect.log"

    def start(self, timeout: float = 180.0) -> SparkConnectServer:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = server_command(self.host, self.port, self.master, self.driver_memory, self.conf, self.ui)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(argv, env=server_environment(self.env), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Spark Connect server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if port_open(self.host, self.port):
                break
            time.sleep(0.5)
        else:
            self.stop()
            raise TimeoutError(f"the Spark Connect server did not listen on {self.url}:\n{self.log_tail()}")
        if not healthy(self.url):
            self.stop()
            raise RuntimeError(f"the Spark Connect server on {self.url} does not run a query:\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # the JVM and its Python workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def main() -> int:
    import argparse

    from jobs.common.config import settings

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Settings: SPARK_CONNECT_HOST (127.0.0.1), "
                            "SPARK_CONNECT_PORT (15002), SPARK_CONNECT_DIR (.spark-connect), FRAUD_SPARK_MASTER, "
                            "FRAUD_SPARK_DRIVER_MEMORY and the lake's store settings.").parse_args()
    cfg = settings()
    server = SparkConnectServer(
        Path(os.environ.get("SPARK_CONNECT_DIR", ".spark-connect")).resolve(),
        host=os.environ.get("SPARK_CONNECT_HOST", "127.0.0.1"),
        port=int(os.environ.get("SPARK_CONNECT_PORT", DEFAULT_PORT)),
        master=cfg.spark_master, driver_memory=cfg.spark_driver_memory, ui=True,
    ).start()
    print(f"Spark Connect server {server.url} ({server.master}); log {server.log_path}; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop from a process manager stops the server too
    try:
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
