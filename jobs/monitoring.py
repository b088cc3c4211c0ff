"""Drift against a model's training data: the population stability index (PSI).

A model version keeps a *drift reference* beside its checkpoint (``reference.json`` in the
registry, written when it is trained): for its score and for each of its 15 inputs, the cut points
of the training data's deciles and the share of training rows in each bin. The nightly report
bins the day's scores and inputs at those cut points and compares the shares:

    PSI = sum over bins of (day share - training share) * ln(day share / training share)

(a bin empty on either side counts as a share of ``EMPTY_SHARE``, so one empty bin never gives an
infinite index). The usual reading, from credit scoring, is kept: below ``PSI_WATCH`` (0.1) the
population is stable, between 0.1 and ``PSI_DRIFT`` (0.25) it moved and is worth a look, above
0.25 it has shifted: the report flags that input (or the score) as drifted.

Deciles of the training data make every bin hold about a tenth of the training rows, so the index
weighs every part of the distribution alike. An input with few distinct values (a 0/1 flag) gets
fewer bins: equal cut points are merged. The score's reference is the model's scores of its own
training rows, which a model scores a little more sharply than rows it never saw: on unchanged
data the score's index reads slightly above zero (0.04 on the demo's day D, a week after the
champion's training window), far below the threshold. The weekend flag follows the calendar (a Sunday is all
weekend): its index is shown and never flagged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Inputs that follow the calendar, not the population: a Sunday's transactions are all weekend ones
# whatever the customers do. Their index is shown, never flagged.
CALENDAR_INPUTS = frozenset({"TX_DURING_WEEKEND"})
PSI_WATCH = 0.1
PSI_DRIFT = 0.25
BINS = 10
EMPTY_SHARE = 1e-4
REFERENCE_FORMAT = 1


def cut_points(values: np.ndarray, bins: int = BINS) -> list[float]:
    """Inner cut points of ``values``' quantiles (``bins - 1`` of them at most, distinct, sorted)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return []
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return [float(e) for e in np.unique(edges)]


def shares(values: np.ndarray, cuts: Sequence[float]) -> list[float]:
    """Share of the finite ``values`` in each bin (``len(cuts) + 1`` bins; a value equal to a cut
    point goes to the bin above it)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    counts = np.bincount(np.searchsorted(np.asarray(cuts, dtype=np.float64), values, side="right"),
                         minlength=len(cuts) + 1)
    total = counts.sum()
    return [float(c) for c in (counts / total if total else counts.astype(np.float64))]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    e = np.maximum(np.asarray(expected, dtype=np.float64), EMPTY_SHARE)
    a = np.maximum(np.asarray(actual, dtype=np.float64), EMPTY_SHARE)
    return float(np.sum((a - e) * np.log(a / e)))


def _binned(values: np.ndarray) -> dict:
    cuts = cut_points(values)
    return {"cuts": cuts, "shares": shares(values, cuts)}


def drift_reference(inputs: np.ndarray, names: Sequence[str], scores: np.ndarray) -> dict:
    """The reference of a model: deciles of its training scores and of each input column."""
    return {
        "format": REFERENCE_FORMAT,
        "rows": int(len(scores)),
        "score": _binned(scores),
        "inputs": {name: _binned(inputs[:, j]) for j, name in enumerate(names)},
    }


def verdict(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "drifted" if value > PSI_DRIFT else "moved" if value > PSI_WATCH else "stable"


def _entry(ref: dict, values: np.ndarray) -> dict:
    actual = shares(values, ref["cuts"])
    value = psi(ref["shares"], actual) if len(values) else None
    return {"psi": value, "verdict": verdict(value), "reference_shares": ref["shares"], "day_shares": actual,
            "cuts": ref["cuts"]}


def drift(reference: dict, inputs: dict[str, np.ndarray], scores: np.ndarray) -> dict:
    """PSI of the day's scores and of each input against ``reference``; inputs most drifted first."""
    per_input = [{"input": name, **_entry(ref, inputs[name])} for name, ref in reference["inputs"].items()
                 if name in inputs]
    for row in per_input:
        if row["input"] in CALENDAR_INPUTS:
            row["verdict"] = "follows the calendar"
    per_input.sort(key=lambda r: -(r["psi"] or 0.0))
    return {
        "threshold": PSI_DRIFT,
        "watch": PSI_WATCH,
        "reference_rows": reference["rows"],
        "score": _entry(reference["score"], scores),
        "inputs": per_input,
        "drifted_inputs": [r["input"] for r in per_input if r["verdict"] == "drifted"],
    }
