"""Feature partitions to arrays and tensors: column by column with pyarrow, never row by row.

A :class:`FeatureFrame` holds the model inputs of a set of transactions (``MODEL_INPUTS`` order)
plus the ids, day and label the trainer and the metrics need. Feature partitions hold no label:
:class:`LabelEvents` answers "was this transaction a fraud as known at time t?" from the inline
labels (reported the label delay after their transactions) and the label feed, and the frame's
``label`` is filled with the targets as known before a given day began (docs/contract.md, "Labels
as events"). For the sequence model, :class:`CardHistory` adds, per transaction, the positions of
the same card's previous ``k`` feature rows (earlier days' partitions included) and its terminal's
last matured transactions with their labels as of the transaction's own time.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from jobs.common.calendar import MICROS_PER_DAY, ONE_DAY, Calendar, day_range, micros_at_midnight
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import (
    CLEAN_SCHEMA,
    FEATURE_SCHEMA,
    LABEL,
    LABEL_EVENT_SCHEMA,
    MODEL_INPUTS,
    REPORTED_AT,
    customer_avg_amount,
)
from jobs.torch import kernels

ID_READ = ("TRANSACTION_ID", "CUSTOMER_ID", "TERMINAL_ID", "TX_DATETIME")


@dataclass
class FeatureFrame:
    x: np.ndarray  # float32 [n, len(MODEL_INPUTS)]
    label: np.ndarray  # int8 [n]; a null label counts as 0
    card: np.ndarray  # int64 [n]
    time_us: np.ndarray  # int64 [n], microseconds since the epoch (UTC)
    txid: np.ndarray  # int64 [n]
    terminal: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def day(self) -> np.ndarray:
        return (self.time_us // MICROS_PER_DAY).astype("datetime64[D]")

    def take(self, index: np.ndarray) -> FeatureFrame:
        return FeatureFrame(*(getattr(self, n)[index] for n in _FRAME_FIELDS))

    def rows(self, start: int, stop: int) -> FeatureFrame:
        """Rows start .. stop - 1 as views of this frame's arrays (no copy)."""
        return FeatureFrame(*(getattr(self, n)[start:stop] for n in _FRAME_FIELDS))

    @staticmethod
    def empty(n: int, by_column: bool = False) -> FeatureFrame:
        """A frame of ``n`` rows, uninitialised. ``by_column``: ``x`` is laid out a column at a time
        (the [n, 15] view of a [15, n] array), which a table's columns fill in sequential copies."""
        x = np.empty((len(MODEL_INPUTS), n), np.float32).T if by_column else np.empty((n, len(MODEL_INPUTS)), np.float32)
        return FeatureFrame(x=x, label=np.empty(n, np.int8),
                            card=np.empty(n, np.int64), time_us=np.empty(n, np.int64), txid=np.empty(n, np.int64),
                            terminal=np.empty(n, np.int64))

    @staticmethod
    def concat(frames: Sequence[FeatureFrame]) -> FeatureFrame:
        return FeatureFrame(*(np.concatenate([getattr(f, n) for f in frames]) for n in _FRAME_FIELDS))


_FRAME_FIELDS = ("x", "label", "card", "time_us", "txid", "terminal")


_TILE_ROWS = 8_192  # rows of x filled at a time: a tile of [rows, 15] float32 (480 KiB) stays in the core's L2 cache


def frame_from_table(table: pa.Table, out: FeatureFrame | None = None) -> FeatureFrame:
    """Arrow table with the feature schema's columns -> FeatureFrame (vectorised), or into ``out``
    (a frame of exactly the table's rows, such as a slice of a larger one).

    A frame laid out by column (``FeatureFrame.empty(n, by_column=True)``) takes each column in one
    sequential copy: a third of the time of a row-major fill. A row-major ``x`` is filled batch by
    batch and tile by tile: writing one whole column of a row-major [n, 15] array at a time touches
    every row's cache line 15 times over (about 9x slower).
    """
    n = table.num_rows
    if out is None:
        out = FeatureFrame.empty(n)
    elif len(out) != n:
        raise ValueError(f"a frame of {len(out):,} rows cannot take a table of {n:,}")
    x = out.x
    start = 0
    by_column = x.strides[0] == x.itemsize  # each column's rows adjacent (also in a slice of such a frame)
    for batch in table.select(list(MODEL_INPUTS)).to_batches():
        columns = [c.to_numpy(zero_copy_only=False) for c in batch.columns]
        if by_column:
            for j, column in enumerate(columns):
                x[start : start + batch.num_rows, j] = column
        else:
            for s in range(0, batch.num_rows, _TILE_ROWS):
                e = min(s + _TILE_ROWS, batch.num_rows)
                tile = x[start + s : start + e]
                for j, column in enumerate(columns):
                    tile[:, j] = column[s:e]
        start += batch.num_rows
    out.label[:] = 0  # the targets are attached apart (attach_targets)
    _copy_column(table.column("TX_DATETIME"), out.time_us)
    _copy_column(table.column("CUSTOMER_ID"), out.card)
    _copy_column(table.column("TRANSACTION_ID"), out.txid)
    _copy_column(table.column("TERMINAL_ID"), out.terminal)
    return out


def read_feature_table(lake: Lake, days: Sequence[date], missing_ok: bool = False) -> pa.Table:
    columns = list(dict.fromkeys((*ID_READ, *MODEL_INPUTS)))
    return lake.read_days(Dataset.FEATURES, days, schema=FEATURE_SCHEMA, columns=columns, missing_ok=missing_ok)


def _parquet_rows(manifest: dict | None) -> int | None:
    """The rows a published partition's Parquet files hold, by its manifest (None where unknown)."""
    rows = [f.get("rows") for f in (manifest or {}).get("files", []) if f["name"].endswith(".parquet")]
    return sum(rows) if manifest is not None and all(isinstance(r, int) for r in rows) else None


