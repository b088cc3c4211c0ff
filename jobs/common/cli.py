"""The command line every job shares: ``--lake URI`` and ``--date D`` or ``--start D1 --end D2``.

Exit codes (the DAG reads them): 0 done; 1 failed (the message names the days not done); 75
waiting (an input partition or an earlier decision is not there yet: nothing was written for the
days named, run again later); 99 no champion model yet (scoring skipped, with the reason recorded).
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import date

from jobs.common.calendar import day_range, format_days, parse_day
from jobs.common.config import settings
from jobs.common.progress import progress

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_WAITING = 75  # EX_TEMPFAIL
EXIT_NO_CHAMPION = 99


class Waiting(RuntimeError):
    """An input is not published yet (or an earlier decision is missing): retry later."""


RAISED = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt): ")


def error_summary(error: BaseException | str) -> str:
    """The one line that says what went wrong. An error raised inside a Spark task reaches the driver
    wrapped ("An exception was thrown from the Python worker:", then the worker's traceback): there
    the line that names it is the traceback's last ``SomeError: ...`` line."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else "unknown error"
    lines = text.splitlines()
    if "Traceback (most recent call last)" in text:
        raised = [line.strip() for line in lines if RAISED.match(line.strip())]
        if raised:
            return raised[-1]
    return lines[0]


def day_parser(prog: str, description: str, ranges: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--lake", default=None, help="lake root URI (default: FRAUD_LAKE_URI)")
    parser.add_argument("--date", type=parse_day, help="the day D to process")
    if ranges:
        parser.add_argument("--start", type=parse_day, help="first day of an inclusive range")
        parser.add_argument("--end", type=parse_day, help="last day of an inclusive range")
    return parser


def parse_days(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, then set ``args.days`` (the days in date order) and ``args.lake`` (with its default)."""
    args = parser.parse_args(argv)
    start, end = getattr(args, "start", None), getattr(args, "end", None)
    if args.date and (start or end):
        parser.error("give either --date or --start/--end, not both")
    if args.date:
        args.days = [args.date]
    elif start and end:
        if end < start:
            parser.error(f"--end {end} is before --start {start}")
        args.days = day_range(start, end)
    else:
        parser.error("give --date D or --start D1 --end D2" if hasattr(args, "start") else "give --date D")
    args.lake = args.lake or settings().lake_uri
    return args


def batches(days: Sequence, size: int) -> list[list]:
    """``days`` (in date order) cut into consecutive runs of at most ``size``: a range run works on
    one at a time, so what it holds at once does not grow with the range."""
    return [list(days[i:i + size]) for i in range(0, len(days), size)]


def not_done(step: str, days: Sequence[date], error: BaseException | str, failed_on: date | None = None,
             code: int = EXIT_FAILED, lake=None) -> int:
    """Say what failed and which days are not done (the range can be rerun from the first one).

    With ``lake``, the day it failed on gets a run record saying why (the report of that day shows it).
    """
    where = f" on {failed_on}" if failed_on else ""
    summary = error_summary(error)
    print(f"{step}: failed{where}: {summary}" if code == EXIT_FAILED else f"{step}: {summary}", file=sys.stderr)
    if summary != str(error).strip():
        print(str(error).strip(), file=sys.stderr)  # the whole of it, for the log
    print(f"{step}: days not done: {format_days(days)}", file=sys.stderr)
    if lake is not None and days:
        status = "failed" if code == EXIT_FAILED else "waiting"
        reason = summary
        try:
            lake.write_run_record(step, failed_on or days[0], uuid.uuid4().hex[:16],
                                  {"date": (failed_on or days[0]).isoformat(), "status": status, "reason": reason})
        except Exception as exc:  # noqa: BLE001 - the step's own error is the one to report
            print(f"{step}: could not record the failure: {exc}", file=sys.stderr)
    return code


def run_each(step: str, days: Sequence[date], body: Callable[[date], None], lake=None) -> int:
    """Run ``body`` for each day in order; a failure or a wait names the days not done from there.
    On a terminal a range shows its progress (``jobs.common.progress``), the failure below it."""
    stopped: tuple[int, Exception, bool] | None = None
    with progress(step, total=len(days)) as advance:
        for i, day in enumerate(days):
            advance.doing(day.isoformat())
            try:
                body(day)
            except Waiting as exc:
                stopped = (i, exc, True)
                break
            except Exception as exc:  # noqa: BLE001 - reported with the days not done
                stopped = (i, exc, False)
                break
            advance()
    if stopped is None:
        return EXIT_OK
    i, exc, waiting = stopped
    if waiting:
        return not_done(step, days[i:], exc, code=EXIT_WAITING)
    return not_done(step, days[i:], exc, failed_on=days[i], lake=lake)
