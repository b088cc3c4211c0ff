"""Evaluation under the reference test-set rule, and the promotion decision of a training day.

``decide`` is the protocol of docs/contract.md ("Promotion"): on training day T the configuration
under test, trained on the window ending T-15, and the current champion are both scored on the
labelled week T-14 .. T-8; the candidate trained on the window ending T-8 becomes champion unless
the configuration is worse on average precision by more than the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

import numpy as np

from jobs.common.calendar import Calendar
from jobs.common.config import settings
from jobs.common.lake import Lake
from jobs.torch import metrics as M
from jobs.torch import registry as R
from jobs.torch.checkpoint import Loaded, load_version
from jobs.torch.data import FeatureFrame, read_features, read_for_model
from jobs.torch.predict import predict


def evaluate_version(lake: Lake, registry: R.Registry, version: str, test_days: list[date],
                     train_start: date, k: int = 100) -> dict:
    """Score a registered version on labelled test days with the reference test-set rule."""
    loaded = load_version(registry.read_file(version, R.CHECKPOINT), version)
    return evaluate_loaded(lake, loaded, test_days, train_start, registry.calendar, k)


def evaluate_loaded(lake: Lake, loaded: Loaded, test_days: list[date], train_start: date,
                    cal: Calendar, k: int = 100) -> dict:
    frame, history = read_for_model(lake, test_days, loaded.config, cal.first_date)
    return evaluate_scores(lake, frame, predict(loaded, frame, history), test_days, train_start, cal, k)


def evaluate_scores(lake: Lake, frame: FeatureFrame, scores: np.ndarray, test_days: list[date], train_start: date,
                    cal: Calendar, k: int = 100) -> dict:
    """Metrics of scores for the rows of ``frame`` (the test days) under the reference test-set rule:
    cards with a fraud known from the training start to T - 8 are dropped from test day T."""
    known_days = cal.known_label_days(train_start, max(test_days))
    known = read_features(lake, known_days) if known_days else frame.take(np.zeros(0, np.int64))
    keep = M.keep_unblocked(frame.day, frame.card, known.day, known.card, known.label,
                            np.datetime64(train_start), delay_days=cal.last_labelled_offset)
    out = M.evaluate(frame.day[keep], frame.card[keep], frame.label[keep], scores[keep], k)
    return {"days": [d.isoformat() for d in test_days], "train_start": train_start.isoformat(), **out}


def decide(lake: Lake, registry: R.Registry, day: date, candidate: dict, recipe: dict, recipe_hash: str,
           window_days: int, train_validation: Callable[[list[date]], dict | None]) -> dict | None:
    """The decision record of training day ``day`` (None on a DDP rank that does not write).

    ``train_validation(window)`` trains the configuration on the validation window and returns its
    registered version (None on other ranks).
    """
    cal = registry.calendar
    tolerance = settings().promotion_tolerance
    champion = registry.champion_before(day)
    record: dict = {
        "train_day": day.isoformat(),
        "candidate": {"version": candidate.get("version"), "recipe_hash": recipe_hash, "recipe": recipe},
        "previous_champion": champion["version"] if champion else None,
        "tolerance": tolerance,
        "metric": "average_precision",
    }
    val_window = cal.validation_window(day, window_days)
    if champion is None:
        reason, validation = "first champion: no model to compare with", None
    elif min(val_window) < cal.first_date:
        reason, validation = "no labelled window ending T-15 yet: refreshed without comparison", None
    else:
        val_model = train_validation(val_window)
        if val_model is None:
            return None
        week = cal.validation_week(day)
        cand = evaluate_version(lake, registry, val_model["version"], week, min(val_window))
        champ = evaluate_version(lake, registry, champion["version"], week, min(val_window))
        validation = {"week": [d.isoformat() for d in week], "candidate_version": val_model["version"],
                      "candidate": cand, "champion": champ}
        cand_ap, champ_ap = cand["average_precision"], champ["average_precision"]
        if np.isnan(cand_ap) or np.isnan(champ_ap):
            reason = "no fraud in the validation week: refreshed without comparison"
        elif cand_ap < champ_ap - tolerance:
            record.update(outcome=R.REFUSED, champion=champion["version"], validation=validation,
                          reason=f"candidate AP {cand_ap:.4f} < champion AP {champ_ap:.4f} - {tolerance}")
            return record
        else:
            reason = f"candidate AP {cand_ap:.4f} >= champion AP {champ_ap:.4f} - {tolerance}"
    record.update(outcome=R.PROMOTED, champion=candidate.get("version"), validation=validation, reason=reason)
    return record
