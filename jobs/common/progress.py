"""Progress of long commands, shown on a terminal and nowhere else.

``with progress("score", total=len(days)) as step:`` then ``step()`` after each unit of work draws
one line on stderr, redrawn in place: the units done of the total, the time elapsed and an
estimate of the time left (``score ━━━━━━       3/10 days  0:01:05 elapsed, ~0:02:32 left``).
:func:`track` does the same for a loop. The line is drawn with ``rich.progress`` and only where a
person watches:

- stderr is a terminal (not a ``TERM=dumb`` one), or, under ``spark-submit`` (whose JVM reads the driver's stdout and stderr
  through a pipe and copies them to its own stdout), that stdout is one;
- ``FRAUD_PROGRESS`` is not ``0`` (``1`` draws it whatever the stream: tests);
- there are at least two units to count.

Anywhere else (a log file, a pipe, Airflow's task logs, pytest's capture) nothing is written, not
even a carriage return: logs keep exactly the lines they had. While the line is up, what the
command prints to stderr (and to stdout when that is the same terminal) appears above it, and the
processes it starts get ``FRAUD_PROGRESS=0``: one display at a time, the outermost one.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO, TypeVar

from jobs.common.config import PROGRESS_ENV, progress_mode

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

T = TypeVar("T")
BAR_WIDTH = 20


class Step:
    """What a :func:`progress` block counts with: ``step()`` (or ``step(n)``) after units are done,
    ``step.doing(text)`` to name the one under way. Without a display both do nothing."""

    def __init__(self, bar: Progress | None = None, task: TaskID | None = None):
        self._bar, self._task = bar, task

    def __call__(self, n: int = 1) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, n)
            self._bar.refresh()  # units are long: show the count at once, not at the next tick

    def doing(self, text: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, doing=text, refresh=True)


def clock(seconds: float) -> str:
    """``H:MM:SS``."""
    whole = max(int(round(seconds)), 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def estimate_left(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left if the units still to do take as long as those done took on average; None before
    the first one is done."""
    if done <= 0:
        return None
    return max(elapsed * (total - done) / done, 0.0)


def _spark_submit_terminal(stream: TextIO) -> str | None:
    """The terminal a spark-submit driver's ``stream`` ends up on, if it does.

    spark-submit starts the Python driver with its stdout and stderr on one pipe, which the JVM
    (the driver's parent) copies to its own stdout: what reaches a person is decided there.
    """
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return None
    try:
        if not stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode):
            return None
        parent = os.getppid()
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            if b"org.apache.spark.deploy.SparkSubmit" not in f.read():
                return None
        target = os.readlink(f"/proc/{parent}/fd/1")
    except (OSError, ValueError, AttributeError):  # no fileno, no /proc (not Linux), a closed stream
        return None
    return target if target.startswith(("/dev/pts/", "/dev/tty")) else None


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or closed (the end of a pytest run)
        return False


def _terminal_width(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.get_terminal_size(fd).columns
    except OSError:
        return None
    finally:
        os.close(fd)


def shown(stream: TextIO | None = None) -> bool:
    """Whether a display on ``stream`` (default: stderr) would be drawn: see the module's docstring."""
    mode = progress_mode()
    if mode != "auto":
        return mode == "on"
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):  # no cursor movement to redraw with
        return False
    return _isatty(stream) or _spark_submit_terminal(stream) is not None


def _same_file(a: TextIO, b: TextIO) -> bool:
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError, AttributeError):
        return a is b


def _display(label: str, total: int, unit: str, stream: TextIO) -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
    from rich.table import Column
    from rich.text import Text

    class Times(ProgressColumn):
        """``0:01:05 elapsed, ~0:02:32 left``: the estimate from the mean time of a unit so far."""

        def render(self, task) -> Text:
            if task.finished:
                return Text(f"{clock(task.finished_time or 0.0)} elapsed", style="progress.elapsed")
            elapsed = task.elapsed or 0.0
            left = estimate_left(elapsed, task.completed, task.total or 0)
            return Text(f"{clock(elapsed)} elapsed, {'~' + clock(left) if left is not None else '?'} left",
                        style="progress.remaining")

    class Doing(ProgressColumn):
        """What is under way (``step.doing``), on the line's one line: cut short when it does not fit."""

        def render(self, task) -> Text:
            return Text(task.fields.get("doing", ""), style="dim", no_wrap=True, overflow="ellipsis")

    spark_tty = None if _isatty(stream) else _spark_submit_terminal(stream)
    width = _terminal_width(spark_tty) if spark_tty else None
    console = Console(file=stream, force_terminal=True, force_interactive=True, width=width, highlight=False)
    def fixed() -> Column:  # kept whole on a narrow terminal: the bar and what is under way give way
        return Column(no_wrap=True)

    return Progress(
        TextColumn("{task.description}", table_column=fixed()),
        BarColumn(bar_width=BAR_WIDTH, table_column=Column()),
        MofNCompleteColumn(table_column=fixed()),
        TextColumn(unit, table_column=fixed()),
        Times(table_column=fixed()),
        Doing(table_column=Column()),
        console=console,
        refresh_per_second=4,
        # what the command prints goes above the line: stderr always, stdout when it is the same
        # terminal (stdout to a file or a pipe is left alone, byte for byte)
        redirect_stderr=True,
        redirect_stdout=_same_file(sys.stdout, stream),
    )


@contextmanager
def progress(label: str, total: int, unit: str = "days", stream: TextIO | None = None) -> Iterator[Step]:
    """A display of ``total`` units of work named ``label``, where one is shown (:func:`shown`);
    yields the :class:`Step` to count them with."""
    stream = sys.stderr if stream is None else stream
    if total < 2 or not shown(stream):
        yield Step()
        return
    bar = _display(label, total, unit, stream)
    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"  # the commands this one starts draw nothing of their own
    try:
        with bar:
            task = bar.add_task(label, total=total, doing="")
            yield Step(bar, task)
            bar.update(task, doing="")
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous


def track(items: Iterable[T], label: str, total: int | None = None, unit: str = "days",
          stream: TextIO | None = None) -> Iterator[T]:
    """``items`` one by one, each counted done when the loop asks for the next (``total``: how many
    there are, for an iterable without a length)."""
    if total is None:
        items = items if hasattr(items, "__len__") else list(items)
        total = len(items)  # type: ignore[arg-type]
    with progress(label, total, unit, stream) as step:
        for item in items:
            yield item
            step()