def read_frame(lake: Lake, days: Sequence[date], helper: Executor | None = None) -> tuple[FeatureFrame, list[int]]:
    """The published feature partitions of ``days`` as one frame (in that order) and each day's
    rows, read a day at a time straight into the frame's place for it (its size comes from the
    manifests): a day's Arrow buffers are free for the next day's once copied, and all go back to
    the system at the end, so the range is never held twice, neither as Arrow tables beside numpy
    arrays nor as day frames beside their concatenation (which alone took 0.9 s at 8M rows).
    (Handing Arrow's buffers back after every day costs about 0.4 s at 8M rows, for no lower peak:
    the allocator reuses them.)

    With ``helper`` (an executor, possibly busy with other reads) the days are shared: whichever
    thread is free takes the next day, each filling its own rows of the frame.

    ``x`` is laid out by column: each day's columns are copied in sequence (0.1 s for 8M rows, against
    0.28 s row by row), the scorers read whole columns, and the history rows a model looks back at
    are gathered in ascending order (:class:`CardHistory`)."""
    counts = [_parquet_rows(lake.manifest(Dataset.FEATURES, day)) for day in days]
    if not all(isinstance(c, int) for c in counts):  # a manifest without its files' row counts: read first
        tables = [read_feature_table(lake, [day]) for day in days]
        counts = [t.num_rows for t in tables]
        helper = None
    else:
        tables = None
    frame = FeatureFrame.empty(sum(counts), by_column=True)
    starts = np.r_[0, np.cumsum(counts)].tolist()
    turns = itertools.count()  # the next day to read (next() on it is atomic: one day to each thread)

    def read_days() -> None:
        while (i := next(turns)) < len(days):
            if tables is None:
                table = read_feature_table(lake, [days[i]])
            else:
                table, tables[i] = tables[i], None
            if table.num_rows != counts[i]:
                raise ValueError(f"features of {days[i]}: the manifest names {counts[i]:,} rows, its files hold "
                                 f"{table.num_rows:,}; republish the day (the partition does not match its manifest)")
            frame_from_table(table, frame.rows(starts[i], starts[i + 1]))
            del table

    shared = helper.submit(read_days) if helper is not None else None
    read_days()
    if shared is not None:
        shared.result()
    pa.default_memory_pool().release_unused()  # the allocator would keep them for itself otherwise
    return frame, counts


def read_features(lake: Lake, days: Sequence[date], missing_ok: bool = False) -> FeatureFrame:
    """The published feature partitions of ``days`` (NotPublished if one is missing)."""
    return frame_from_table(read_feature_table(lake, days, missing_ok=missing_ok))


# --- labels as events -------------------------------------------------------------------------------
@dataclass
class LabelEvents:
    """Label events of a set of transactions: which, when reported, fraud (1) or cleared (0)."""

    txid: np.ndarray  # int64
    reported_us: np.ndarray  # int64
    label: np.ndarray  # int8

    @staticmethod
    def read(lake: Lake, tx_days: Sequence[date], feed_days: Sequence[date], delay_days: int) -> LabelEvents:
        """The inline labels of the clean transactions of ``tx_days`` (each reported the delay after its
        transaction) and the feed's events that arrived on ``feed_days``. Unpublished days are absent:
        the steps wait for the ones they need (their contracts) before reading."""
        clean = lake.read_days(Dataset.CLEAN, tx_days, schema=CLEAN_SCHEMA,
                               columns=["TRANSACTION_ID", "TX_DATETIME", LABEL], missing_ok=True)
        if clean.column(LABEL).null_count:
            clean = clean.filter(pc.is_valid(clean.column(LABEL)))
        feed = lake.read_days(Dataset.CLEAN_LABELS, feed_days, schema=LABEL_EVENT_SCHEMA,
                              columns=["TRANSACTION_ID", REPORTED_AT, LABEL], missing_ok=True)
        # each column copied a chunk at a time straight into one numpy array, inline events first:
        # no Arrow-side concatenation or cast, whose fresh buffers cost page faults on every read
        n = clean.num_rows + feed.num_rows
        txid, reported, label = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int8)
        _copy_column(clean.column("TRANSACTION_ID"), txid[: clean.num_rows])
        _copy_column(clean.column("TX_DATETIME"), reported[: clean.num_rows])
        reported[: clean.num_rows] += delay_days * MICROS_PER_DAY  # inline labels: reported the delay after
        _copy_column(clean.column(LABEL), label[: clean.num_rows])
        _copy_column(feed.column("TRANSACTION_ID"), txid[clean.num_rows :])
        _copy_column(feed.column(REPORTED_AT), reported[clean.num_rows :])
        _copy_column(feed.column(LABEL), label[clean.num_rows :])
        return LabelEvents(txid, reported, label)

    @cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The events ordered by (transaction id, reported time, label) as (ids, times, labels).

        One sort by id alone (most transactions have one event, and the inline ones come in long
        ascending runs), skipped when the ids already ascend (the inline labels of days read in order,
        and no feed events); only the runs of an id with several events are then ordered by time and
        label.
        """
        ids, order = self.txid, None
        if len(ids) > 1 and not (ids[1:] >= ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            ids = ids[order]
        tied = ids[1:] == ids[:-1]
        self._one_each = not tied.any()
        if order is None:
            if self._one_each:  # in order already: the arrays themselves, no copy (unless read-only:
                # the compiled look-up takes one array flavour)
                return tuple(np.require(a, requirements=["C", "W"]) for a in (ids, self.reported_us, self.label))
            order = np.arange(len(ids))
        sort_tied_runs(order, tied, self.label, self.reported_us, self.txid)
        return ids, self.reported_us[order], self.label[order]

    def as_of(self, txids: np.ndarray, at_us: np.ndarray | int) -> np.ndarray:
        """Per query: 1 if the latest event for that transaction reported at or before ``at_us`` is a
        fraud (at one instant a fraud report wins over a clearance), else 0."""
        return self.as_of_and_final(txids, at_us)[0]

    def as_of_and_final(self, txids: np.ndarray, at_us: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`as_of`, and per query whether no event of its transaction is reported after ``at_us``
        (the answer is then the same at every later time)."""
        txids = np.require(txids, np.int64, ["C", "W"])  # one array flavour for the compiled loop
        at = np.array(np.broadcast_to(np.asarray(at_us, dtype=np.int64), txids.shape))
        out = np.zeros(len(txids), np.int8)
        if len(self.txid) == 0 or len(txids) == 0:
            return out, np.ones(len(txids), dtype=bool)
        ids, reported, labels = self._index
        final = np.empty(len(txids), dtype=bool)
        if len(txids) < 2 or bool((txids[1:] >= txids[:-1]).all()):  # ascending (ids read day by day): as they are
            kernels.labels_as_of(ids, reported, labels, txids, at, out, final)
            return out, final
        # in random order every search would miss the cache: sorted first, each then starts near the last
        order = np.argsort(txids, kind="stable")
        got, got_final = np.empty_like(out), np.empty_like(final)
        kernels.labels_as_of(ids, reported, labels, txids[order], at[order], got, got_final)
        out[order], final[order] = got, got_final
        return out, final


