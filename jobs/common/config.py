"""Every setting of the pipeline, with its default, read from the environment in one place.

Jobs call :func:`settings` once; nothing else in the project reads ``os.environ`` for these
names. Credentials for S3 are the standard AWS variables (or, under Airflow, a Connection that
the DAG turns into those variables for the task); they never live in code or in the repo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str
    access_key: str | None = field(repr=False)
    secret_key: str | None = field(repr=False)
    session_token: str | None = field(repr=False, default=None)


@dataclass(frozen=True)
class Settings:
    lake_uri: str
    first_date: date
    label_delay_days: int
    label_lookback_days: int
    label_feed: bool
    min_fraud_labels: int
    max_amount: float
    train_every_days: int
    train_window_days: int
    model: str
    alert_k: int
    promotion_tolerance: float
    spark_master: str
    spark_driver_memory: str
    spark_shuffle_partitions: int
    range_batch_days: int
    seed: int
    s3: S3Settings


ENV_DOC = {
    "FRAUD_LAKE_URI": "lake root: file:///abs/path or s3://bucket/prefix (default: file://<repo>/.lake)",
    "FRAUD_FIRST_DATE": "the pipeline's first date, anchor of the training schedule (default 2018-04-01)",
    "FRAUD_LABEL_DELAY_DAYS": "days after its transaction that a label may be used (default 7: the calendar's root offset)",
    "FRAUD_LABEL_LOOKBACK_DAYS": "a label event must name a clean transaction of this many days before it (default 120)",
    "FRAUD_LABEL_FEED": "on (default): every day has a landing/labels partition to wait for; off: inline labels only",
    "FRAUD_MIN_FRAUD_LABELS": "fewest fraud labels a training window or validation week needs to promote (default 10)",
    "FRAUD_MAX_AMOUNT": "amounts above this are quarantined as amount_above_bound (default 1e9, at most 1e12)",
    "FRAUD_TRAIN_EVERY_DAYS": "days between training days (default 7)",
    "FRAUD_TRAIN_WINDOW_DAYS": "length of the labelled training window in days (default 21, chosen on validation folds)",
    "FRAUD_MODEL": "model kind trained by default: seq (card and terminal history, default) or mlp",
    "FRAUD_ALERT_K": "cards in the daily alert list (default 100)",
    "FRAUD_PROMOTION_TOLERANCE": "average-precision tolerance for promotion (default 0.005)",
    "FRAUD_SPARK_MASTER": "Spark master for spark-submit outside Airflow (default local[2])",
    "FRAUD_SPARK_DRIVER_MEMORY": "driver memory in local mode (default 4g)",
    "FRAUD_SPARK_SHUFFLE_PARTITIONS": "spark.sql.shuffle.partitions (default 8)",
    "FRAUD_RANGE_BATCH_DAYS": "a range run of a Spark job works on at most this many days at a time, publishing "
                              "each batch before the next, so its memory does not grow with the range (default 7)",
    "FRAUD_SEED": "seed for training and anything random (default 0)",
    "FRAUD_PROGRESS": "progress of long commands on stderr: auto (default: only when it is a terminal), 0 never, "
                      "1 always (tests)",
    "FRAUD_S3_ENDPOINT_URL": "S3-compatible endpoint, e.g. http://127.0.0.1:8333 (default: AWS)",
    "AWS_REGION": "S3 region (default us-east-1)",
    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN": "S3 credentials",
}


def _max_amount(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1e12:  # the features' exact window sums hold amounts up to 1e12
        raise ValueError(f"FRAUD_MAX_AMOUNT must be in (0, 1e12], got {text}")
    return value


def default_lake_uri() -> str:
    return (REPO_ROOT / ".lake").as_uri()


def s3_environment(s3: S3Settings) -> dict[str, str]:
    """The environment variables that make :func:`settings` in another process see the store ``s3``
    (how a task hands the store it resolved to a step's process, never through its command line)."""
    values = {"FRAUD_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ACCESS_KEY_ID": s3.access_key,
              "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_SESSION_TOKEN": s3.session_token}
    return {name: value for name, value in values.items() if value}


S3_SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _positive(name: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


PROGRESS_ENV = "FRAUD_PROGRESS"


def progress_mode() -> str:
    """``auto``, ``off`` or ``on``: whether long commands show their progress (``jobs.common.progress``).
    Read apart from :func:`settings`, at each use: a display that is up sets it to ``0`` for the
    processes it starts, and a mistyped pipeline setting must not stop a progress bar."""
    value = _env(PROGRESS_ENV, "auto").lower()
    if value in ("0", "off", "false", "no", "never"):
        return "off"
    if value in ("1", "on", "true", "yes", "always"):
        return "on"
    return "auto"


def settings() -> Settings:
    """Read the environment now (tests change it between calls, so nothing is cached)."""
    return Settings(
        lake_uri=_env("FRAUD_LAKE_URI", default_lake_uri()),
        first_date=date.fromisoformat(_env("FRAUD_FIRST_DATE", "2018-04-01")),
        label_delay_days=int(_env("FRAUD_LABEL_DELAY_DAYS", "7")),
        label_lookback_days=int(_env("FRAUD_LABEL_LOOKBACK_DAYS", "120")),
        label_feed=_env("FRAUD_LABEL_FEED", "on").lower() not in ("off", "0", "false", "no", "none"),
        min_fraud_labels=int(_env("FRAUD_MIN_FRAUD_LABELS", "10")),
        max_amount=_max_amount(_env("FRAUD_MAX_AMOUNT", "1e9")),
        train_every_days=int(_env("FRAUD_TRAIN_EVERY_DAYS", "7")),
        train_window_days=int(_env("FRAUD_TRAIN_WINDOW_DAYS", "21")),
        model=_env("FRAUD_MODEL", "seq"),
        alert_k=int(_env("FRAUD_ALERT_K", "100")),
        promotion_tolerance=float(_env("FRAUD_PROMOTION_TOLERANCE", "0.005")),
        spark_master=_env("FRAUD_SPARK_MASTER", "local[2]"),
        spark_driver_memory=_env("FRAUD_SPARK_DRIVER_MEMORY", "4g"),
        spark_shuffle_partitions=int(_env("FRAUD_SPARK_SHUFFLE_PARTITIONS", "8")),
        range_batch_days=_positive("FRAUD_RANGE_BATCH_DAYS", _env("FRAUD_RANGE_BATCH_DAYS", "7")),
        seed=int(_env("FRAUD_SEED", "0")),
        s3=S3Settings(
            endpoint_url=os.environ.get("FRAUD_S3_ENDPOINT_URL") or None,
            region=_env("AWS_REGION", _env("AWS_DEFAULT_REGION", "us-east-1")),
            access_key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        ),
    )

