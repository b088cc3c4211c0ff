"""A Spark standalone master and worker from the pyspark installation, on one host.

The same commands are the ``spark-master`` and ``spark-worker`` services of docker-compose.yaml;
the tests start them on 127.0.0.1 to run the Spark jobs as the DAG submits them. The worker needs
no store credentials: the task that submits an application gives its executors the store's keys
(``spark.executorEnv.*`` from a private properties file, ``fraud_ops.spark``), and the worker starts
them with those in their environment.

    python deploy/spark_standalone.py            # master on :7077 (UI :8080) and one worker; Ctrl-C stops
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def spark_class() -> str:
    """``spark-class`` beside this interpreter (a venv's pyspark), else the one on PATH."""
    beside = Path(sys.executable).with_name("spark-class")
    return str(beside) if beside.exists() else (shutil.which("spark-class") or "spark-class")


def master_command(host: str = "0.0.0.0", port: int = 7077, webui_port: int = 8080) -> list[str]:
    return [spark_class(), MASTER_CLASS, "--host", host, "--port", str(port), "--webui-port", str(webui_port)]


def worker_command(master_url: str, host: str = "0.0.0.0", cores: int = 2, memory: str = "2g",
                   work_dir: str = "/tmp/spark-work", webui_port: int = 8081) -> list[str]:
    return [spark_class(), WORKER_CLASS, "--host", host, "--cores", str(cores), "--memory", memory,
            "--work-dir", work_dir, "--webui-port", str(webui_port), master_url]


@dataclass
class StandaloneCluster:
    """One master and one worker as child processes; ``start()`` returns once the worker is registered."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 7077
    webui_port: int = 8080
    worker_webui_port: int = 8081
    cores: int = 2
    memory: str = "2g"
    env: dict[str, str] | None = None  # the worker's (and so its executors') environment
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    def start(self, timeout: float = 120.0) -> StandaloneCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.work_dir.mkdir(exist_ok=True)
        base = dict(self.env if self.env is not None else os.environ)
        base.setdefault("SPARK_LOCAL_IP", self.host)
        self._spawn("master", master_command(self.host, self.port, self.webui_port), base)
        self._wait(lambda state: state.get("status") == "ALIVE", timeout, "the master to be ALIVE")
        self._spawn("worker", worker_command(self.url, self.host, self.cores, self.memory, str(self.work_dir),
                                             self.worker_webui_port), base)  # fmt: skip
        self._wait(lambda state: any(w.get("state") == "ALIVE" for w in state.get("workers", [])), timeout,
                   "the worker to register")  # fmt: skip
        return self

    def state(self) -> dict:
        """The master's JSON status page: workers, active and completed applications."""
        with urllib.request.urlopen(f"http://{self.host}:{self.webui_port}/json/", timeout=5) as answer:
            return json.load(answer)

    def stop(self) -> None:
        for name in ("worker", "master"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"spark {name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if ready(self.state()):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.log_tail('master')}\n{self.log_tail('worker')}")


def main() -> int:
    cluster = StandaloneCluster(Path(os.environ.get("SPARK_STANDALONE_DIR", ".spark-standalone")).resolve())
    cluster.start()
    print(f"Spark master {cluster.url}, UI http://{cluster.host}:{cluster.webui_port}; Ctrl-C stops", flush=True)
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
