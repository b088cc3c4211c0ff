"""Progress of long commands: drawn on a terminal (done/total, elapsed, an estimate), nothing in logs."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from jobs.common import progress as P
from jobs.common.cli import EXIT_FAILED, EXIT_OK, run_each

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DAYS = [date(2018, 4, 1) + timedelta(days=i) for i in range(3)]


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, as a person's stderr does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def auto_mode(monkeypatch):
    """What a person's shell has: no FRAUD_PROGRESS, a terminal type that can redraw a line."""
    monkeypatch.delenv("FRAUD_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def count_through(stream, total: int = 4, pause: float = 0.0) -> None:
    with P.progress("score", total=total, stream=stream) as step:
        for i in range(total):
            step.doing(f"2018-04-0{i + 1}")
            time.sleep(pause)
            step()


def test_a_stream_that_is_not_a_terminal_gets_nothing():
    log = io.StringIO()
    count_through(log)
    assert list(P.track(range(5), "bench", unit="cases", stream=log)) == [0, 1, 2, 3, 4]
    assert log.getvalue() == ""
    assert not P.shown(log)


def test_a_terminal_shows_done_of_total_elapsed_and_an_estimate():
    tty = FakeTerminal()
    count_through(tty, total=4, pause=0.02)
    out = plain(tty.getvalue())
    for done in range(5):
        assert f"{done}/4 days" in out
    assert re.search(r"0/4 days 0:00:\d\d elapsed, \? left", out)  # nothing to estimate from yet
    assert re.search(r"2/4 days 0:00:\d\d elapsed, ~0:00:\d\d left 2018-04-03", out)
    assert re.fullmatch(r"score ━+ 4/4 days 0:00:\d\d elapsed\s*", out.splitlines()[-1])  # the last frame
    assert "\r" in tty.getvalue()  # redrawn in place


def test_the_estimate_is_the_mean_time_of_a_unit_so_far():
    assert P.estimate_left(elapsed=60.0, done=2, total=10) == 240.0
    assert P.estimate_left(elapsed=60.0, done=0, total=10) is None
    assert P.estimate_left(elapsed=60.0, done=10, total=10) == 0.0
    assert P.clock(3725) == "1:02:05" and P.clock(59.6) == "0:01:00"


@pytest.mark.parametrize(("setting", "stream", "drawn"), [
    ("0", FakeTerminal, False),      # off, even on a terminal
    ("1", io.StringIO, True),        # forced on, whatever the stream
    ("auto", FakeTerminal, True),
    ("auto", io.StringIO, False),
])
def test_fraud_progress_turns_it_off_or_forces_it(monkeypatch, setting, stream, drawn):
    monkeypatch.setenv("FRAUD_PROGRESS", setting)
    out = stream()
    count_through(out)
    assert ("4/4 days" in plain(out.getvalue())) is drawn


def test_a_dumb_terminal_or_a_single_unit_gets_nothing(monkeypatch):
    tty = FakeTerminal()
    count_through(tty, total=1)
    assert tty.getvalue() == ""
    monkeypatch.setenv("TERM", "dumb")
    count_through(tty, total=4)
    assert tty.getvalue() == ""


def test_one_display_at_a_time_and_children_are_told(monkeypatch):
    monkeypatch.setenv("FRAUD_PROGRESS", "1")
    outer, inner = io.StringIO(), io.StringIO()
    with P.progress("bench", total=2, unit="cases", stream=outer) as step:
        assert os.environ["FRAUD_PROGRESS"] == "0"  # what a started command inherits
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['FRAUD_PROGRESS'])"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "0"
        count_through(inner)
        step(2)
    assert os.environ["FRAUD_PROGRESS"] == "1"  # put back
    assert inner.getvalue() == ""
    assert "2/2 cases" in plain(outer.getvalue())


def test_lines_printed_during_a_display_come_out_whole_above_it():
    tty = FakeTerminal()
    with P.progress("score", total=2, stream=tty) as step:
        print("score: 2018-04-01: 120 rows", file=sys.stderr)  # what a step logs, redirected above the line
        step(2)
    out = plain(tty.getvalue())
    assert out[out.index("score: 2018-04-01: 120 rows\n") - 1] in "\r\n"
    assert out.index("score: 2018-04-01: 120 rows") < out.rindex("2/2 days")


