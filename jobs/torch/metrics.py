"""Evaluation metrics and the test-set rule of docs/contract.md ("Training, evaluation and promotion") (numpy and scikit-learn only, no torch).

All functions take flat arrays, one entry per transaction: ``day`` (any sortable day key, e.g.
``datetime64[D]`` or int day numbers), ``card`` (CUSTOMER_ID), ``label`` (0/1; missing labels must
already be 0) and ``score``.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def auc_roc(label: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); NaN when only one class is present."""
    label = np.asarray(label)
    if label.size == 0 or label.min() == label.max():
        return float("nan")
    return float(roc_auc_score(label, score))


def average_precision(label: np.ndarray, score: np.ndarray) -> float:
    """Average precision (scikit-learn); NaN when there is no positive."""
    label = np.asarray(label)
    if label.size == 0 or label.max() == 0:
        return float("nan")
    return float(average_precision_score(label, score))


def _cards_by_max_score(card: np.ndarray, label: np.ndarray, score: np.ndarray):
    """Per card: (card ids, max score, any fraud), ordered by max score desc, then card id asc."""
    cards, inverse = np.unique(card, return_inverse=True)
    best = np.full(cards.size, -np.inf)
    np.maximum.at(best, inverse, score.astype(np.float64))
    fraud = np.zeros(cards.size, dtype=bool)
    np.logical_or.at(fraud, inverse, label.astype(bool))
    order = np.lexsort((cards, -best))
    return cards[order], best[order], fraud[order]


def card_precision_at_k(
    day: np.ndarray, card: np.ndarray, label: np.ndarray, score: np.ndarray, k: int = 100
) -> tuple[float, list[float]]:
    """Card Precision@k (docs/contract.md, "Training, evaluation and promotion"): mean over test days, and the per-day values in day order.

    Per day, in day order: drop the cards detected on an earlier day (fraud cards that were in
    that day's top k), score each remaining card by its maximum transaction score, take the k top
    cards (ties broken by card id), count those with a fraud that day, and divide by k (always k,
    even with fewer cards).
    """
    day, card, label, score = (np.asarray(a) for a in (day, card, label, score))
    detected = np.empty(0, dtype=card.dtype)
    per_day: list[float] = []
    for d in np.unique(day):
        on_day = day == d
        keep = on_day & ~np.isin(card, detected)
        cards, _, fraud = _cards_by_max_score(card[keep], label[keep], score[keep])
        top_cards, top_fraud = cards[:k], fraud[:k]
        per_day.append(float(top_fraud.sum()) / k)
        detected = np.concatenate([detected, top_cards[top_fraud]])
    mean = float(np.mean(per_day)) if per_day else float("nan")
    return mean, per_day


def keep_unblocked(
    day: np.ndarray,
    card: np.ndarray,
    known_day: np.ndarray,
    known_card: np.ndarray,
    known_label: np.ndarray,
    train_start,
    delay_days: int = 8,
) -> np.ndarray:
    """The test-set rule (docs/contract.md, "Training, evaluation and promotion"): which test transactions to keep.

    ``day``/``card`` describe the test transactions; ``known_*`` the labelled transactions the
    rule may look at (any superset of training start .. last test day - 8). A test transaction
    of day T is dropped when its card had a fraud on a day in [train_start, T - delay_days].
    Days must be ``datetime64[D]`` (or integers counting days).
    """
    day, card = np.asarray(day), np.asarray(card)
    known_day, known_card, known_label = (np.asarray(a) for a in (known_day, known_card, known_label))
    is_fraud = known_label.astype(bool) & (known_day >= train_start)
    fraud_day, fraud_card = known_day[is_fraud], known_card[is_fraud]
    keep = np.ones(day.size, dtype=bool)
    if fraud_card.size == 0:
        return keep
    # The first fraud day per card is all the rule needs: the card is dropped from that day + delay on.
    cards, inverse = np.unique(fraud_card, return_inverse=True)
    first = np.full(cards.size, np.max(fraud_day))
    np.minimum.at(first, inverse, fraud_day)
    pos = np.searchsorted(cards, card)
    pos = np.clip(pos, 0, cards.size - 1)
    has_fraud = cards[pos] == card
    keep[has_fraud] = ~(first[pos[has_fraud]] <= day[has_fraud] - delay_days)
    return keep


def evaluate(
    day: np.ndarray, card: np.ndarray, label: np.ndarray, score: np.ndarray, k: int = 100
) -> dict[str, float | int | list[float]]:
    """AUC ROC, average precision and Card Precision@k of one (already filtered) test set."""
    label = np.asarray(label).astype(np.int8)
    cp, per_day = card_precision_at_k(day, card, label, score, k)
    return {
        "auc_roc": auc_roc(label, score),
        "average_precision": average_precision(label, score),
        f"card_precision@{k}": cp,
        f"card_precision@{k}_per_day": per_day,
        "n_transactions": int(label.size),
        "n_fraud": int(label.sum()),
    }
