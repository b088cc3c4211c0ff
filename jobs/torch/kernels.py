"""The sequence model's history loops, compiled (numba): one pass where numpy needs many.

Linking a transaction to its card's previous rows walks a few neighbours of each target in an
array sorted by (card, time, id). Written with numpy, every step back is a handful of full-length
array passes (a gather, a compare, a mask, a scatter), each of them a trip through memory; here
each target's neighbours are visited once, in cache. The callers (:mod:`jobs.torch.data`) keep
the sorts, the lookup tables and the documentation of what the arrays mean; these functions only
loop. All of them release the GIL (``nogil``), so the history's pieces still run on two threads
side by side, and the compiled code is cached on disk (``cache``; ``NUMBA_CACHE_DIR`` where the
source folder is read-only), so a later process loads it instead of compiling again.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from jobs.common.calendar import MICROS_PER_DAY

_COMPILE = {"nogil": True, "cache": True}
MICROS_PER_DAY_F = float(MICROS_PER_DAY)  # float: the gap in days is a float64 division, as numpy's


@njit(**_COMPILE)
def _gallop(a: np.ndarray, q, lo: int, right: bool) -> int:
    """The first position at or after ``lo`` whose value is past ``q`` (``> q`` if ``right``, else
    ``>= q``) in ascending ``a``, all before ``lo`` known not to be: steps of 1, 2, 4, ... forwards,
    then a binary search in the last step."""
    n = len(a)
    hi, step = lo, 1
    while hi < n and (a[hi] <= q if right else a[hi] < q):
        lo = hi + 1
        hi = lo + step
        step *= 2
    hi = min(hi, n)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] <= q if right else a[mid] < q:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_COMPILE)
def keep_last_k_per_key(key: np.ndarray, low: int, seen: np.ndarray, rows: np.ndarray, starts: np.ndarray,
                        ends: np.ndarray, uncounted: int, k: int, keep: np.ndarray) -> None:
    """``keep[i]``: row i's key is wanted and fewer than ``k`` rows of that key lie on later days.

    ``seen[key - low]`` starts at 0 for a wanted key and at ``k`` or more for any other (a lookup
    table, small enough to stay in cache: a byte a key), and counts the key's rows on the days
    passed, up to ``k``. The days are given newest first, day j's rows as ``rows[starts[j]:ends[j]]``
    (with ``rows`` empty: rows ``starts[j] .. ends[j] - 1`` themselves); the first ``uncounted`` of
    them are only checked, and count for no other row.
    """
    direct = len(rows) == 0
    for j in range(len(starts)):
        for r in range(starts[j], ends[j]):
            i = r if direct else rows[r]
            keep[i] = seen[key[i] - low] < k
        if j < uncounted:
            continue
        for r in range(starts[j], ends[j]):
            slot = key[(r if direct else rows[r])] - low
            if seen[slot] < k:
                seen[slot] += 1


@njit(**_COMPILE)
def mark_looked_at(order: np.ndarray, sorted_key: np.ndarray, at: np.ndarray, a: int, b: int, k: int,
                   kept: np.ndarray) -> None:
    """For targets ``at[a:b]`` (sorted positions): mark ``kept[order[q]]`` for each of the up to ``k``
    positions q just before the target that hold its key (a key's rows are one run of the order)."""
    for j in range(a, b):
        p = at[j]
        key = sorted_key[p]
        for back in range(1, k + 1):
            q = p - back
            if q < 0 or sorted_key[q] != key:
                break
            kept[order[q]] = True


@njit(**_COMPILE)
def ranks_of_kept(kept: np.ndarray, rank: np.ndarray) -> None:
    """``rank[i]``: how many rows before row i are kept."""
    n = 0
    for i in range(len(kept)):
        rank[i] = n
        if kept[i]:
            n += 1


@njit(**_COMPILE)
def link_previous(order: np.ndarray, sorted_key: np.ndarray, sorted_time: np.ndarray, at: np.ndarray, a: int,
                  b: int, first_target: int, rank: np.ndarray, prev: np.ndarray, gap: np.ndarray) -> None:
    """For targets ``at[a:b]``: ``prev[t, k - back]``, the pool row (``rank`` of the row) ``back``
    positions before target row t (``order[at[j]] - first_target``) when it holds t's key, else -1,
    and ``gap[t, k - back]`` the time between the two in days (0 where there is none)."""
    k = prev.shape[1]
    for j in range(a, b):
        p = at[j]
        key = sorted_key[p]
        t = order[p] - first_target
        back = 1
        while back <= k:
            q = p - back
            if q < 0 or sorted_key[q] != key:
                break
            prev[t, k - back] = rank[order[q]]
            gap[t, k - back] = (sorted_time[p] - sorted_time[q]) / MICROS_PER_DAY_F
            back += 1
        while back <= k:
            prev[t, k - back] = -1
            gap[t, k - back] = 0
            back += 1


@njit(**_COMPILE)
def terminal_steps(order: np.ndarray, sorted_key: np.ndarray, upto: np.ndarray, key: np.ndarray,
                   time: np.ndarray, row_time: np.ndarray, shows: np.ndarray, final: np.ndarray, out: np.ndarray,
                   age: np.ndarray, later_at: np.ndarray, later_row: np.ndarray) -> int:
    """Per target i, its key's last ``k`` sorted rows before position ``upto[i]`` (``k = out.shape[1]``),
    oldest first: ``out[i, k - back, :3]`` the row's ``shows`` and ``out[i, k - back, 4]`` 1 (present);
    ``age[i, k - back]`` the row's age at ``time[i]`` in days (0 where there is no row). Rows whose
    ``final`` is False are listed in ``later_at`` (the flat index ``i * k + k - back``) and
    ``later_row``, for their labels to be looked up at each target's own time; returns how many."""
    k = out.shape[1]
    n_later = 0
    for i in range(len(upto)):
        p = upto[i]
        for back in range(1, k + 1):
            q = p - back
            if q < 0 or sorted_key[q] != key[i]:
                break
            row = order[q]
            col = k - back
            out[i, col, 0] = shows[row, 0]
            out[i, col, 1] = shows[row, 1]
            out[i, col, 2] = shows[row, 2]
            out[i, col, 4] = 1
            age[i, col] = (time[i] - row_time[row]) / MICROS_PER_DAY_F
            if not final[row]:
                later_at[n_later] = i * k + col
                later_row[n_later] = row
                n_later += 1
    return n_later


@njit(**_COMPILE)
def labels_as_of(ids: np.ndarray, reported: np.ndarray, labels: np.ndarray, txids: np.ndarray, at: np.ndarray,
                 out: np.ndarray, final: np.ndarray) -> None:
    """Per query j: ``out[j]``, the label of the last event of transaction ``txids[j]`` reported at or
    before ``at[j]`` (0 if none), and ``final[j]``, whether none of its events is reported later.

    The events are ordered by (id, reported time, label), so at one instant a fraud report comes
    after a clearance and wins. Queries in ascending order (the callers sort them) each start from
    the previous one's place (:func:`_gallop`): a walk forwards through the events.
    """
    n = len(ids)
    pos = 0
    last = np.iinfo(np.int64).min
    for j in range(len(txids)):
        q = txids[j]
        lo = _gallop(ids, q, pos if q >= last else 0, False)  # from the previous answer
        pos, last = lo, q
        i, latest = lo, -1
        while i < n and ids[i] == q and reported[i] <= at[j]:
            latest = i
            i += 1
        out[j] = labels[latest] if latest >= 0 else 0
        final[j] = not (i < n and ids[i] == q)


@njit(**_COMPILE)
def mark_rows_in(terminal: np.ndarray, time: np.ndarray, wanted_bits: np.ndarray, low: int, bound: int,
                 keep: np.ndarray) -> int:
    """``keep[i]``: row i is at or before ``bound`` and its terminal is wanted: bit ``terminal - low``
    of ``wanted_bits`` (a lookup table packed eight to a byte, little bit order, so that it stays in
    the core's cache; an empty table wants every terminal). Returns how many are kept."""
    every = len(wanted_bits) == 0
    n = 0
    for i in range(len(terminal)):
        ok = time[i] <= bound
        if ok and not every:
            slot = terminal[i] - low
            ok = (wanted_bits[slot >> 3] >> (slot & 7)) & 1 == 1
        keep[i] = ok
        n += ok
    return n


@njit(**_COMPILE)
def copy_kept_rows(keep: np.ndarray, terminal: np.ndarray, time: np.ndarray, txid: np.ndarray,
                   amount: np.ndarray, avg30: np.ndarray, out_terminal: np.ndarray, out_time: np.ndarray,
                   out_txid: np.ndarray, out_amount: np.ndarray, out_avg30: np.ndarray, start: int) -> None:
    """Append the kept rows (``keep``) of a part's five terminal-history columns to the outputs, from
    position ``start``."""
    n = start
    for i in range(len(keep)):
        if keep[i]:
            out_terminal[n] = terminal[i]
            out_time[n] = time[i]
            out_txid[n] = txid[i]
            out_amount[n] = amount[i]
            out_avg30[n] = avg30[i]
            n += 1


@njit(**_COMPILE)
def key_time_bounds(rows: np.ndarray, key: np.ndarray, time: np.ndarray) -> tuple[int, int, int, int, int]:
    """Over ``rows``: (smallest key, largest key, earliest time, latest time, the time unit): the
    coarsest of a second and a millisecond (in microseconds) that every time's offset from the
    earliest is a whole number of, else 1. (The divisors are written out: a constant one compiles
    to a multiplication, a variable one to a division ten times slower.)"""
    k0 = k1 = key[rows[0]]
    t0 = t1 = time[rows[0]]
    for r in rows:
        k0, k1 = min(k0, key[r]), max(k1, key[r])
        t0, t1 = min(t0, time[r]), max(t1, time[r])
    whole = True
    for r in rows:
        if (time[r] - t0) % 1_000_000:
            whole = False
            break
    if whole:
        return k0, k1, t0, t1, 1_000_000
    for r in rows:
        if (time[r] - t0) % 1_000:
            return k0, k1, t0, t1, 1
    return k0, k1, t0, t1, 1_000


@njit(**_COMPILE)
def key_time_words(rows: np.ndarray, key: np.ndarray, time: np.ndarray, key_min: int, time_min: int, unit: int,
                   span: int, row_bits: int) -> np.ndarray:
    """Per row r of ``rows``: one uint64 word, the (key, time) code ``(key - key_min) * span +
    (time - time_min) // unit + 1`` above ``row_bits`` bits holding r itself: sorted as plain values,
    the words put the rows in (key, time, row) order (the caller checks that the bits fit)."""
    words = np.empty(len(rows), dtype=np.uint64)
    shift = np.uint64(row_bits)
    for i in range(len(rows)):
        r = rows[i]
        offset = time[r] - time_min
        if unit == 1_000_000:
            offset //= 1_000_000
        elif unit == 1_000:
            offset //= 1_000
        code = (key[r] - key_min) * span + offset + 1
        words[i] = (np.uint64(code) << shift) | np.uint64(r)
    return words


@njit(**_COMPILE)
def unpack_words(words: np.ndarray, key_min: int, time_min: int, unit: int, span: int, row_bits: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted words (:func:`key_time_words`) -> (the rows in that order, their keys, their times,
    whether each position holds the same key and time as the next one). The codes ascend, so the
    key slot is divided out once per key, not once per row."""
    n = len(words)
    order = np.empty(n, dtype=np.int64)
    sorted_key = np.empty(n, dtype=np.int64)
    sorted_time = np.empty(n, dtype=np.int64)
    tied = np.zeros(max(n - 1, 0), dtype=np.bool_)
    shift = np.uint64(row_bits)
    mask = np.uint64((1 << row_bits) - 1)
    slot, slot_start, next_start = -1, 0, 0  # the current key slot's codes: slot_start .. next_start - 1
    last = -1
    for p in range(n):
        w = words[p]
        code = np.int64(w >> shift)
        order[p] = np.int64(w & mask)
        if code >= next_start:
            slot = code // span
            slot_start = slot * span
            next_start = slot_start + span
        sorted_key[p] = slot + key_min
        sorted_time[p] = (code - slot_start - 1) * unit + time_min
        if p and code == last:
            tied[p - 1] = True
        last = code
    return order, sorted_key, sorted_time, tied


@njit(**_COMPILE)
def search_ascending(a: np.ndarray, v: np.ndarray, right: bool, out: np.ndarray) -> None:
    """``np.searchsorted(a, v, side)`` for ascending queries ``v``: each search gallops forwards from
    the previous answer (:func:`_gallop`), a walk through ``a`` instead of a full binary search per
    query."""
    pos = 0
    for j in range(len(v)):
        pos = _gallop(a, v[j], pos, right)
        out[j] = pos