def test_stdout_elsewhere_is_left_alone_and_the_same_terminal_gets_it_above(monkeypatch, capsys):
    tty = FakeTerminal()
    with P.progress("quality", total=2, unit="folds", stream=tty) as step:
        print("quality: fold 2018-07-25: AUC 0.870")  # stdout captured apart: a file, a pipe
        step(2)
    assert capsys.readouterr().out == "quality: fold 2018-07-25: AUC 0.870\n"
    assert "AUC" not in tty.getvalue() and "2/2 folds" in plain(tty.getvalue())

    monkeypatch.setattr(sys, "stdout", tty)  # stdout and stderr on one terminal
    with P.progress("quality", total=2, unit="folds", stream=tty) as step:
        print("quality: fold 2018-07-25: AUC 0.870")
        step(2)
    out = plain(tty.getvalue())
    at = out.index("quality: fold 2018-07-25: AUC 0.870\n")
    assert out[at - 1] in "\r\n"  # on a line of its own, the display's line cleared for it
    assert at < out.rindex("2/2 folds")


def test_range_runs_count_days_and_name_the_days_not_done_below_the_line(monkeypatch, capsys):
    def body(day: date) -> None:
        if day == DAYS[2]:
            raise RuntimeError("no features for this day")

    # in a log (pytest's capture is not a terminal): the failure lines and nothing else
    assert run_each("score", DAYS, body) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err == ("score: failed on 2018-04-03: no features for this day\n"
                   "score: days not done: 2018-04-03\n")

    monkeypatch.setenv("FRAUD_PROGRESS", "1")
    assert run_each("score", DAYS, body) == EXIT_FAILED
    err = plain(capsys.readouterr().err)
    assert "2/3 days" in err and "3/3 days" not in err
    assert err.index("2/3 days") < err.index("score: days not done: 2018-04-03")
    assert run_each("score", DAYS, lambda day: None) == EXIT_OK
    assert "3/3 days" in plain(capsys.readouterr().err)


def test_under_spark_submit_the_terminal_is_the_jvms_stdout(monkeypatch):
    """spark-submit hands the driver a pipe and copies it to the JVM's stdout: progress is drawn when
    that is a terminal. A stand-in parent with SparkSubmit on its command line plays the JVM."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "1")
    master, slave = pty.openpty()
    try:
        for name, stdout, expect in (("org.apache.spark.deploy.SparkSubmit", slave, True),
                                     ("org.apache.spark.deploy.SparkSubmit", subprocess.DEVNULL, False),
                                     ("some.other.Parent", slave, False)):
            jvm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", name], stdout=stdout)
            try:
                monkeypatch.setattr(P.os, "getppid", lambda pid=jvm.pid: pid)
                deadline = time.monotonic() + 10
                while name.encode() not in Path(f"/proc/{jvm.pid}/cmdline").read_bytes():
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                assert P.shown(stream) is expect
            finally:
                jvm.kill()
                jvm.wait()
        monkeypatch.delenv("PYSPARK_GATEWAY_PORT")
        assert not P.shown(stream)  # a plain pipe, not spark-submit's
    finally:
        for fd in (master, slave, read_end):
            os.close(fd)
        stream.close()


def run_command(argv: list[str], stderr_on_terminal: bool, timeout: float = 120) -> tuple[str, str]:
    """Run ``argv`` with stdout on a pipe and stderr on a terminal (a pty, 120 columns) or on a pipe;
    return both outputs."""
    env = {k: v for k, v in os.environ.items() if k != "FRAUD_PROGRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if not stderr_on_terminal:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_the_generator_shows_progress_on_a_terminal_and_none_in_a_log(tmp_path):
    def datagen(name: str) -> list[str]:
        return [sys.executable, "-m", "jobs.datagen", "--lake", (tmp_path / name).as_uri(), "--start", "2018-04-01",
                "--days", "3", "--customers", "20", "--terminals", "40", "--seed", "0"]

    out, terminal = run_command(datagen("a"), stderr_on_terminal=True)
    seen = plain(terminal)
    assert re.search(r"datagen .*1/3 days 0:00:\d\d elapsed, ~0:00:\d\d left", seen), terminal
    assert re.search(r"datagen .*3/3 days 0:00:\d\d elapsed", seen), terminal
    assert "\r" in terminal and "\x1b[" in terminal

    logged_out, log = run_command(datagen("b"), stderr_on_terminal=False)
    assert log == ""  # no bar, no carriage return, no escape code
    # stdout is the same one parseable summary line either way (but for the seconds and the lake)
    for text in (out, logged_out):
        assert "\x1b" not in text and "\r" not in text
        assert re.fullmatch(r"datagen: 3 days \(2018-04-01\.\.2018-04-03\), \d+ rows, .* s -> file://\S+\n", text)
    assert re.sub(r"[\d.]+ s -> \S+", "", out) == re.sub(r"[\d.]+ s -> \S+", "", logged_out)
