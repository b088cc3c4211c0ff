"""The built-in transaction simulator (docs/contract.md, "Raw transactions"), written from the handbook's published rules.

Everything here is a pure function of its arguments and the seed, vectorised with numpy:

* :func:`make_population` draws the customers, the terminals and each customer's neighbour
  terminals (those within ``radius``), found with a k-d tree in customer chunks so that no
  customers x terminals distance matrix is ever held.
* :func:`draw_day` draws one day's genuine transactions (Poisson counts, times, amounts,
  terminals) for the whole population at once.
* :func:`iter_days` walks a date range and yields one finished Arrow table per day, with the
  three fraud scenarios applied. It holds only the last ``SCENARIO3_DAYS`` days in memory:
  a customer compromised on day c has a third of its transactions of days c .. c+13 marked,
  which is known once day c+13 has been drawn, so day c is final at that point.

Random streams are keyed by (seed, purpose, date), so a date's draws do not depend on which
range it is generated in; transaction ids count up from 0 over the generated range, in time
order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
from scipy.spatial import cKDTree

from jobs.common.schema import RAW_SCHEMA

SECONDS_PER_DAY = 86_400
AREA = 100.0
RADIUS = 5.0
TIME_MEAN_S = 43_200.0
TIME_STD_S = 20_000.0
MAX_MEAN_TX_PER_DAY = 4.0

SCENARIO1_AMOUNT = 220.0
SCENARIO2_TERMINALS_PER_DAY = 2
SCENARIO2_DAYS = 28
SCENARIO3_CUSTOMERS_PER_DAY = 3
SCENARIO3_DAYS = 14
SCENARIO3_AMOUNT_FACTOR = 5.0

# Purposes of the independent random streams (part of the seed, so never renumber them).
_STREAM_CUSTOMERS = 1
_STREAM_TERMINALS = 2
_STREAM_TRANSACTIONS = 3
_STREAM_FRAUD = 4

_NEIGHBOUR_CHUNK = 8_192  # customers per k-d tree query
_EPOCH = date(1970, 1, 1)


def _rng(seed: int, stream: int, day: date | None = None) -> np.random.Generator:
    key = [seed, stream] if day is None else [seed, stream, day.toordinal()]
    return np.random.default_rng(key)


@dataclass(frozen=True)
class Population:
    """Customer profiles, terminal locations and the customer -> terminal neighbour lists (CSR)."""

    customer_xy: np.ndarray  # (C, 2) float64
    mean_amount: np.ndarray  # (C,) float64
    std_amount: np.ndarray  # (C,) float64
    mean_tx_per_day: np.ndarray  # (C,) float64
    terminal_xy: np.ndarray  # (T, 2) float64
    neighbour_start: np.ndarray  # (C + 1,) int64: customer i uses neighbours[start[i]:start[i+1]]
    neighbours: np.ndarray  # (sum of degrees,) int32 terminal ids, ascending per customer

    @property
    def n_customers(self) -> int:
        return len(self.mean_amount)

    @property
    def n_terminals(self) -> int:
        return len(self.terminal_xy)

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.neighbour_start)


def make_customers(n: int, seed: int) -> dict[str, np.ndarray]:
    """Customer profiles: home in U(0,100)^2, mean amount U(5,100), std = mean/2, U(0,4) tx a day."""
    rng = _rng(seed, _STREAM_CUSTOMERS)
    xy = rng.uniform(0.0, AREA, size=(n, 2))
    mean_amount = rng.uniform(5.0, 100.0, size=n)
    mean_tx = rng.uniform(0.0, MAX_MEAN_TX_PER_DAY, size=n)
    return {"xy": xy, "mean_amount": mean_amount, "std_amount": mean_amount / 2.0, "mean_tx_per_day": mean_tx}


def make_terminals(n: int, seed: int) -> np.ndarray:
    """Terminal locations in U(0,100)^2, shape (n, 2)."""
    return _rng(seed, _STREAM_TERMINALS).uniform(0.0, AREA, size=(n, 2))


def neighbour_lists(
    customer_xy: np.ndarray, terminal_xy: np.ndarray, radius: float = RADIUS, chunk: int = _NEIGHBOUR_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """Terminals within ``radius`` of each customer, as CSR ``(start, terminal_ids)``.

    A k-d tree over the terminals is queried one chunk of customers at a time, so memory grows
    with the number of neighbour pairs, never with customers x terminals.
    """
    terminals = cKDTree(terminal_xy)
    counts = np.zeros(len(customer_xy), dtype=np.int64)
    parts: list[np.ndarray] = []
    for lo in range(0, len(customer_xy), chunk):
        pairs = cKDTree(customer_xy[lo : lo + chunk]).sparse_distance_matrix(
            terminals, radius, output_type="ndarray"
        )
        order = np.lexsort((pairs["j"], pairs["i"]))
        counts[lo : lo + chunk] = np.bincount(pairs["i"], minlength=min(chunk, len(customer_xy) - lo))
        parts.append(pairs["j"][order].astype(np.int32))
    start = np.zeros(len(customer_xy) + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    neighbours = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return start, neighbours


def make_population(customers: int, terminals: int, seed: int, radius: float = RADIUS) -> Population:
    profiles = make_customers(customers, seed)
    terminal_xy = make_terminals(terminals, seed)
    start, neighbours = neighbour_lists(profiles["xy"], terminal_xy, radius)
    return Population(
        customer_xy=profiles["xy"],
        mean_amount=profiles["mean_amount"],
        std_amount=profiles["std_amount"],
        mean_tx_per_day=profiles["mean_tx_per_day"],
        terminal_xy=terminal_xy,
        neighbour_start=start,
        neighbours=neighbours,
    )


@dataclass
class DayDraw:
    """One day's genuine transactions, sorted by time (then customer, then draw order)."""

    day: date
    seconds: np.ndarray  # int64 seconds after midnight, in [0, 86400)
    customer: np.ndarray  # int64
    terminal: np.ndarray  # int64
    amount: np.ndarray  # float64, rounded to cents (the original, before any scenario 3 change)

    def __len__(self) -> int:
        return len(self.seconds)


