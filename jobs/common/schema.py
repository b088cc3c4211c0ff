"""Raw, clean, quarantine, feature, score and alert schemas, and the model-input order (docs/contract.md, "Raw transactions" and "Features").

This module is the single definition: Spark jobs convert these Arrow schemas with
``jobs.spark.session.spark_schema``, the torch jobs read ``MODEL_INPUTS``, and tests import both.
Timestamps are naive microsecond timestamps meaning UTC (Spark 4 reads them as TIMESTAMP_NTZ).
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from jobs.common.calendar import WINDOWS_DAYS

TIMESTAMP = pa.timestamp("us")

# --- raw landing contract (docs/contract.md, "Raw transactions") -------------------------------------------------------------
RAW_SCHEMA = pa.schema(
    [
        pa.field("TRANSACTION_ID", pa.int64(), nullable=False),
        pa.field("TX_DATETIME", TIMESTAMP, nullable=False),
        pa.field("CUSTOMER_ID", pa.int64(), nullable=False),
        pa.field("TERMINAL_ID", pa.int64(), nullable=False),
        pa.field("TX_AMOUNT", pa.float64(), nullable=False),
        pa.field("TX_FRAUD", pa.int32(), nullable=True),
        pa.field("TX_FRAUD_SCENARIO", pa.int32(), nullable=True),
    ]
)
RAW_COLUMNS: tuple[str, ...] = tuple(RAW_SCHEMA.names)
REQUIRED_RAW_COLUMNS: tuple[str, ...] = tuple(f.name for f in RAW_SCHEMA if not f.nullable)
OPTIONAL_RAW_COLUMNS: tuple[str, ...] = tuple(f.name for f in RAW_SCHEMA if f.nullable)
LABEL = "TX_FRAUD"
KEY = "TRANSACTION_ID"

# --- clean: typed, deduplicated rows of one day ------------------------------------------------
CLEAN_SCHEMA = RAW_SCHEMA

# --- quarantine: original values as strings, plus the reason ------------------------------------
QUARANTINE_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=True) for name in RAW_COLUMNS]
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=True),
    ]
)


class QuarantineReason:
    """The closed list of reasons a raw row is rejected (the ``reason`` column's values)."""

    RAGGED = "ragged_line"  # a CSV line whose fields do not match its header (values would be shifted)
    NULL_REQUIRED = "null_required_field"
    BAD_NUMBER = "unparseable_number"
    BAD_TIMESTAMP = "unparseable_timestamp"
    NEGATIVE_AMOUNT = "negative_amount"
    NON_FINITE_AMOUNT = "non_finite_amount"
    AMOUNT_ABOVE_BOUND = "amount_above_bound"
    OUTSIDE_DAY = "timestamp_outside_day"
    BAD_LABEL = "label_not_0_1_or_null"
    CONFLICTING_DUPLICATE = "conflicting_duplicate_id"

    ALL = (
        RAGGED,
        NULL_REQUIRED,
        BAD_NUMBER,
        BAD_TIMESTAMP,
        NEGATIVE_AMOUNT,
        NON_FINITE_AMOUNT,
        AMOUNT_ABOVE_BOUND,
        OUTSIDE_DAY,
        BAD_LABEL,
        CONFLICTING_DUPLICATE,
    )


# --- label events (docs/contract.md, "Labels as events") -------------------------------------------
REPORTED_AT = "REPORTED_AT"
RAW_LABEL_SCHEMA = pa.schema(
    [
        pa.field("TRANSACTION_ID", pa.int64(), nullable=False),
        pa.field("TX_FRAUD", pa.int32(), nullable=False),  # 1 reports a fraud, 0 clears an earlier report
        pa.field(REPORTED_AT, TIMESTAMP, nullable=False),  # within the landing day it arrived on
    ]
)
RAW_LABEL_COLUMNS: tuple[str, ...] = tuple(RAW_LABEL_SCHEMA.names)
# clean/labels/date=A: the valid events that arrived on A, with the transaction they name
LABEL_EVENT_SCHEMA = pa.schema(
    [
        *RAW_LABEL_SCHEMA,
        pa.field("TX_DATETIME", TIMESTAMP, nullable=False),
        pa.field("CUSTOMER_ID", pa.int64(), nullable=False),
        pa.field("TERMINAL_ID", pa.int64(), nullable=False),
    ]
)
LABEL_QUARANTINE_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=True) for name in RAW_LABEL_COLUMNS]
    + [
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=True),
    ]
)


