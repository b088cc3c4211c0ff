"""A small world run through the pipeline's own commands, for the tests that need whole lakes.

60 customers, 120 terminals, 14 days from 2018-04-01, training every 3 days on a 2-day window
(training days 04-10 and 04-13): seconds per step, yet every step and every decision path runs.
"""

from __future__ import annotations

import sys
from datetime import date

from jobs.common import commands
from jobs.common.calendar import calendar
from jobs.common.lake import Lake

FIRST, LAST = date(2018, 4, 1), date(2018, 4, 14)
SMALL = {
    "FRAUD_FIRST_DATE": FIRST.isoformat(),
    "FRAUD_TRAIN_WINDOW_DAYS": "2",
    "FRAUD_TRAIN_EVERY_DAYS": "3",
    "FRAUD_ALERT_K": "20",
    "FRAUD_SPARK_SHUFFLE_PARTITIONS": "2",
    "FRAUD_SPARK_DRIVER_MEMORY": "1g",
    "FRAUD_SEED": "0",
    "FRAUD_LABEL_FEED": "on",
    "FRAUD_MIN_FRAUD_LABELS": "1",  # a tiny world: a handful of frauds a day is evidence enough here
}


# The tests' Spark drivers: a small local master, and the JIT's quick tier only. A job over this
# small world is all start-up and first-run compilation; C1 alone cuts a day's clean from about
# 30 s to 24 s here and changes nothing the job computes. Production keeps the JVM's defaults.
TEST_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"
SPARK_OPTIONS = ("--master", "local[2]", "--driver-java-options", TEST_JAVA_OPTIONS)


def run_step(step: str, lake_uri: str, start: date, end: date | None = None, ok=(0,)) -> None:
    argv = commands.step_command(step, commands.day_args(lake_uri, start, end),
                                 spark_options=SPARK_OPTIONS if step in commands.SPARK_JOBS else ())
    done = commands.run(argv, capture=True)
    assert done.returncode in ok, f"{' '.join(argv)} -> {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def generate(lake_uri: str, last: date = LAST, *options: str) -> None:
    done = commands.run([sys.executable, "-m", "jobs.datagen", "--lake", lake_uri, "--start", FIRST.isoformat(),
                         "--days", str((last - FIRST).days + 1), "--customers", "60", "--terminals", "120",
                         "--seed", "7", *options], capture=True)
    assert done.returncode == 0, done.stderr


def build(lake_uri: str, last: date = LAST, report: bool = True) -> Lake:
    """The whole pipeline over the landing days, as an operator runs it by hand (range runs)."""
    run_step("clean", lake_uri, FIRST, last)
    run_step("features", lake_uri, FIRST, last)
    for day in calendar().schedule.training_days(FIRST, last):
        run_step("train", lake_uri, day)
    run_step("score", lake_uri, FIRST, last, ok=(0, 99))
    if report:
        run_step("report", lake_uri, FIRST, last)
    return Lake.from_uri(lake_uri)


def rows(lake: Lake, dataset: str, day: date) -> list[dict] | None:
    if not lake.is_published(dataset, day):
        return None
    table = lake.read_table(dataset, day)
    keys = [c for c in ("TRANSACTION_ID", "rank", "CUSTOMER_ID", "reason") if c in table.column_names][:1]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist() if keys else table.to_pylist()


def by_training_key(lake: Lake, table: list[dict] | None) -> list[dict] | None:
    """Model outputs with the version replaced by its training key (recipe + exact inputs): two lakes
    that trained the same model on the same inputs name it alike even if a float32 ulp apart."""
    from jobs.torch.registry import Registry

    if table is None:
        return None
    registry = Registry(lake)
    for row in table:
        row["model_version"] = registry.version(row["model_version"])["training_key"]
    return table


def assert_same(got: list[dict] | None, want: list[dict] | None, what: str, tolerance: float = 0.0) -> None:
    assert (got is None) == (want is None), what
    if got is None:
        return
    assert len(got) == len(want), what
    for g, w in zip(got, want, strict=True):
        for column, value in g.items():
            if isinstance(value, float) and tolerance:
                assert abs(value - w[column]) <= tolerance, f"{what}: {column} {value} vs {w[column]}"
            else:
                assert value == w[column], f"{what}: {column} {value!r} vs {w[column]!r}"
