"""A fast quality floor: the reference protocol on synthetic features with a learnable signal.

Catches a model or training loop that stopped learning; the reference-scale quality report is
``python -m jobs.torch.quality`` (not part of the test suite).
"""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from jobs.torch.quality import fold_days, format_table, run_fold
from jobs.torch.synthetic import publish_synthetic, synthetic_features
from jobs.torch.train import TrainConfig

START = date(2018, 4, 1)


@pytest.mark.parametrize("model", ["mlp", "seq"])
def test_protocol_on_synthetic_features_learns(lake, model):
    for i in range(21):
        day = START + timedelta(days=i)
        publish_synthetic(lake, day, synthetic_features(day, 700, seed=3, cards=400))
    cfg = TrainConfig.from_argv(["--date", "2018-04-22", "--model", model, "--epochs", "6", "--batch-size", "128", "--hidden", "32",
                                 "--window-days", "7", "--seed", "0"])
    window, test = fold_days(START, cfg.window_days)
    assert window[0] == START and test[0] == date(2018, 4, 15) and len(test) == 7
    fold = run_fold(lake, cfg, START)
    assert fold["auc_roc"] > 0.8
    assert fold["average_precision"] > 0.3  # fraud share is 3%: a model that stopped learning scores ~0.03
    assert fold["card_precision@100"] > 0.1
    assert "MEAN" in format_table({"smoke": [fold]}, reference=True)