class LabelQuarantineReason:
    """Why a label event is rejected (the ``reason`` column of ``quarantine/labels``)."""

    RAGGED = QuarantineReason.RAGGED
    NULL_REQUIRED = "null_required_field"
    BAD_NUMBER = "unparseable_number"
    BAD_TIMESTAMP = "unparseable_timestamp"
    BAD_LABEL = "label_not_0_1"
    OUTSIDE_DAY = "reported_outside_day"
    UNKNOWN_TRANSACTION = "transaction_not_found"
    BEFORE_TRANSACTION = "reported_before_transaction"

    ALL = (RAGGED, NULL_REQUIRED, BAD_NUMBER, BAD_TIMESTAMP, BAD_LABEL, OUTSIDE_DAY, UNKNOWN_TRANSACTION,
           BEFORE_TRANSACTION)


# --- features (docs/contract.md, "Features") --------------------------------------------------------------------------


def customer_count(n: int) -> str:
    return f"CUSTOMER_ID_NB_TX_{n}DAY_WINDOW"


def customer_avg_amount(n: int) -> str:
    return f"CUSTOMER_ID_AVG_AMOUNT_{n}DAY_WINDOW"


def terminal_count(n: int) -> str:
    return f"TERMINAL_ID_NB_TX_{n}DAY_WINDOW"


def terminal_risk(n: int) -> str:
    return f"TERMINAL_ID_RISK_{n}DAY_WINDOW"


COMPUTED_FEATURES: tuple[str, ...] = (
    "TX_DURING_WEEKEND",
    "TX_DURING_NIGHT",
    *(c for n in WINDOWS_DAYS for c in (customer_count(n), customer_avg_amount(n))),
    *(c for n in WINDOWS_DAYS for c in (terminal_count(n), terminal_risk(n))),
)
MODEL_INPUTS: tuple[str, ...] = ("TX_AMOUNT", *COMPUTED_FEATURES)
assert len(COMPUTED_FEATURES) == 14 and len(MODEL_INPUTS) == 15

_INTEGER_FEATURES = {"TX_DURING_WEEKEND", "TX_DURING_NIGHT"} | {
    name for n in WINDOWS_DAYS for name in (customer_count(n), terminal_count(n))
}
ID_COLUMNS: tuple[str, ...] = ("TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT")

FEATURE_SCHEMA = pa.schema(
    [RAW_SCHEMA.field(name) for name in ID_COLUMNS]
    + [
        pa.field(name, pa.int32() if name in _INTEGER_FEATURES else pa.float64(), nullable=False)
        for name in COMPUTED_FEATURES
    ]
)  # no label: a later event could change it (docs/contract.md, "Labels as events")


def schema_fingerprint(schema: pa.Schema) -> str:
    """A short stable hash of names and types, stored with models and checked by scoring."""
    text = ";".join(f"{f.name}:{f.type}" for f in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


FEATURE_SCHEMA_VERSION = schema_fingerprint(FEATURE_SCHEMA)

# --- scoring outputs (docs/contract.md, "The lake") -------------------------------------------------------------------
SCORES_SCHEMA = pa.schema(
    [
        pa.field("TRANSACTION_ID", pa.int64(), nullable=False),
        pa.field("CUSTOMER_ID", pa.int64(), nullable=False),
        pa.field("TX_DATETIME", TIMESTAMP, nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)
ATTRIBUTION = pa.struct([("input", pa.string()), ("value", pa.float64()), ("attribution", pa.float64())])
ALERTS_SCHEMA = pa.schema(
    [
        pa.field("CUSTOMER_ID", pa.int64(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("n_tx", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        # why the card is on the list (jobs.torch.explain): its top transaction, and every input of
        # that transaction with its value and attribution, largest effect first. Null in alert
        # lists scored before attributions were kept (rescoring the day adds them).
        pa.field("top_transaction_id", pa.int64()),
        pa.field("attributions", pa.list_(ATTRIBUTION)),
    ]
)
