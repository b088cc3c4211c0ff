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


class FixedPointPrefix:
    """Prefix sums of doubles in two int64 fixed-point limbs, so window sums are exact and repeatable.

    A plain float cumsum loses ``eps x (running total)`` in every difference, and its rounding
    depends on which other keys share the batch, so a range run would not match day-by-day runs
    bit for bit. Here each value is ``coarse x 2**-20 + fine x 2**-60`` with integer limbs (exact
    for every value whose lowest bit is >= 2**-60, i.e. any amount >= 1/128 and any cent amount),
    integer prefix sums are exact (int64 wrap-around cancels in the differences), and a window sum
    is a function of the window's own values only, rounded once or twice at the end.
    """

    COARSE_BITS = 20
    FINE_BITS = 40  # fine limb < 2**40, so up to 2**23 rows per window cannot overflow it

    def __init__(self, values: np.ndarray):
        scaled = values * 2.0**self.COARSE_BITS
        coarse = np.floor(scaled)
        fine = np.rint((scaled - coarse) * 2.0**self.FINE_BITS)  # the fraction is exact
        self.coarse = _prefix(coarse.astype(np.int64))
        self.fine = _prefix(fine.astype(np.int64))
        self.largest = float(np.abs(values).max()) if len(values) else 0.0

    def between(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Sum of the sorted values at positions lo .. hi-1, per row."""
        rows = hi - lo
        if len(rows) and (rows.max() >= 2**23 or self.largest * rows.max() >= 2.0 ** (62 - self.COARSE_BITS)):
            raise ValueError(f"window sums too large for exact fixed point (max value {self.largest})")
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


def terminal_windows(
    keys: np.ndarray, times: np.ndarray, frauds: np.ndarray, windows: Sequence[int], delay_days: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per row: (count, fraud share) of its key's rows with time in (t - w(n+delay), t - w(delay)].

    ``frauds`` is 0/1 with nulls already counted as 0. The share is 0.0 for an empty window.
    """
    if len(keys) == 0:
        return {n: (np.zeros(0, np.int32), np.zeros(0)) for n in windows}
    rows = SortedKeys(keys, times, reach=window_us(max(windows) + delay_days))
    fraud_prefix = _prefix(frauds[rows.order].astype(np.int64))
    near = rows.count_at_or_before(window_us(delay_days))  # t - w(delay) itself is inside
    out = {}
    for n in windows:
        far = rows.count_at_or_before(window_us(n + delay_days))
        count = near - far
        fraud = fraud_prefix[near] - fraud_prefix[far]
        risk = np.divide(fraud, count, out=np.zeros(len(count)), where=count > 0)
        out[n] = (_unsort(count.astype(np.int32), rows.order), _unsort(risk, rows.order))
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


def add_terminal_windows(
    batches: Iterator[pa.RecordBatch],
    *,
    key: str,
    time: str,
    label: str,
    windows: Sequence[int],
    delay_days: int,
    names: dict[int, tuple[str, str]],
    keep_from_us: int,
    keep_until_us: int,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: append count and risk columns per terminal window, keep rows in [from, until)."""
    table = _whole_partition(batches)
    if table is None:
        return
    times = _micros(table.column(time))
    frauds = table.column(label).fill_null(0).to_numpy() == 1
    result = terminal_windows(table.column(key).to_numpy(), times, frauds, windows, delay_days)
    keep = (times >= keep_from_us) & (times < keep_until_us)
    table = table.filter(pa.array(keep))
    for n in windows:
        count_name, risk_name = names[n]
        table = table.append_column(count_name, pa.array(result[n][0][keep], pa.int32()))
        table = table.append_column(risk_name, pa.array(result[n][1][keep], pa.float64()))
    yield from _emit(table)
