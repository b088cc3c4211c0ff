"""Feature partitions to arrays and tensors: column by column with pyarrow, never row by row.

A :class:`FeatureFrame` holds the model inputs of a set of transactions (``MODEL_INPUTS`` order)
plus the ids, day and label the trainer and the metrics need. For the sequence model,
:class:`CardHistory` adds, per transaction, the positions of the same card's previous ``k``
feature rows (earlier days' partitions included): feature rows only, never labels, so the
history respects the label delay exactly as the features do.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pyarrow as pa

from jobs.common.lake import MANIFEST, Dataset, Lake, NotPublished
from jobs.common.schema import FEATURE_SCHEMA, LABEL, MODEL_INPUTS

ID_READ = ("TRANSACTION_ID", "CUSTOMER_ID", "TX_DATETIME")
MICROS_PER_DAY = 86_400 * 1_000_000


@dataclass
class FeatureFrame:
    x: np.ndarray  # float32 [n, len(MODEL_INPUTS)]
    label: np.ndarray  # int8 [n]; a null label counts as 0
    card: np.ndarray  # int64 [n]
    time_us: np.ndarray  # int64 [n], microseconds since the epoch (UTC)
    txid: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def day(self) -> np.ndarray:
        return (self.time_us // MICROS_PER_DAY).astype("datetime64[D]")

    def take(self, index: np.ndarray) -> FeatureFrame:
        return FeatureFrame(self.x[index], self.label[index], self.card[index], self.time_us[index], self.txid[index])

    @staticmethod
    def concat(frames: Sequence[FeatureFrame]) -> FeatureFrame:
        return FeatureFrame(*(np.concatenate([getattr(f, n) for f in frames]) for n in
                              ("x", "label", "card", "time_us", "txid")))


def frame_from_table(table: pa.Table) -> FeatureFrame:
    """Arrow table with the feature schema's columns -> FeatureFrame (vectorised)."""
    n = table.num_rows
    x = np.empty((n, len(MODEL_INPUTS)), dtype=np.float32)
    for j, name in enumerate(MODEL_INPUTS):
        x[:, j] = table.column(name).to_numpy()
    label_col = table.column(LABEL) if LABEL in table.column_names else pa.nulls(n, pa.int32())
    label = label_col.fill_null(0).to_numpy().astype(np.int8) if n else np.zeros(0, np.int8)
    time_us = table.column("TX_DATETIME").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()
    return FeatureFrame(
        x=x,
        label=label,
        card=table.column("CUSTOMER_ID").to_numpy().astype(np.int64),
        time_us=np.asarray(time_us, dtype=np.int64),
        txid=table.column("TRANSACTION_ID").to_numpy().astype(np.int64),
    )


def read_feature_table(lake: Lake, days: Sequence[date], missing_ok: bool = False) -> pa.Table:
    columns = list(dict.fromkeys((*ID_READ, *MODEL_INPUTS, LABEL)))
    return lake.read_days(Dataset.FEATURES, days, schema=FEATURE_SCHEMA, columns=columns, missing_ok=missing_ok)


def read_features(lake: Lake, days: Sequence[date], missing_ok: bool = False) -> FeatureFrame:
    """The published feature partitions of ``days`` (NotPublished if one is missing)."""
    return frame_from_table(read_feature_table(lake, days, missing_ok=missing_ok))


def partition_hashes(lake: Lake, dataset: str, days: Sequence[date]) -> list[dict]:
    """Lineage of inputs: per day, the sha256 of its published manifest (names the exact files)."""
    out = []
    for day in days:
        path = posixpath.join(lake.partition_path(dataset, day), MANIFEST)
        if not lake.exists(path):
            raise NotPublished(f"{dataset} date={day} is not published in {lake.uri}")
        data = lake.read_bytes(path)
        out.append({"dataset": dataset, "date": day.isoformat(), "manifest_sha256": hashlib.sha256(data).hexdigest(),
                    "rows": lake.read_json(path).get("rows")})
    return out


# --- card history for the sequence model ----------------------------------------------------------
@dataclass
class CardHistory:
    """Per target transaction, its card's previous ``k`` feature rows (oldest first).

    ``pool`` holds the feature rows the history may point to (history days + target days);
    ``prev[i, j]`` is the pool row of the target's (k - j)-th previous transaction, -1 if none;
    ``gap_days[i, j]`` the time between it and the target, in days.
    """

    pool: np.ndarray  # float32 [N, F]
    prev: np.ndarray  # int64 [n, k]
    gap_days: np.ndarray  # float32 [n, k]


def history_days(days: Sequence[date], lookback_days: int) -> list[date]:
    first = min(days)
    return [first - timedelta(days=i) for i in range(lookback_days, 0, -1)]


def build_history(target: FeatureFrame, history: FeatureFrame, k: int) -> CardHistory:
    """Link every target row to its card's previous k rows among history + target rows.

    Order within a card: time, then transaction id (rows at the same second are ordered by id).
    """
    pool = FeatureFrame.concat([history, target])
    n_hist = len(history)
    order = np.lexsort((pool.txid, pool.time_us, pool.card))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    sorted_card = pool.card[order]
    sorted_time = pool.time_us[order]
    target_pos = rank[n_hist:]  # sorted position of each target row
    prev = np.full((len(target), k), -1, dtype=np.int64)
    gap = np.zeros((len(target), k), dtype=np.float32)
    for back in range(1, k + 1):
        pos = target_pos - back
        ok = pos >= 0
        ok[ok] = sorted_card[pos[ok]] == pool.card[n_hist:][ok]
        col = k - back  # oldest first: the newest previous row is the last column
        prev[ok, col] = order[pos[ok]]
        gap[ok, col] = (target.time_us[ok] - sorted_time[pos[ok]]) / MICROS_PER_DAY
    return CardHistory(pool=pool.x, prev=prev, gap_days=gap)


def read_with_history(
    lake: Lake, days: Sequence[date], k: int, lookback_days: int, first_date: date
) -> tuple[FeatureFrame, CardHistory]:
    """Target days' features and each row's card history from up to ``lookback_days`` before.

    History days before the pipeline's first date do not exist and are skipped; later ones must
    be published (a missing one is "not yet written", never "no history").
    """
    target = read_features(lake, days)
    wanted = [d for d in history_days(days, lookback_days) if d >= first_date]
    history = read_features(lake, wanted) if wanted else FeatureFrame.concat([target.take(np.zeros(0, np.int64))])
    return target, build_history(target, history, k)
