"""Synthetic feature partitions (FEATURE_SCHEMA) for tests and throughput benchmarks.

Not the simulator: rows are drawn directly in feature space with a learnable fraud signal
(amounts far above the card's average, risky terminals), deterministic for (day, seed). Use
the generator and the Spark feature job for anything about model quality. Feature partitions hold
no label, so :func:`publish_synthetic` also publishes the day's clean transactions with the labels
inline (reported the label delay after each transaction) and an empty label feed.
"""

from __future__ import annotations

from datetime import date, datetime

import numpy as np
import pyarrow as pa

from jobs.common.lake import Dataset, Lake
from jobs.common.schema import (
    CLEAN_SCHEMA,
    FEATURE_SCHEMA,
    LABEL,
    LABEL_EVENT_SCHEMA,
    customer_avg_amount,
    customer_count,
    terminal_count,
    terminal_risk,
)


def synthetic_features(day: date, rows: int, seed: int = 0, cards: int = 500, fraud_rate: float = 0.03) -> pa.Table:
    """FEATURE_SCHEMA columns and, last, the rows' ``TX_FRAUD`` (what :func:`publish_synthetic` splits off)."""
    rng = np.random.default_rng([seed, day.toordinal()])
    card_mean = np.random.default_rng(seed).uniform(5, 100, cards)
    card = rng.integers(0, cards, rows)
    fraud = rng.random(rows) < fraud_rate
    seconds = np.sort(rng.integers(0, 86_400, rows))
    midnight = np.datetime64(datetime(day.year, day.month, day.day), "us")
    when = midnight + seconds.astype("timedelta64[s]").astype("timedelta64[us]")
    mean = card_mean[card]
    amount = np.abs(rng.normal(mean, mean / 2))
    amount = np.where(fraud & (rng.random(rows) < 0.6), amount * rng.uniform(3, 6, rows), amount)
    cols: dict[str, np.ndarray] = {
        "TRANSACTION_ID": day.toordinal() * 10_000_000 + np.arange(rows, dtype=np.int64),
        "TX_DATETIME": when,
        "CUSTOMER_ID": card.astype(np.int64),
        "TERMINAL_ID": rng.integers(0, 10 * cards, rows).astype(np.int64),
        "TX_AMOUNT": np.round(amount, 2),
        "TX_DURING_WEEKEND": np.full(rows, int(day.weekday() >= 5), np.int32),
        "TX_DURING_NIGHT": (seconds < 7 * 3600).astype(np.int32),
    }
    for n in (1, 7, 30):
        count = 1 + rng.poisson(2 * n, rows)
        cols[customer_count(n)] = count.astype(np.int32)
        cols[customer_avg_amount(n)] = np.abs(rng.normal(mean, mean / (2 * np.sqrt(count))))
    for n in (1, 7, 30):
        count = rng.poisson(1.5 * n, rows)
        risky = fraud & (rng.random(rows) < 0.5)
        risk = np.where(risky, rng.uniform(0.1, 0.6, rows), rng.uniform(0, 0.02, rows) * (rng.random(rows) < 0.1))
        cols[terminal_count(n)] = count.astype(np.int32)
        cols[terminal_risk(n)] = np.where(count > 0, risk, 0.0)
    cols[LABEL] = fraud.astype(np.int32)
    schema = FEATURE_SCHEMA.append(CLEAN_SCHEMA.field(LABEL))
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def publish_synthetic(lake: Lake, day: date, table: pa.Table) -> None:
    """Publish a :func:`synthetic_features` day: its features, its clean rows (labels inline) and an
    empty label feed, as the pipeline would have them."""
    lake.write_table(Dataset.FEATURES, day, table.select(FEATURE_SCHEMA.names))
    clean = table.select([n for n in CLEAN_SCHEMA.names if n in table.column_names])
    clean = clean.append_column("TX_FRAUD_SCENARIO", pa.nulls(len(clean), pa.int32())).select(CLEAN_SCHEMA.names)
    lake.write_table(Dataset.CLEAN, day, clean.cast(CLEAN_SCHEMA))
    lake.write_table(Dataset.CLEAN_LABELS, day, LABEL_EVENT_SCHEMA.empty_table())
