"""When the generator's frauds become known: the label events of a generated day (docs/contract.md,
"Labels as events").

``fixed:N``: every transaction's label is reported N days after it (``fixed:7``, the default, is the
handbook's assumption; with ``--labels inline`` it is written inline in the transactions, as the
reference data is). ``realistic``: a card issuer's mix, written as a label feed:

* 10% of frauds are never reported (small amounts nobody disputes, cards closed before a claim);
* of the rest, 25% are reported 1-3 days after the transaction (the cardholder sees the
  statement or an alert), 60% after a log-normal delay of median 10 days (customer claims and
  investigations, spread 0.6, kept within 2-45 days) and 15% after 30-90 days (chargebacks filed at
  the end of the networks' windows, which run up to 120 days);
* 0.05% of genuine transactions are reported as fraud 1-10 days after them (a customer disputes a
  purchase they forgot) and cleared (a TX_FRAUD = 0 event) 3-20 days later.

The shares are round numbers in the spirit of the delayed-feedback setting of Dal Pozzolo et al.
("Credit Card Fraud Detection: A Realistic Modeling and a Novel Learning Strategy", IEEE TNNLS
2018): a little feedback within days, most labels after a week or more, some never. They are a
modelling choice, not measured figures. Draws depend on (seed, the transaction's day) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa

from jobs.common.calendar import SECONDS_PER_DAY
from jobs.common.schema import RAW_LABEL_SCHEMA

_STREAM_LABELS = 5  # beside the simulator's streams 1-4 (jobs.datagen.simulator), never renumbered

NEVER_REPORTED = 0.10
FAST, CLAIM = 0.25, 0.60  # the rest are chargebacks
FAST_DAYS = (1.0, 3.0)
CLAIM_MEDIAN_DAYS, CLAIM_SIGMA, CLAIM_DAYS = 10.0, 0.6, (2.0, 45.0)
CHARGEBACK_DAYS = (30.0, 90.0)
FALSE_ALARM = 0.0005
FALSE_ALARM_DAYS, CLEARED_AFTER_DAYS = (1.0, 10.0), (3.0, 20.0)


@dataclass(frozen=True)
class LabelDelay:
    kind: str  # "fixed" or "realistic"
    days: int = 7

    @staticmethod
    def parse(text: str) -> LabelDelay:
        if text == "realistic":
            return LabelDelay("realistic")
        kind, _, days = text.partition(":")
        if kind == "fixed" and days.isdigit():
            return LabelDelay("fixed", int(days))
        raise ValueError(f"--label-delay must be fixed:N (days) or realistic, got {text!r}")

    def __str__(self) -> str:
        return f"fixed:{self.days}" if self.kind == "fixed" else "realistic"


def events_of_day(day_table: pa.Table, delay: LabelDelay, seed: int, day: date) -> pa.Table:
    """The label events (RAW_LABEL_SCHEMA) of one generated day's transactions, whenever reported."""
    txid = day_table.column("TRANSACTION_ID").to_numpy()
    seconds = day_table.column("TX_DATETIME").cast(pa.int64()).to_numpy() // 1_000_000
    fraud = day_table.column("TX_FRAUD_SCENARIO").to_numpy() > 0
    if delay.kind == "fixed":
        return _table(txid, fraud.astype(np.int32), seconds + delay.days * SECONDS_PER_DAY)
    rng = np.random.default_rng([seed, _STREAM_LABELS, day.toordinal()])
    n = len(txid)
    kind = rng.random(n)
    after = np.empty(n)
    fast, claim = kind < FAST, (kind >= FAST) & (kind < FAST + CLAIM)
    chargeback = ~(fast | claim)
    after[fast] = rng.uniform(*FAST_DAYS, fast.sum())
    after[claim] = np.clip(CLAIM_MEDIAN_DAYS * np.exp(CLAIM_SIGMA * rng.standard_normal(claim.sum())), *CLAIM_DAYS)
    after[chargeback] = rng.uniform(*CHARGEBACK_DAYS, chargeback.sum())
    reported = fraud & (rng.random(n) >= NEVER_REPORTED)
    false_alarm = ~fraud & (rng.random(n) < FALSE_ALARM)
    alarm_after = rng.uniform(*FALSE_ALARM_DAYS, n)
    cleared_after = alarm_after + rng.uniform(*CLEARED_AFTER_DAYS, n)
    parts = [
        (txid[reported], np.ones(reported.sum(), np.int32), seconds[reported] + after[reported] * SECONDS_PER_DAY),
        (txid[false_alarm], np.ones(false_alarm.sum(), np.int32),
         seconds[false_alarm] + alarm_after[false_alarm] * SECONDS_PER_DAY),
        (txid[false_alarm], np.zeros(false_alarm.sum(), np.int32),
         seconds[false_alarm] + cleared_after[false_alarm] * SECONDS_PER_DAY),
    ]
    return _table(*(np.concatenate(column) for column in zip(*parts, strict=True)))


def _table(txid: np.ndarray, label: np.ndarray, reported_s: np.ndarray) -> pa.Table:
    reported_us = (np.floor(reported_s).astype(np.int64)) * 1_000_000
    order = np.lexsort((txid, reported_us))
    return pa.Table.from_arrays(
        [pa.array(txid[order], pa.int64()), pa.array(label[order], pa.int32()),
         pa.array(reported_us[order], pa.int64()).cast(pa.timestamp("us"))],
        schema=RAW_LABEL_SCHEMA,
    )


def by_report_day(events: pa.Table) -> dict[int, pa.Table]:
    """Events grouped by the day they are reported on (days since 1970-01-01)."""
    day = events.column("REPORTED_AT").cast(pa.int64()).to_numpy() // (SECONDS_PER_DAY * 1_000_000)
    return {int(d): events.filter(pa.array(day == d)) for d in np.unique(day)}
