"""Metrics of docs/contract.md ("Training, evaluation and promotion") on examples small enough to compute by hand."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from jobs.torch import metrics


def test_metrics_module_does_not_import_torch():
    code = "import sys, jobs.torch.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_auc_and_average_precision_hand_computed():
    label = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3/4
    assert metrics.auc_roc(label, score) == pytest.approx(0.75)
    # ranking 0.8(1) 0.4(0) 0.35(1) 0.1(0): AP = 0.5*1 + 0.5*(2/3)
    assert metrics.average_precision(label, score) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(metrics.auc_roc(np.zeros(3), np.arange(3)))
    assert np.isnan(metrics.average_precision(np.zeros(3), np.arange(3)))


def test_card_precision_uses_max_score_per_card_and_divides_by_k():
    day = np.array([0, 0, 0, 0, 0])
    card = np.array([1, 1, 2, 3, 3])
    label = np.array([0, 1, 0, 0, 0])
    score = np.array([0.9, 0.1, 0.5, 0.2, 0.3])
    # card scores: 1 -> 0.9 (fraud), 2 -> 0.5, 3 -> 0.3; top-2 = {1, 2}: one fraud / 2
    cp, per_day = metrics.card_precision_at_k(day, card, label, score, k=2)
    assert per_day == [0.5] and cp == 0.5
    # k larger than the number of cards: still divided by k
    cp, _ = metrics.card_precision_at_k(day, card, label, score, k=10)
    assert cp == pytest.approx(0.1)


def test_card_precision_drops_cards_detected_on_earlier_days():
    day = np.array([0, 0, 0, 1, 1, 1])
    card = np.array([1, 2, 3, 1, 2, 3])
    label = np.array([1, 0, 1, 1, 1, 0])
    score = np.array([0.9, 0.8, 0.1, 0.9, 0.5, 0.4])
    # day 0: top-2 = {1 (fraud), 2}: 1/2; detected = {1}
    # day 1: card 1 dropped; top-2 of {2 (fraud) 0.5, 3 0.4} -> 1/2
    cp, per_day = metrics.card_precision_at_k(day, card, label, score, k=2)
    assert per_day == [0.5, 0.5] and cp == 0.5
    # a fraud card outside the top k is not "detected": card 3 on day 0 stays on day 1
    cp, per_day = metrics.card_precision_at_k(day, card, label, score, k=1)
    assert per_day == [1.0, 1.0]  # day 1 top-1 after dropping card 1 is card 2 (fraud)


def test_card_precision_ties_broken_by_card_id():
    day = np.zeros(3, dtype=int)
    card = np.array([7, 5, 6])
    label = np.array([0, 1, 0])
    score = np.array([0.5, 0.5, 0.5])
    cp, _ = metrics.card_precision_at_k(day, card, label, score, k=1)
    assert cp == 1.0  # card 5 first


def test_test_set_rule_drops_cards_with_fraud_known_by_t_minus_8():
    d = np.datetime64("2018-08-01")
    train_start = d
    known_day = np.array([d - 1, d, d + 3, d + 10], dtype="datetime64[D]")
    known_card = np.array([10, 11, 12, 13])
    known_label = np.array([1, 1, 1, 1])
    # card 10: fraud before training start -> ignored
    # card 11: fraud on d -> dropped from d+8 on
    # card 12: fraud on d+3 -> dropped from d+11 on
    test_day = np.array([d + 8, d + 8, d + 8, d + 10, d + 11, d + 14], dtype="datetime64[D]")
    test_card = np.array([10, 11, 12, 12, 12, 13])
    keep = metrics.keep_unblocked(test_day, test_card, known_day, known_card, known_label, train_start)
    assert keep.tolist() == [True, False, True, True, False, True]


def test_test_set_rule_ignores_non_fraud_and_unknown_cards():
    d = np.datetime64("2018-08-01")
    keep = metrics.keep_unblocked(
        np.array([d + 20], dtype="datetime64[D]"),
        np.array([5]),
        np.array([d], dtype="datetime64[D]"),
        np.array([5]),
        np.array([0]),
        d,
    )
    assert keep.tolist() == [True]


def test_evaluate_bundles_metrics():
    out = metrics.evaluate(np.zeros(4), np.arange(4), np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), k=2)
    assert out["auc_roc"] == pytest.approx(0.75)
    assert out["card_precision@2"] == pytest.approx(0.5)
    assert out["n_fraud"] == 2 and out["n_transactions"] == 4