def start_of_us(day: date) -> int:
    """The microsecond before ``day`` begins: labels "known before D" are those reported at or before it."""
    return micros_at_midnight(day) - 1


def attach_targets(frame: FeatureFrame, events: LabelEvents, as_of: date) -> FeatureFrame:
    """The frame with ``label`` = each transaction's label as known before ``as_of`` began."""
    frame.label = events.as_of(frame.txid, start_of_us(as_of))
    return frame


def _integers(chunk: pa.Array) -> np.ndarray:
    """A chunk without nulls as numpy, timestamps as int64 microseconds: a view where it can be one."""
    if pa.types.is_timestamp(chunk.type):
        if chunk.type.unit != "us":
            chunk = chunk.cast(pa.timestamp("us"))
        return chunk.to_numpy().view(np.int64)
    return chunk.to_numpy()


def _copy_column(column: pa.ChunkedArray, out: np.ndarray) -> None:
    """Copy a column without nulls into ``out`` (its length) a chunk at a time, timestamps as int64
    microseconds, converting to ``out``'s type in the copy."""
    start = 0
    for chunk in column.chunks:
        out[start : start + len(chunk)] = _integers(chunk)
        start += len(chunk)


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    """A timestamp column without nulls as int64 microseconds (a view of a single chunk in microseconds)."""
    if column.num_chunks == 1:
        return _integers(column.chunk(0))
    out = np.empty(len(column), np.int64)
    _copy_column(column, out)
    return out


# --- card and terminal history for the sequence model ---------------------------------------------
TERMINAL_STEP = 5  # per matured terminal row: label, log amount / 5, log ratio to its card's 30-day average,
#                    log1p(age in days) / 3, present (the scalings keep every input near [0, 1])
_AMOUNT_COL = MODEL_INPUTS.index("TX_AMOUNT")
_AVG30_COL = MODEL_INPUTS.index(customer_avg_amount(30))


@dataclass
class CardHistory:
    """Per target transaction, its card's previous ``k`` feature rows (oldest first), and optionally
    its terminal's last matured transactions.

    The pool is the feature rows some target looks back at, of the history days and the target
    days: ``pool_rows`` says where each comes from (its row among the history rows, then the target
    rows, ascending) in ``source`` (those rows' inputs, as read), and ``pool`` gathers them on first
    use (the scorer projects them straight from ``source`` instead, a chunk at a time).
    ``prev[i, j]`` is the pool row of the target's (k - j)-th previous transaction, -1 if none;
    ``gap_days[i, j]`` the time between it and the target, in days. ``terminal`` [n, kt,
    TERMINAL_STEP] describes the last ``kt`` transactions at the target's terminal that are at
    least the label delay older than it (so their labels have matured, as in the terminal risk
    features), oldest first, zeros where there is none.
    """

    prev: np.ndarray  # int64 [n, k]
    gap_days: np.ndarray  # float32 [n, k]
    terminal: np.ndarray | None = None  # float32 [n, kt, TERMINAL_STEP]
    pool_rows: np.ndarray | None = None  # int64 [N]: each pool row's row in source (None: source is the pool)
    source: np.ndarray | None = None  # float32 [rows, F]: the inputs of the history and target rows

    @cached_property
    def pool(self) -> np.ndarray:
        """float32 [N, F]: the inputs of the rows looked back at, row-major."""
        return self.source if self.pool_rows is None else take_rows(self.source, self.pool_rows)

    def pool_inputs(self, positions: np.ndarray) -> np.ndarray:
        """``pool[positions]`` (row-major), without gathering the whole pool."""
        if "pool" in self.__dict__ or self.pool_rows is None:
            return self.pool[positions]
        return take_rows(self.source, self.pool_rows[positions])

    @staticmethod
    def of_pool(pool: np.ndarray, prev: np.ndarray, gap_days: np.ndarray, terminal: np.ndarray | None = None
                ) -> CardHistory:
        """A history whose pool is given as it is: ``prev`` points into ``pool`` itself."""
        return CardHistory(prev, gap_days, terminal, source=pool)


def history_days(days: Sequence[date], lookback_days: int) -> list[date]:
    return Calendar.span(min(days), lookback_days, 1)