def draw_day(pop: Population, day: date, seed: int) -> DayDraw:
    """Every customer's transactions of one day (genuine amounts, no labels yet)."""
    rng = _rng(seed, _STREAM_TRANSACTIONS, day)
    per_customer = rng.poisson(pop.mean_tx_per_day)
    per_customer[pop.degree == 0] = 0  # a customer with no terminal nearby cannot pay anywhere
    customer = np.repeat(np.arange(pop.n_customers, dtype=np.int64), per_customer)

    seconds = np.floor(rng.normal(TIME_MEAN_S, TIME_STD_S, size=len(customer))).astype(np.int64)
    inside = (seconds >= 0) & (seconds < SECONDS_PER_DAY)
    customer, seconds = customer[inside], seconds[inside]

    mean = pop.mean_amount[customer]
    amount = rng.normal(mean, pop.std_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    amount = np.round(amount, 2)

    start = pop.neighbour_start[customer]
    pick = rng.integers(0, pop.neighbour_start[customer + 1] - start)
    terminal = pop.neighbours[start + pick].astype(np.int64)

    order = np.argsort(seconds, kind="stable")
    return DayDraw(day, seconds[order], customer[order], terminal[order], amount[order])


@dataclass
class _Pending:
    """A drawn day waiting for the scenario 3 draws that can still reach it."""

    draw: DayDraw
    first_id: int
    scenario3: np.ndarray  # bool, set by compromised customers


@dataclass(frozen=True)
class Compromises:
    """The fraud draws of one day: the terminals and customers compromised from that day on."""

    terminals: np.ndarray
    customers: np.ndarray


def _mark_scenario3(rng: np.random.Generator, customers: np.ndarray, window: list[_Pending]) -> None:
    """For each compromised customer, mark floor(n/3) of its n transactions in the window."""
    hits = [np.flatnonzero(np.isin(p.draw.customer, customers)) for p in window]
    for customer in customers:
        where = [h[window[k].draw.customer[h] == customer] for k, h in enumerate(hits)]
        days = np.repeat(np.arange(len(window)), [len(w) for w in where])
        rows = np.concatenate(where)
        chosen = rng.choice(len(rows), size=len(rows) // 3, replace=False)
        for k in np.unique(days[chosen]):
            window[k].scenario3[rows[chosen][days[chosen] == k]] = True


def _finish(pending: _Pending, compromised_until: np.ndarray) -> pa.Table:
    """Apply the scenarios to a day (1, then 2, then 3, each overwriting) and build its table."""
    draw = pending.draw
    day_index = (draw.day - _EPOCH).days
    scenario = np.zeros(len(draw), dtype=np.int32)
    scenario[draw.amount > SCENARIO1_AMOUNT] = 1
    scenario[compromised_until[draw.terminal] >= day_index] = 2
    scenario[pending.scenario3] = 3
    amount = np.where(pending.scenario3, np.round(draw.amount * SCENARIO3_AMOUNT_FACTOR, 2), draw.amount)
    micros = (day_index * SECONDS_PER_DAY + draw.seconds) * 1_000_000
    columns = [
        pa.array(np.arange(pending.first_id, pending.first_id + len(draw), dtype=np.int64)),
        pa.array(micros, type=RAW_SCHEMA.field("TX_DATETIME").type),
        pa.array(draw.customer),
        pa.array(draw.terminal),
        pa.array(amount),
        pa.array((scenario > 0).astype(np.int32)),
        pa.array(scenario),
    ]
    return pa.Table.from_arrays(columns, schema=RAW_SCHEMA)


def draw_compromises(pop: Population, day: date, seed: int) -> tuple[np.random.Generator, Compromises]:
    """The day's compromised terminals and customers, and the stream that goes on to pick frauds."""
    rng = _rng(seed, _STREAM_FRAUD, day)
    terminals = rng.choice(
        pop.n_terminals, size=min(SCENARIO2_TERMINALS_PER_DAY, pop.n_terminals), replace=False
    )
    customers = rng.choice(
        pop.n_customers, size=min(SCENARIO3_CUSTOMERS_PER_DAY, pop.n_customers), replace=False
    )
    return rng, Compromises(terminals=terminals, customers=customers)


IDS_PER_DAY = 100_000_000


def first_transaction_id(day: date) -> int:
    """IDs come from the date, so lakes generated in pieces never reuse one (and order by time)."""
    return (day - _EPOCH).days * IDS_PER_DAY


def iter_days(pop: Population, start: date, days: int, seed: int) -> Iterator[tuple[date, pa.Table]]:
    """Yield ``(day, table)`` for each day of the range, in order, each table in ``RAW_SCHEMA``.

    Memory is bounded by ``SCENARIO3_DAYS`` days of transactions, whatever the range length.
    Scenario windows that would run past the end of the range are cut there.
    """
    compromised_until = np.full(pop.n_terminals, np.iinfo(np.int64).min, dtype=np.int64)
    window: deque[_Pending] = deque()
    for i in range(days + SCENARIO3_DAYS - 1):
        if i < days:
            draw = draw_day(pop, start + timedelta(days=i), seed)
            window.append(_Pending(draw, first_transaction_id(draw.day), np.zeros(len(draw), dtype=bool)))
        first = i - (SCENARIO3_DAYS - 1)  # the oldest day: every draw reaching it is now known
        if first < 0:
            continue
        oldest = window[0]
        rng, hit = draw_compromises(pop, oldest.draw.day, seed)
        day_index = (oldest.draw.day - _EPOCH).days
        compromised_until[hit.terminals] = np.maximum(
            compromised_until[hit.terminals], day_index + SCENARIO2_DAYS - 1
        )
        _mark_scenario3(rng, hit.customers, list(window))
        yield oldest.draw.day, _finish(window.popleft(), compromised_until)


def generate(
    customers: int, terminals: int, start: date, days: int, seed: int
) -> Iterator[tuple[date, pa.Table]]:
    """Draw the population, then yield the days of the range (see :func:`iter_days`)."""
    return iter_days(make_population(customers, terminals, seed), start, days, seed)
