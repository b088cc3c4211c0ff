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
import pyarrow as pa

from jobs.common.calendar import MICROS_PER_DAY, ONE_DAY, Calendar, day_range
from jobs.common.config import settings
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import CLEAN_SCHEMA
from jobs.torch import metrics as M
from jobs.torch import registry as R
from jobs.torch.checkpoint import Loaded, load_version
from jobs.torch.data import FeatureFrame, LabelEvents, read_for_model, start_of_us
from jobs.torch.predict import predict


def evaluate_version(lake: Lake, registry: R.Registry, version: str, test_days: list[date],
                     train_start: date, labels_as_of: date, k: int = 100) -> dict:
    """Score a registered version on labelled test days (targets known before ``labels_as_of``) with
    the reference test-set rule."""
    loaded = load_version(registry.read_checkpoint(version), version)
    return evaluate_loaded(lake, loaded, test_days, train_start, registry.calendar, labels_as_of, k)


def evaluate_loaded(lake: Lake, loaded: Loaded, test_days: list[date], train_start: date,
                    cal: Calendar, labels_as_of: date, k: int = 100) -> dict:
    frame, history = read_for_model(lake, test_days, loaded.config, cal, labels_as_of)
    return evaluate_scores(lake, frame, predict(loaded, frame, history), test_days, train_start, cal, k)


def known_frauds_rule(lake: Lake, frame: FeatureFrame, test_days: list[date], train_start: date,
                      cal: Calendar) -> np.ndarray:
    """The test-set rule as a mask over ``frame``'s rows: on test day T, drop the cards with a fraud
    known before T began on a day from the training start to T - 8."""
    keep = np.ones(len(frame), dtype=bool)
    known_days = cal.known_label_days(train_start, max(test_days))
    if not known_days:
        return keep
    known = lake.read_days(Dataset.CLEAN, known_days, schema=CLEAN_SCHEMA,
                           columns=["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID"], missing_ok=True)
    txid = known.column("TRANSACTION_ID").to_numpy()
    card = known.column("CUSTOMER_ID").to_numpy()
    day = (known.column("TX_DATETIME").cast(pa.int64()).to_numpy() // MICROS_PER_DAY).astype("datetime64[D]")
    events = LabelEvents.read(lake, known_days, day_range(train_start, max(test_days) - ONE_DAY),
                              cal.label_delay_days)
    for test_day in test_days:
        on = frame.day == np.datetime64(test_day)
        label = events.as_of(txid, start_of_us(test_day))
        keep[on] = M.keep_unblocked(frame.day[on], frame.card[on], day, card, label,
                                    np.datetime64(train_start), delay_days=cal.last_labelled_offset)
    return keep


def evaluate_scores(lake: Lake, frame: FeatureFrame, scores: np.ndarray, test_days: list[date], train_start: date,
                    cal: Calendar, k: int = 100) -> dict:
    """Metrics of scores for the rows of ``frame`` (the test days, ``frame.label`` the targets) under
    the reference test-set rule."""
    keep = known_frauds_rule(lake, frame, test_days, train_start, cal)
    out = M.evaluate(frame.day[keep], frame.card[keep], frame.label[keep], scores[keep], k)
    return {"days": [d.isoformat() for d in test_days], "train_start": train_start.isoformat(), **out}


def fraud_labels(lake: Lake, days: list[date], as_of: date, cal: Calendar) -> int:
    """How many transactions of ``days`` are frauds as known before ``as_of`` began (the evidence)."""
    clean = lake.read_days(Dataset.CLEAN, days, schema=CLEAN_SCHEMA, columns=["TRANSACTION_ID"], missing_ok=True)
    events = LabelEvents.read(lake, days, day_range(min(days), as_of - ONE_DAY), cal.label_delay_days)
    return int(events.as_of(clean.column("TRANSACTION_ID").to_numpy(), start_of_us(as_of)).sum())


def no_evidence(record: dict, champion: dict | None, evidence: dict, where: str) -> dict:
    record.update(outcome=R.REFUSED, champion=champion["version"] if champion else None, evidence=evidence,
                  reason=f"refused: no evidence ({evidence[where]} fraud labels in the {where.replace('_', ' ')}, "
                         f"minimum {evidence['minimum']})")
    return record


def decide(lake: Lake, registry: R.Registry, day: date, candidate: dict, recipe: dict, recipe_hash: str,
           window_days: int, train_validation: Callable[[list[date]], dict | None],
           training_frauds: int) -> dict | None:
    """The decision record of training day ``day`` (None on a DDP rank that does not write).

    ``train_validation(window)`` trains the configuration on the validation window and returns its
    registered version (None on other ranks). A training window or a validation week with fewer
    fraud labels than ``FRAUD_MIN_FRAUD_LABELS`` is no evidence: the decision is refused and the
    champion stays what it was.
    """
    cal = registry.calendar
    cfg = settings()
    champion = registry.champion_before(day)
    record: dict = {
        "train_day": day.isoformat(),
        "candidate": {"version": candidate.get("version"), "recipe_hash": recipe_hash, "recipe": recipe},
        "previous_champion": champion["version"] if champion else None,
        "tolerance": cfg.promotion_tolerance,
        "metric": "average_precision",
    }
    evidence = {"training_window": training_frauds, "validation_week": None, "minimum": cfg.min_fraud_labels}
    if training_frauds < cfg.min_fraud_labels:
        return no_evidence(record, champion, evidence, "training_window")
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
        cand = evaluate_version(lake, registry, val_model["version"], week, min(val_window), day)
        champ = evaluate_version(lake, registry, champion["version"], week, min(val_window), day)
        validation = {"week": [d.isoformat() for d in week], "candidate_version": val_model["version"],
                      "candidate": cand, "champion": champ}
        evidence["validation_week"] = cand["n_fraud"]
        if cand["n_fraud"] < cfg.min_fraud_labels:
            record["validation"] = validation
            return no_evidence(record, champion, evidence, "validation_week")
        cand_ap, champ_ap = cand["average_precision"], champ["average_precision"]
        if cand_ap < champ_ap - cfg.promotion_tolerance:
            record.update(outcome=R.REFUSED, champion=champion["version"], validation=validation, evidence=evidence,
                          reason=f"candidate AP {cand_ap:.4f} < champion AP {champ_ap:.4f} - {cfg.promotion_tolerance}")
            return record
        reason = f"candidate AP {cand_ap:.4f} >= champion AP {champ_ap:.4f} - {cfg.promotion_tolerance}"
    record.update(outcome=R.PROMOTED, champion=candidate.get("version"), validation=validation, evidence=evidence,
                  reason=reason)
    return record