def search_sorted(a: np.ndarray, v: np.ndarray, side: str = "left") -> np.ndarray:
    """``np.searchsorted(a, v, side)``, with many queries answered in increasing order.

    Queries in random order make every binary search miss the cache (about 1.4 s for 1M queries
    into 8M values). Sorted first (a plain sort of packed words where the queries are non-negative
    and fit beside their positions), each search gallops on from the last one's answer
    (:func:`jobs.torch.kernels.search_ascending`).
    """
    v = np.asarray(v)
    a = np.require(a, np.int64, ["C"])
    out = np.empty(len(v), dtype=np.int64)
    if bool((v[1:] >= v[:-1]).all()):  # in order already (ids read day by day)
        kernels.search_ascending(a, np.require(v, np.int64, ["C"]), side == "right", out)
        return out
    index_bits = (len(v) - 1).bit_length()
    if int(v.min()) >= 0 and int(v.max()).bit_length() + index_bits <= 64:
        words = (v.astype(np.uint64) << np.uint64(index_bits)) | np.arange(len(v), dtype=np.uint64)
        words.sort()
        order = (words & np.uint64((1 << index_bits) - 1)).astype(np.int64)
        words >>= np.uint64(index_bits)
        in_order = words.view(np.int64)
    else:
        order = np.argsort(v, kind="stable")
        in_order = np.require(v[order], np.int64, ["C"])
    found = np.empty(len(v), dtype=np.int64)
    kernels.search_ascending(a, in_order, side == "right", found)
    out[order] = found
    return out


def sort_tied_runs(order: np.ndarray, tied: np.ndarray, *keys: np.ndarray) -> None:
    """Re-sort in place the runs of ``order`` whose neighbours are ``tied`` (``tied[i]``: positions i
    and i + 1 compare equal) by ``keys`` (``np.lexsort`` order: the last key is the primary one)."""
    if not tied.any():
        return
    run = np.zeros(len(order), dtype=bool)
    run[1:] |= tied
    run[:-1] |= tied
    rows = order[run]
    order[run] = rows[np.lexsort(tuple(k[rows] for k in keys))]


