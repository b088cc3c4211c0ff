"""Exact time-window aggregates per key in O(n log n): one sort, prefix sums and as-of lookups.

This is the worker-side half of the features job (it runs inside ``mapInArrow``), so it imports
only numpy and pyarrow: the job ships it to the Python workers by value.

Why it is not quadratic. A window aggregate over ``(t - a, t - b]`` is a difference of two prefix
sums over the key's rows sorted by time: ``P[#rows <= t - b] - P[#rows <= t - a]``. Both counts are
binary searches ("as-of" lookups) in the sorted times, so every row costs O(log n) whatever the
window length, instead of re-aggregating its whole frame as a bounded ``rangeBetween`` does. A
search with ``side="right"`` counts every row at the looked-up instant, so rows at the same
microsecond as the bound fall on the closed side together (peer semantics, independent of row
order).

All keys of a batch are searched at once: rows are sorted by ``(key, time)`` and each row's
position is encoded as ``key_index * span + offset + time`` so that one ``np.searchsorted`` over
the whole batch never crosses from one key into another.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs.common.calendar import MICROS_PER_DAY

_INT64_HEADROOM = 2**62  # search codes stay below this


def window_us(days: int) -> int:
    """w(n) = n x 86,400 s, in microseconds."""
    return days * MICROS_PER_DAY


class SortedKeys:
    """Rows sorted by (key, time), with one int64 search code per row.

    ``code[i] = group(i) * span + reach + (t_i - t_min)``: looking up ``code - d`` for any
    ``0 <= d <= reach`` stays inside the row's own key. When the codes would not fit in int64
    (very many keys over a very long time span) the keys are split into chunks searched apart.
    """

    def __init__(self, keys: np.ndarray, times: np.ndarray, reach: int):
        self.order = np.lexsort((times, keys))
        keys_sorted = keys[self.order]
        times_sorted = times[self.order]
        n = len(keys_sorted)
        new_key = np.ones(n, dtype=bool)
        new_key[1:] = keys_sorted[1:] != keys_sorted[:-1]
        group = np.cumsum(new_key) - 1
        t_min = int(times_sorted.min()) if n else 0
        t_max = int(times_sorted.max()) if n else 0
        span = t_max - t_min + reach + 1
        keys_per_chunk = max(1, _INT64_HEADROOM // span)
        self.chunk_starts = np.flatnonzero(new_key & (group % keys_per_chunk == 0)).tolist() + [n]
        self.code = (group % keys_per_chunk) * span + (times_sorted - t_min + reach)
        self.reach = reach

    def count_at_or_before(self, back_us: int) -> np.ndarray:
        """For each sorted row: how many rows of its key have time <= t - back_us.

        The answer is an index into the sorted rows (the key's rows start before it), so it can
        be used directly with prefix sums over the sorted rows.
        """
        if not 0 <= back_us <= self.reach:
            raise ValueError(f"look-back {back_us} us outside 0..{self.reach}")
        out = np.empty(len(self.code), dtype=np.int64)
        for lo, hi in zip(self.chunk_starts[:-1], self.chunk_starts[1:], strict=True):
            chunk = self.code[lo:hi]
            out[lo:hi] = lo + np.searchsorted(chunk, chunk - back_us, side="right")
        return out


def _prefix(values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(values) + 1, dtype=values.dtype)
    np.cumsum(values, out=out[1:])
    return out


MAX_SUMMABLE = 1e12  # the largest amount the window sums take; FRAUD_MAX_AMOUNT may not exceed it


class FixedPointPrefix:
    """Prefix sums of doubles in int64 fixed-point limbs, so window sums are exact and repeatable.

    A plain float cumsum loses ``eps x (running total)`` in every difference, and its rounding
    depends on which other keys share the batch, so a range run would not match day-by-day runs
    bit for bit. Here each value is ``coarse x 2**-20 + fine x 2**-60`` with integer limbs (exact
    for every value whose lowest bit is >= 2**-60, i.e. any amount >= 1/128 and any cent amount),
    integer prefix sums are exact (int64 wrap-around cancels in the differences), and a window sum
    is a function of the window's own values only, rounded once or twice at the end.

    Those two limbs hold a window's sum while it stays below 2**41 (and the window below 2**23
    rows). A window beyond that (a huge amount, or a terminal with millions of transactions) is
    summed instead from five narrower limbs (2**32 units, units, then three 20-bit fractions),
    whose sums cannot overflow for any amount the clean step lets through (at most
    ``FRAUD_MAX_AMOUNT``, never above 1e12) and any window under 2**31 rows. Which way a row's
    window is summed depends only on that window's values, so the result stays repeatable.
    """

    COARSE_BITS = 20
    FINE_BITS = 40  # fine limb < 2**40
    FAST_ROWS = 2**23  # ... so up to 2**23 rows per window cannot overflow it
    FAST_SUM = 2.0**41  # coarse sums stay below 2**61
    _WIDE = 2.0**32
    _PART = 2.0**20

    def __init__(self, values: np.ndarray):
        if len(values) and float(np.abs(values).max()) > MAX_SUMMABLE:
            raise ValueError(f"amount {float(np.abs(values).max())} above {MAX_SUMMABLE:g}: clean quarantines those")
        self.values = values
        scaled = values * 2.0**self.COARSE_BITS
        coarse = np.floor(scaled)
        fine = np.rint((scaled - coarse) * 2.0**self.FINE_BITS)  # the fraction is exact
        self.largest = float(np.abs(values).max()) if len(values) else 0.0
        safe = self.largest * self.FAST_ROWS < self.FAST_SUM
        self.coarse = _prefix(coarse.astype(np.int64)) if safe or self.largest < 2.0**42 else None
        self.fine = _prefix(fine.astype(np.int64))
        self._narrow: list[np.ndarray] | None = None

    def _limbs(self) -> list[np.ndarray]:
        if self._narrow is None:
            whole = np.floor(self.values)
            high = np.floor(whole / self._WIDE)
            low = whole - high * self._WIDE
            parts = [high, low]
            rest = self.values - whole
            for _ in range(3):
                rest = rest * self._PART
                part = np.floor(rest)
                parts.append(part)
                rest = rest - part
            self._narrow = [_prefix(p.astype(np.int64)) for p in parts]
        return self._narrow

    def _wide_between(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        high, low, f1, f2, f3 = ((limb[hi] - limb[lo]).astype(np.float64) for limb in self._limbs())
        return high * self._WIDE + low + (f1 + (f2 + f3 / self._PART) / self._PART) / self._PART

    def between(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sum of the sorted values at positions lo .. hi-1, per row."""
        rows = hi - lo
        if len(rows) and self.coarse is not None and self.largest * rows.max() < self.FAST_SUM \
                and rows.max() < self.FAST_ROWS:
            return self._fast(lo, hi)
        wide = self._wide_between(lo, hi)
        fast_rows = (np.abs(wide) < self.FAST_SUM) & (rows < self.FAST_ROWS)
        if self.coarse is not None and fast_rows.any():
            wide[fast_rows] = self._fast(lo[fast_rows], hi[fast_rows])
        return wide

    def _fast(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        coarse = (self.coarse[hi] - self.coarse[lo]) * 2.0**-self.COARSE_BITS
        return coarse + (self.fine[hi] - self.fine[lo]) * 2.0 ** -(self.COARSE_BITS + self.FINE_BITS)


def customer_windows(
    keys: np.ndarray, times: np.ndarray, amounts: np.ndarray, windows: Sequence[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per row: (count, mean amount) of its key's rows with time in (t - w(n), t], for each n.

    Results are in the input row order.
    """
    if len(keys) == 0:
        return {n: (np.zeros(0, np.int32), np.zeros(0)) for n in windows}
    rows = SortedKeys(keys, times, reach=window_us(max(windows)))
    sums = FixedPointPrefix(amounts[rows.order])
    near = rows.count_at_or_before(0)  # closed near end: every row at the same instant
    out = {}
    for n in windows:
        far = rows.count_at_or_before(window_us(n))  # open far end: time <= t - w(n) excluded
        count = near - far
        mean = sums.between(far, near) / count  # count >= 1: the row itself is inside
        out[n] = (_unsort(count.astype(np.int32), rows.order), _unsort(mean, rows.order))
    return out


@dataclass(frozen=True)
class LabelChanges:
    """When transactions became (+1) or stopped being (-1) fraud: the label events turned into changes.

    ``key`` is the transaction's terminal, ``tx_time`` its time, ``time`` when the change was
    reported (microseconds). A transaction counts as fraud at t when the sum of its changes reported
    at or before t is 1.
    """

    key: np.ndarray
    tx_time: np.ndarray
    time: np.ndarray
    delta: np.ndarray  # +1 / -1

    @staticmethod
    def none() -> LabelChanges:
        empty = np.zeros(0, np.int64)
        return LabelChanges(empty, empty, empty, empty)


def label_changes(txid: np.ndarray, key: np.ndarray, tx_time: np.ndarray, reported: np.ndarray,
                  label: np.ndarray) -> LabelChanges:
    """Events (one row each, any order) -> changes of each transaction's state, which starts at 0.

    For one transaction the events are taken in the order reported, then label (at one instant a
    fraud report comes last, so it wins); an event that repeats the state changes nothing.
    """
    if len(txid) == 0:
        return LabelChanges.none()
    order = np.lexsort((label, reported, txid))
    txid, key, tx_time, reported, label = (a[order] for a in (txid, key, tx_time, reported, label))
    first = np.r_[True, txid[1:] != txid[:-1]]
    before = np.where(first, 0, np.r_[0, label[:-1]])
    change = label != before
    return LabelChanges(key[change], tx_time[change], reported[change],
                        np.where(label[change] == 1, 1, -1).astype(np.int64))


def inline_changes(key: np.ndarray, tx_time: np.ndarray, label: np.ndarray, delay_days: int) -> LabelChanges:
    """Transactions with only an inline label: each labelled fraud becomes one the delay after it."""
    fraud = label == 1
    return LabelChanges(key[fraud], tx_time[fraud], tx_time[fraud] + window_us(delay_days),
                        np.ones(int(fraud.sum()), np.int64))


def weighted_at_or_before(point_keys: np.ndarray, point_times: np.ndarray, weights: np.ndarray,
                          query_keys: np.ndarray, query_times: np.ndarray) -> np.ndarray:
    """Per query: the sum of the weights of the points with the query's key and time <= its time."""
    out = np.zeros(len(query_keys), dtype=np.int64)
    if len(point_keys) == 0 or len(query_keys) == 0:
        return out
    order = np.lexsort((point_times, point_keys))
    pk, pt = point_keys[order], point_times[order]
    prefix = _prefix(weights[order].astype(np.int64))
    keys, starts = np.unique(pk, return_index=True)
    stops = np.r_[starts[1:], len(pk)]
    slot = np.searchsorted(keys, query_keys)
    slot_ok = slot < len(keys)
    slot_ok[slot_ok] = keys[slot[slot_ok]] == query_keys[slot_ok]
    rows = np.flatnonzero(slot_ok)
    lo, hi = starts[slot[rows]], stops[slot[rows]]
    # the points of one key are a contiguous, time-sorted run: search each query inside its run,
    # all at once through one int64 code (key index, time) when it fits
    t0 = int(min(pt.min(), query_times.min()))
    width = int(max(pt.max(), query_times.max())) - t0 + 2
    if (len(keys) + 1) * width < _INT64_HEADROOM:
        code = np.searchsorted(keys, pk) * width + (pt - t0)
        pos = np.searchsorted(code, slot[rows] * width + (query_times[rows] - t0), side="right")
    else:
        pos = np.array([lo_ + np.searchsorted(pt[lo_:hi_], q, side="right")
                        for lo_, hi_, q in zip(lo, hi, query_times[rows], strict=True)], dtype=np.int64)
    out[rows] = prefix[pos] - prefix[lo]
    return out


def terminal_windows(
    keys: np.ndarray, times: np.ndarray, changes: LabelChanges, windows: Sequence[int], delay_days: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per row: (count, fraud share) of its key's rows with time in (t - w(n+delay), t - w(delay)].

    A row s in that window counts as fraud when its label as of t (the latest event reported at or
    before t) is a fraud. Each change (reported at r, +1 or -1) of a transaction s therefore reaches
    exactly the queries t in ``[max(r, s + w(delay)), s + w(n + delay))``: two as-of sums per row,
    whatever the number of events. With only inline labels (every one reported at s + w(delay))
    this is the share of the window's rows labelled fraud. The share is 0.0 for an empty window.
    """
    if len(keys) == 0:
        return {n: (np.zeros(0, np.int32), np.zeros(0)) for n in windows}
    rows = SortedKeys(keys, times, reach=window_us(max(windows) + delay_days))
    near = rows.count_at_or_before(window_us(delay_days))  # t - w(delay) itself is inside
    enters = np.maximum(changes.time, changes.tx_time + window_us(delay_days))
    out = {}
    for n in windows:
        far = rows.count_at_or_before(window_us(n + delay_days))
        count = _unsort(near - far, rows.order)  # back to the input order, like the as-of sums below
        leaves = changes.tx_time + window_us(n + delay_days)
        live = enters < leaves
        fraud = (weighted_at_or_before(changes.key[live], enters[live], changes.delta[live], keys, times)
                 - weighted_at_or_before(changes.key[live], leaves[live], changes.delta[live], keys, times))
        risk = np.divide(fraud, count, out=np.zeros(len(count)), where=count > 0)
        out[n] = (count.astype(np.int32), risk)
    return out


def _unsort(sorted_values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(sorted_values)
    out[order] = sorted_values
    return out


# --- mapInArrow adapters: one call per Spark partition, the whole partition at once ------------


def _whole_partition(batches: Iterator[pa.RecordBatch]) -> pa.Table | None:
    batches = list(batches)
    return pa.Table.from_batches(batches).combine_chunks() if batches else None


def _micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return column.cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()


def _emit(table: pa.Table, max_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    yield from table.to_batches(max_chunksize=max_rows)


def add_customer_windows(
    batches: Iterator[pa.RecordBatch],
    *,
    key: str,
    time: str,
    amount: str,
    windows: Sequence[int],
    names: dict[int, tuple[str, str]],
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: append count and average columns for each customer window."""
    table = _whole_partition(batches)
    if table is None:
        return
    result = customer_windows(
        table.column(key).to_numpy(), _micros(table.column(time)), table.column(amount).to_numpy(), windows
    )
    for n in windows:
        count_name, mean_name = names[n]
        table = table.append_column(count_name, pa.array(result[n][0], pa.int32()))
        table = table.append_column(mean_name, pa.array(result[n][1], pa.float64()))
    yield from _emit(table)


EVENT_TIME = "REPORTED_AT"  # set on label-event rows mixed into the terminal pass, null on transactions
EVENT_LABEL = "EVENT_LABEL"


def add_terminal_windows(
    batches: Iterator[pa.RecordBatch],
    *,
    key: str,
    time: str,
    label: str,
    txid: str,
    windows: Sequence[int],
    delay_days: int,
    names: dict[int, tuple[str, str]],
    keep_from_us: int,
    keep_until_us: int,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: append count and risk columns per terminal window, keep rows in [from, until).

    The partition holds a terminal's transactions (with their inline ``label``) and the feed's label
    events for transactions of those terminals (rows with ``REPORTED_AT`` set). An inline label
    counts as reported ``delay_days`` after its transaction; the rows that come out are the
    transactions only, without any label.
    """
    table = _whole_partition(batches)
    if table is None:
        return
    is_event = table.column(EVENT_TIME).is_valid().to_numpy(zero_copy_only=False)
    events = table.filter(pa.array(is_event))
    table = table.filter(pa.array(~is_event))
    times = _micros(table.column(time))
    ids = table.column(txid).to_numpy()
    terminal = table.column(key).to_numpy()
    inline = table.column(label)
    labelled = inline.is_valid().to_numpy(zero_copy_only=False)
    inline_label = inline.fill_null(0).to_numpy()
    feed_ids = np.unique(events.column(txid).to_numpy())
    with_feed = np.isin(ids, feed_ids)
    delay = window_us(delay_days)
    # a transaction without feed events changes once at most: it becomes fraud when its inline label is
    simple = inline_changes(terminal, times, np.where(labelled & ~with_feed, inline_label, 0), delay_days)
    both = labelled & with_feed
    general = label_changes(
        np.r_[ids[both], events.column(txid).to_numpy()],
        np.r_[terminal[both], events.column(key).to_numpy()],
        np.r_[times[both], _micros(events.column(time))],
        np.r_[times[both] + delay, _micros(events.column(EVENT_TIME))],
        np.r_[inline_label[both], events.column(EVENT_LABEL).to_numpy()],
    )
    changes = LabelChanges(*(np.r_[getattr(simple, f), getattr(general, f)] for f in ("key", "tx_time", "time", "delta")))
    result = terminal_windows(terminal, times, changes, windows, delay_days)
    keep = (times >= keep_from_us) & (times < keep_until_us)
    table = table.filter(pa.array(keep)).drop_columns([c for c in (label, EVENT_TIME, EVENT_LABEL)
                                                        if c in table.column_names])
    for n in windows:
        count_name, risk_name = names[n]
        table = table.append_column(count_name, pa.array(result[n][0][keep], pa.int32()))
        table = table.append_column(risk_name, pa.array(result[n][1][keep], pa.float64()))
    yield from _emit(table)