@dataclass
class KeyTimeOrder:
    """Rows ordered by (key, time, transaction id), with as-of lookups per key (:func:`order_by_key_time`)."""

    order: np.ndarray  # row indices in that order
    key: np.ndarray  # the sorted keys
    time: np.ndarray  # the sorted times
    code: np.ndarray | None  # int64 code of (key slot, time), increasing along ``order``; None if it would overflow
    key_min: int = 0
    key_count: int = 0  # keys key_min .. key_min + key_count - 1 have a slot in the code
    time_min: int = 0
    span: int = 1
    slot_of: np.ndarray | None = None  # with sparse keys: key - key_min -> its dense slot (see below)
    unit: int = 1  # microseconds per step of the code's time part

    def slots(self, keys: np.ndarray) -> np.ndarray:
        """Each key's slot in the code: -1 below every row's key, past the last slot above them.

        With ``slot_of`` a key absent from the rows gets the slot of the nearest present key below it,
        so a lookup lands after rows of another key: callers compare keys, as for any absent key.
        """
        slot = np.clip(keys - self.key_min, -1, self.key_count)
        if self.slot_of is None:
            return slot
        inside = (slot >= 0) & (slot < self.key_count)
        slot[inside] = self.slot_of[slot[inside]]
        slot[slot >= self.key_count] = int(self.slot_of[-1]) + 1
        return slot

    def rows_at_or_before(self, keys: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Per query: the position after the last sorted row with this key and time <= the query's.

        For a key no row has, a position after rows of other keys only (possibly 0).
        """
        if self.code is None:  # very wide key or time ranges: merge the queries into a 3-key sort instead
            n, m = len(self.key), len(keys)
            merged = np.lexsort((np.r_[np.zeros(n, np.int8), np.ones(m, np.int8)], np.r_[self.time, times],
                                 np.r_[self.key, keys]))
            is_query = merged >= n
            out = np.empty(m, dtype=np.int64)
            out[merged[is_query] - n] = np.cumsum(~is_query)[is_query]
            return out
        # every row's time is a whole number of units after time_min, so "row <= query" survives the
        # rounding down of the query's offset
        offset = np.clip((times - self.time_min) // self.unit + 1, 0, self.span - 1)
        return search_sorted(self.code, self.slots(keys) * self.span + offset, side="right")


def _dense_slots(key: np.ndarray, key_min: int, key_count: int) -> np.ndarray | None:
    """key - key_min -> the rank of the key among the distinct keys present (a lookup table), when
    the key range is not much wider than the rows (:func:`_table_max_range`); None for wider ones."""
    if key_count > _table_max_range(len(key)):
        return None
    present = np.zeros(key_count, dtype=bool)
    present[key - key_min] = True
    slots = np.cumsum(present, dtype=np.int64 if len(key) >= 2**31 else np.int32)
    slots -= 1
    return slots


def _table_max_range(rows: int) -> int:
    """The widest key range a lookup table over it may span for ``rows`` keys: 16 slots a row, and
    up to 16M slots whatever the rows (a table costs at most 5 bytes a slot)."""
    return 16 * rows + (1 << 24)


@dataclass
class WantedKeys:
    """A lookup table over a range of keys marking the wanted ones (:func:`wanted_keys`)."""

    table: np.ndarray  # bool, one slot per key low .. low + len(table) - 1
    low: int


def wanted_keys(wanted: np.ndarray, *keys: np.ndarray) -> WantedKeys | None:
    """A table over the range of ``wanted`` and every array of ``keys`` marking the ``wanted`` ones;
    None when there are no keys or the range is too wide for a table (:func:`_table_max_range`)."""
    keys = tuple(k for k in keys if len(k))
    if not len(wanted) or not keys:
        return None
    low = min(int(wanted.min()), *(int(k.min()) for k in keys))
    high = max(int(wanted.max()), *(int(k.max()) for k in keys))
    if high - low + 1 > _table_max_range(len(wanted) + sum(len(k) for k in keys)):
        return None
    table = np.zeros(high - low + 1, dtype=bool)
    table[wanted - low] = True
    return WantedKeys(table, low)


def history_rows_that_count(card: np.ndarray, time_us: np.ndarray, wanted: np.ndarray, k: int,
                            first_day: int) -> np.ndarray | None:
    """The history rows that can be among a target's ``k`` previous rows of its card: rows of cards
    in ``wanted`` (the targets' cards), less those before ``first_day`` (the first target's day,
    days since the epoch) whose card has at least ``k`` rows on the days between theirs and it:
    those ``k`` rows come between such a row and every target. None when at least 80% of the rows
    stay, or when the card range is too wide for a lookup table (then every row is sorted, as
    without this).

    With the generator's few transactions a card a day, most of a week's rows are older than the
    card's last ``k``: they are never sorted.
    """
    if not len(card) or k <= 0 or (table := wanted_keys(wanted, card)) is None:
        return None
    day = time_us // MICROS_PER_DAY
    first, last = int(day.min()), int(day.max())
    if last - first > 366:
        return None
    # the rows on or after the first target's day, then each day before it, newest first
    counted = np.r_[first_day, np.arange(min(last, first_day - 1), first - 1, -1)]
    if bool((day[1:] >= day[:-1]).all()):  # as read_frame lays them out: each day one slice
        rows, in_order = np.zeros(0, np.int64), day
    else:
        rows = np.argsort(day, kind="stable")
        in_order = day[rows]
    starts = np.searchsorted(in_order, counted)
    ends = np.r_[len(card), np.searchsorted(in_order, counted[1:] + 1)]
    seen = np.where(table.table, 0, k).astype(np.uint8 if k < 255 else np.int64)  # k and over: not wanted
    keep = np.empty(len(card), dtype=bool)
    kernels.keep_last_k_per_key(card, table.low, seen, rows, starts, ends, 1, k, keep)
    rows = np.flatnonzero(keep)
    return rows if len(rows) < 0.8 * len(card) else None


def _time_unit(offsets: np.ndarray) -> int:
    """The coarsest of a second, a millisecond and a microsecond that divides every offset."""
    for unit in (1_000_000, 1_000):
        if not (offsets % unit).any():
            return unit
    return 1


def _sort_order(code: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, code[order]) of non-negative codes below ``top``, ties in row order (a stable sort).

    Where the code and the row number fit one 64-bit word together, the words are sorted as values
    (numpy's vectorised sort: about 2x quicker than an argsort of 8M codes) and split again.
    """
    n = len(code)
    row_bits = max(1, (n - 1).bit_length())
    if top.bit_length() + row_bits <= 64:
        words = code.astype(np.uint64) << np.uint64(row_bits)
        words |= np.arange(n, dtype=np.uint64)
        words.sort()
        order = (words & np.uint64((1 << row_bits) - 1)).astype(np.int64)
        words >>= np.uint64(row_bits)
        return order, words.view(np.int64)
    order = np.argsort(code, kind="stable")
    return order, code[order]


def order_by_key_time(key: np.ndarray, time: np.ndarray, txid: np.ndarray) -> KeyTimeOrder:
    """Sort rows by (key, time, txid): two sort keys where (key, time) fit one int64, else three.

    Sparse keys (ids spread over a range much wider than the distinct ids, such as terminal ids)
    are first replaced by their rank among the keys present, and times counted in the coarsest unit
    all of them are whole multiples of (seconds for the generator's data), so the code fits in far
    more cases, often with the row number beside it.
    """
    if len(key) == 0:
        return KeyTimeOrder(np.zeros(0, np.int64), key, time, np.zeros(0, np.int64))
    key_min, time_min = int(key.min()), int(time.min())
    key_count = int(key.max()) - key_min + 1
    offsets = time - time_min
    unit = _time_unit(offsets)
    span = int(time.max()) // unit - time_min // unit + 2  # row offsets 1 .. span-1; 0 means "before all"
    slot_of = None
    slot = key - key_min
    if (key_count + 1) * span >= 2**62 and (slot_of := _dense_slots(key, key_min, key_count)) is not None:
        if (int(slot_of[-1]) + 2) * span < 2**62:
            slot = slot_of[slot].astype(np.int64)
        else:
            slot_of = None
    if slot_of is not None or (key_count + 1) * span < 2**62:
        code = slot * span
        code += offsets // unit if unit > 1 else offsets
        code += 1
        top = (int(slot_of[-1]) + 1 if slot_of is not None else key_count) * span
        order, sorted_code = _sort_order(code, top)
        # rows of one key at one instant (rare): those runs re-sorted by transaction id
        sort_tied_runs(order, sorted_code[1:] == sorted_code[:-1], txid, code)
        # the sorted keys and times from the sorted code: arithmetic, not two more random gathers
        sorted_slot, sorted_offset = np.divmod(sorted_code, span)
        sorted_key = key[order] if slot_of is not None else sorted_slot + key_min
        sorted_offset -= 1
        sorted_offset *= unit
        sorted_offset += time_min
        return KeyTimeOrder(order, sorted_key, sorted_offset, sorted_code, key_min, key_count,
                            time_min, span, slot_of, unit)
    order = np.lexsort((txid, time, key))
    return KeyTimeOrder(order, key[order], time[order], None)


def order_rows_by_key_time(rows: np.ndarray, key: np.ndarray, time: np.ndarray, txid: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` (ascending row numbers) ordered by (key, time, transaction id): (the rows in that
    order, their keys, their times).

    Where the (key, time) code and the row number fit one 64-bit word together, each row's word is
    built in one compiled pass (no gathered copies of the three columns), the words are sorted as
    plain values and split again in a second pass; rows of one key at one instant (rare) are then
    ordered by id. Otherwise :func:`order_by_key_time` sorts the rows' values.
    """
    n = len(rows)
    if n:
        key_min, key_max, time_min, time_max, unit = kernels.key_time_bounds(rows, key, time)
        span = time_max // unit - time_min // unit + 2  # row offsets 1 .. span - 1, as order_by_key_time's
        row_bits = max(1, int(rows[-1]).bit_length())
        if ((key_max - key_min + 1) * span).bit_length() + row_bits <= 64:
            words = kernels.key_time_words(rows, key, time, key_min, time_min, unit, span, row_bits)
            words.sort()
            order, sorted_key, sorted_time, tied = kernels.unpack_words(words, key_min, time_min, unit, span, row_bits)
            if tied.any():
                run = np.zeros(n, dtype=bool)
                run[1:] |= tied
                run[:-1] |= tied
                at = np.flatnonzero(run)
                order[at] = order[at][np.lexsort((txid[order[at]], sorted_time[at], sorted_key[at]))]
            return order, sorted_key, sorted_time
    by = order_by_key_time(key[rows], time[rows], txid[rows])
    return rows[by.order], by.key, by.time


def gather_inputs(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` for a 2-D tensor, row-major or laid out by column (then a column at a time, each
    a forward walk when the rows ascend): a [len(rows), F] tensor, of either layout."""
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(0) == 1:
        return torch.index_select(x.t(), 1, rows).t()
    return torch.index_select(x, 0, rows)


class SharedWork:
    """Pieces of one job that a thread with nothing else to do may take over.

    The job's own thread hands a list of independent pieces to :meth:`run`, which runs them, and
    another thread that waits for the job runs pieces too (:meth:`help_until`): with the card history
    on one thread and the shorter terminal history on the other, the second one's idle time goes into
    the first one's last steps. numpy releases the GIL in the array passes the pieces are made of.
    Waits are plain blocking ones (no timed polling): the job's end puts a last, empty item.
    """

    def __init__(self) -> None:
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()

    @staticmethod
    def _run_piece(done: Future, piece: Callable[[], object]) -> None:
        if done.set_running_or_notify_cancel():
            try:
                done.set_result(piece())
            except BaseException as exc:  # handed to the job's thread, which raises it
                done.set_exception(exc)

    def run(self, pieces: Sequence[Callable[[], object]]) -> list:
        """Run every piece, here or on a helping thread; their results in order (the first error raised)."""
        futures = [Future() for _ in pieces]
        for done, piece in zip(futures, pieces, strict=True):
            self._pieces.put((done, piece))
        for _ in futures:  # as many as were put, unless a helper took some: then the queue runs dry
            try:
                item = self._pieces.get_nowait()
            except queue.Empty:
                break
            if item is None:  # not expected while the job runs; kept for the helper
                self._pieces.put(None)
                break
            self._run_piece(*item)
        return [f.result() for f in futures]

    def help_until(self, job: Future) -> None:
        """Run pieces until ``job`` is done (then its result is ready)."""
        job.add_done_callback(lambda _: self._pieces.put(None))
        while (item := self._pieces.get()) is not None:
            self._run_piece(*item)


def _spans(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) in ``parts`` consecutive spans of nearly equal length (none empty)."""
    cuts = np.linspace(0, n, min(parts, max(n, 1)) + 1).astype(np.int64).tolist()
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


_SHARED_PIECES = 6  # pieces per shared step of the card history: small enough that a late helper gets some


def take_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``x[rows]`` for a 2-D array as a row-major array, with torch's gather on its intra-op threads:
    about 2x ``np.take`` on two cores (the rows are scattered, so it waits on memory, not on arithmetic)."""
    return np.ascontiguousarray(gather_inputs(torch.from_numpy(x), torch.from_numpy(rows)).numpy())


def build_history(target: FeatureFrame, history: FeatureFrame, k: int, pool: FeatureFrame | None = None,
                  shared: SharedWork | None = None) -> CardHistory:
    """Link every target row to its card's previous k rows among history + target rows.

    Order within a card: time, then transaction id (rows at the same second are ordered by id).
    ``pool``: history and target already as one frame, in that order (``target`` and ``history`` are
    then views of it), so the rows are not copied again. ``shared``: the steps after the sort go in
    pieces of targets that another thread may take (:class:`SharedWork`); the result is the same.
    """
    shared = shared or SharedWork()
    pool = FeatureFrame.concat([history, target]) if pool is None else pool
    n_hist = len(history)
    # the history rows that can be looked back at: of the targets' cards, among their last k
    rows = (history_rows_that_count(pool.card[:n_hist], pool.time_us[:n_hist], target.card, k,
                                    int(target.time_us.min()) // MICROS_PER_DAY) if len(target) else None)
    rows = np.arange(len(pool)) if rows is None else np.r_[rows, np.arange(n_hist, len(pool))]
    order, sorted_card, sorted_time = order_rows_by_key_time(rows, pool.card, pool.time_us, pool.txid)
    at = np.flatnonzero(order >= n_hist)  # the sorted positions holding target rows, ascending
    # a target's previous rows sit just before it in the sorted order (a walk over neighbours, in
    # cache); the pool keeps just the rows some target looks back at (about 4 in 10 of a week's rows
    # at one row a card a day), in their order as read, which the scorer's gathers walk forwards
    pieces = _spans(len(at), _SHARED_PIECES)
    kept = np.zeros(len(pool), dtype=bool)
    shared.run([lambda a=a, b=b: kernels.mark_looked_at(order, sorted_card, at, a, b, k, kept) for a, b in pieces])
    rank = np.empty(len(pool), dtype=np.int32 if len(pool) < 2**31 else np.int64)  # half the cache misses
    kernels.ranks_of_kept(kept, rank)
    pool_rows = np.flatnonzero(kept)
    prev = np.empty((len(at), k), dtype=np.int64)
    gap = np.empty((len(at), k), dtype=np.float32)
    shared.run([lambda a=a, b=b: kernels.link_previous(order, sorted_card, sorted_time, at, a, b, n_hist, rank, prev, gap)
                for a, b in pieces])  # each piece writes its own targets' rows
    return CardHistory(prev=prev, gap_days=gap, pool_rows=pool_rows, source=pool.x)


@dataclass
class TerminalRows:
    """What the terminal history needs of each row: far fewer columns than a FeatureFrame."""

    terminal: np.ndarray  # int64
    time_us: np.ndarray  # int64
    txid: np.ndarray  # int64
    amount: np.ndarray  # float
    avg30: np.ndarray  # float, the row's card's 30-day average amount

    COLUMNS = ("TERMINAL_ID", "TX_DATETIME", "TRANSACTION_ID", "TX_AMOUNT", customer_avg_amount(30))

    @staticmethod
    def of_frame(frame: FeatureFrame) -> TerminalRows:
        return TerminalRows(frame.terminal, frame.time_us, frame.txid,
                            frame.x[:, _AMOUNT_COL], frame.x[:, _AVG30_COL])

    @staticmethod
    def of_table(table: pa.Table) -> TerminalRows:
        return TerminalRows(
            terminal=table.column("TERMINAL_ID").to_numpy().astype(np.int64, copy=False),
            time_us=_micros(table.column("TX_DATETIME")),
            txid=table.column("TRANSACTION_ID").to_numpy().astype(np.int64, copy=False),
            amount=table.column("TX_AMOUNT").to_numpy(),
            avg30=table.column(customer_avg_amount(30)).to_numpy(),
        )

    def take(self, index: np.ndarray) -> TerminalRows:
        return TerminalRows(*(getattr(self, f.name)[index] for f in fields(TerminalRows)))

    @staticmethod
    def concat(parts: Sequence[TerminalRows]) -> TerminalRows:
        return TerminalRows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(TerminalRows)))


def _terminal_rows_in(parts: Sequence[TerminalRows], wanted: WantedKeys | None, bound: int) -> TerminalRows:
    """The rows of ``parts`` at or before ``bound`` with a ``wanted`` terminal (any terminal without
    a table), joined in part order: a pass marking each part's rows, one copying them."""
    keeps = []
    bits, low = (np.packbits(wanted.table, bitorder="little"), wanted.low) if wanted is not None else \
        (np.zeros(0, dtype=np.uint8), 0)
    for p in parts:
        keep = np.empty(len(p.terminal), dtype=bool)
        keeps.append((keep, kernels.mark_rows_in(p.terminal, p.time_us, bits, low, bound, keep)))
    n = sum(count for _, count in keeps)
    out = TerminalRows(np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
                       np.empty(n, np.result_type(*(p.amount for p in parts))),
                       np.empty(n, np.result_type(*(p.avg30 for p in parts))))
    start = 0
    for p, (keep, count) in zip(parts, keeps, strict=True):
        kernels.copy_kept_rows(keep, p.terminal, p.time_us, p.txid, p.amount, p.avg30,
                               out.terminal, out.time_us, out.txid, out.amount, out.avg30, start)
        start += count
    return out


def build_terminal_history(target: FeatureFrame, pool: TerminalRows | Sequence[TerminalRows], k: int,
                           delay_days: int, events: LabelEvents) -> np.ndarray:
    """Per target row, its terminal's last ``k`` pool rows with time <= t - delay, oldest first, each
    with its label as known at t (``events``).

    The bound is the terminal risk windows' near end (docs/contract.md, "Features"), and the label
    is taken as of the target's own time, as the terminal risk features take theirs. Within a
    terminal, rows are ordered by time then transaction id. Returns [n, k, TERMINAL_STEP] float32
    (see :class:`CardHistory`).
    """
    cut = target.time_us - delay_days * MICROS_PER_DAY
    parts = [pool] if isinstance(pool, TerminalRows) else list(pool)
    filled = [p for p in parts if len(p.terminal)]
    parts = filled or parts[:1]
    if len(target) and filled:
        # rows younger than every bound, and rows of terminals no target has, are never looked up:
        # dropped from each part as the parts are joined, in one pass each (a part wholly younger
        # is dropped whole)
        bound = int(cut.max())
        older = [p for p in parts if int(p.time_us.min()) <= bound]
        if older:
            pool = _terminal_rows_in(older, wanted_keys(target.terminal, *(p.terminal for p in older)), bound)
        else:  # every row younger than every bound: none is ever shown
            pool = parts[0].take(np.zeros(0, np.int64))
    else:
        pool = parts[0] if len(parts) == 1 else TerminalRows.concat(parts)
    m = len(target)
    by = order_by_key_time(pool.terminal, pool.time_us, pool.txid)
    order, sorted_terminal = by.order, by.key
    upto = by.rows_at_or_before(target.terminal, cut)  # the bound is inclusive
    # what each pool row shows, once per row rather than once per look-up: its scaled amounts, and
    # its label where no event comes after the row is first shown (its time plus the delay, the
    # earliest time any target may see it); only the others are looked up at each target's time
    log_amount = np.log1p(np.maximum(pool.amount, 0))
    label, final = events.as_of_and_final(pool.txid, pool.time_us + delay_days * MICROS_PER_DAY)
    shows = np.empty((len(pool.txid), 3), dtype=np.float32)  # label, log amount / 5, log ratio: a row each
    shows[:, 0] = label
    shows[:, 1] = log_amount / 5
    shows[:, 2] = log_amount - np.log1p(np.maximum(pool.avg30, 0))
    out = np.zeros((m, k, TERMINAL_STEP), dtype=np.float32)
    if not len(pool.terminal):  # no terminal row at all: every slot stays empty
        return out
    age = np.zeros((m, k))  # days, float64 until the log below
    later_at, later_row = np.empty(m * k, dtype=np.int64), np.empty(m * k, dtype=np.int64)
    n_later = kernels.terminal_steps(order, sorted_terminal, upto, target.terminal, target.time_us, pool.time_us,
                                     shows, final, out, age, later_at, later_row)
    later_at, later_row = later_at[:n_later], later_row[:n_later]
    label_now = out.reshape(m * k, TERMINAL_STEP)[:, 0]  # a view: labels looked up again at each target's time
    label_now[later_at] = events.as_of(pool.txid[later_row], target.time_us[later_at // k])
    out[:, :, 3] = np.log1p(age) / 3  # 0 where there is no row
    return out


def compile_history_loops() -> None:
    """Compile the history's loops (:mod:`jobs.torch.kernels`) for the array types the lake path
    passes them, or load them from numba's cache: a scoring read and a training read (targets with
    labels) of a tiny synthetic lake in a temporary folder, one day early enough that only the
    frame's own days hold terminal rows. An image build runs this once, so its steps find every loop
    compiled."""
    import tempfile

    from jobs.torch.model import ModelConfig
    from jobs.torch.synthetic import publish_synthetic, synthetic_features

    cal = Calendar(date(2018, 4, 1))
    cfg = ModelConfig(kind="seq", seq_len=5, lookback_days=cal.card_history_days, terminal_len=5,
                      terminal_lookback_days=cal.terminal_history_days, label_delay_days=cal.label_delay_days)
    reach = model_history_days(cfg.lookback_days, cfg.terminal_len, cfg.terminal_lookback_days)
    days = cal.span(cal.first_date + timedelta(days=reach + 1), reach + 1)
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake.from_uri(Path(tmp).as_uri())
        for i, day in enumerate(days):
            publish_synthetic(lake, day, synthetic_features(day, 200, seed=i, cards=40))
        read_for_model(lake, days[-1:], cfg, cal)  # scoring: every history day there
        read_for_model(lake, days[-3:], cfg, cal, labels_as_of=days[-1] + ONE_DAY)  # training: targets' labels
        read_for_model(lake, days[cfg.lookback_days : cfg.lookback_days + 1], cfg, cal)  # no older day yet


def model_history_days(lookback_days: int, terminal_len: int, terminal_lookback_days: int) -> int:
    """How many feature days before a scored or trained day the sequence model reads."""
    return max(lookback_days, terminal_lookback_days if terminal_len else 0)


def read_for_model(lake: Lake, days: Sequence[date], cfg, cal: Calendar, labels_as_of: date | None = None
                   ) -> tuple[FeatureFrame, CardHistory | None]:
    """What a model of ``cfg`` (a ``ModelConfig``) reads for ``days``: the features, for ``seq`` the
    card history and the terminal's matured rows (labels as of each row's time), and with
    ``labels_as_of`` the targets as known before that day began.

    History days before the pipeline's first date do not exist and are skipped, and so are days an
    operator abandoned (``Lake.abandon``); other ones must be published (a missing one is "not yet
    written", never "no history").
    """
    seq = cfg.kind == "seq"
    wanted = lake.readable(Dataset.FEATURES, cal.expected(history_days(days, cfg.lookback_days))) if seq else []
    terminal_len = cfg.terminal_len if seq else 0
    older = ([d for d in lake.readable(Dataset.FEATURES, cal.expected(history_days(days, cfg.terminal_lookback_days)))
              if d not in wanted] if terminal_len else [])

    def read_labels() -> LabelEvents | None:
        """The targets' labels (when asked for) and those of the rows the terminal history can show,
        which are at least the label delay older than the newest target day."""
        if labels_as_of is None and not terminal_len:
            return None
        matured = max(days) - timedelta(days=cfg.label_delay_days)
        shown = [d for d in {*days, *wanted, *older} if d <= matured] if terminal_len else []
        tx_days = sorted({*(days if labels_as_of is not None else []), *shown})
        if not tx_days:
            return LabelEvents(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int8))
        last = max(max(days), labels_as_of - ONE_DAY) if labels_as_of is not None else max(days)
        return LabelEvents.read(lake, tx_days, day_range(min(tx_days), last), cal.label_delay_days)

    def read_older() -> list[TerminalRows]:
        """The days only the terminal history reaches: just the columns it needs, a part per day
        (numpy views of each day's Arrow columns, not copies joined into one range)."""
        return [TerminalRows.of_table(lake.read_days(Dataset.FEATURES, [day], schema=FEATURE_SCHEMA,
                                                     columns=list(TerminalRows.COLUMNS))) for day in older]

    # A second thread reads the labels and the older days while this one builds the feature frame
    # (then takes the frame's days still unread), and links the card history while this one builds
    # the terminal's: numpy and pyarrow release the GIL in their sorts, array passes and reads, so
    # the two run side by side on two cores.
    with ThreadPoolExecutor(1) as side:
        labels, older_rows = side.submit(read_labels), side.submit(read_older)
        # history days and target days as one frame (history first), built day by day: each day's
        # Arrow buffers are copied into numpy and handed back to the system before the next day is
        # read, so the whole range is never held twice (at a 3M-row day the peak went from 10.5 to
        # 7.5 GiB)
        pool, day_rows = read_frame(lake, [*wanted, *days], helper=side)
        n_hist = sum(day_rows[: len(wanted)])
        target, history = pool.rows(n_hist, len(pool)), pool.rows(0, n_hist)
        shared = SharedWork()  # the card history's last steps, which this thread joins once the terminal's are done
        card = side.submit(build_history, target, history, cfg.seq_len, pool=pool, shared=shared) if seq else None
        events = labels.result()
        if labels_as_of is not None:
            attach_targets(target, events, labels_as_of)
        if not seq:
            return target, None
        terminal = None
        if terminal_len:
            starts = np.r_[0, np.cumsum(day_rows)].tolist()  # a part per day, views of the frame's rows
            parts = [*older_rows.result(), *(TerminalRows.of_frame(pool.rows(a, b))
                                             for a, b in itertools.pairwise(starts) if b > a)]  # in day order
            terminal = build_terminal_history(target, parts, terminal_len, cfg.label_delay_days, events)
        shared.help_until(card)
        out = card.result()
    out.terminal = terminal
    return target, out
