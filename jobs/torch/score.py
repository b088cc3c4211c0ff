"""``python -m jobs.torch.score --lake URI --date D [--k 100]``: score day D with its champion.

The model is the registry's champion *as of D* (never the newest one): while the decision of
the latest training day <= D is missing the job exits 75 ("waiting for decision"); before any
champion exists it prints why, records the skip, publishes nothing and exits 99
(``EXIT_NO_CHAMPION``). A model whose feature list or feature schema version differs from the
features is refused. Writes ``scores/transactions/date=D`` and ``alerts/cards/date=D``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from jobs.common.config import EXIT_NO_CHAMPION, settings
from jobs.common.lake import Dataset, Lake, day_range, parse_day
from jobs.common.schema import ALERTS_SCHEMA, FEATURE_SCHEMA_VERSION, MODEL_INPUTS, SCORES_SCHEMA
from jobs.torch import registry as R
from jobs.torch.data import CardHistory, FeatureFrame, frame_from_table, read_feature_table, read_with_history
from jobs.torch.model import TRANSFORM, InputTransform, ModelConfig, Scorer, build_model, scorer_for

EXIT_WAITING = 75
SCORE_BATCH = 1 << 16


class IncompatibleModel(RuntimeError):
    """The model was trained on other features than the ones it would score."""


@dataclass
class Loaded:
    version: str
    config: ModelConfig
    scorer: Scorer


def load_version(checkpoint: bytes, version: str) -> Loaded:
    """Rebuild a scorer from checkpoint bytes, refusing one made for other features."""
    ckpt = torch.load(io.BytesIO(checkpoint), weights_only=True, map_location="cpu")
    if list(ckpt["features"]) != list(MODEL_INPUTS):
        raise IncompatibleModel(f"model {version} was trained on features {ckpt['features']}, not {list(MODEL_INPUTS)}")
    if ckpt["feature_schema_version"] != FEATURE_SCHEMA_VERSION:
        raise IncompatibleModel(f"model {version} expects feature schema {ckpt['feature_schema_version']}, "
                                f"the features are {FEATURE_SCHEMA_VERSION}")
    if ckpt.get("transform") != TRANSFORM:
        raise IncompatibleModel(f"model {version} uses input transform {ckpt.get('transform')}, not {TRANSFORM}")
    cfg = ModelConfig(**ckpt["model"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    transform = InputTransform(torch.as_tensor(ckpt["scaler_mean"]), torch.as_tensor(ckpt["scaler_std"]))
    return Loaded(version, cfg, scorer_for(cfg, transform, model).eval())


@torch.inference_mode()
def predict(loaded: Loaded, frame: FeatureFrame, history: CardHistory | None = None,
            batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Fraud probability of every row (float64), in batches, on CPU."""
    x = torch.from_numpy(frame.x)
    out = np.empty(len(frame), dtype=np.float64)
    seq = loaded.config.kind == "seq"
    if seq:
        if history is None:
            raise ValueError(f"model {loaded.version} is a sequence model: it needs the card history")
        pool, prev_all, gap_all = (torch.from_numpy(a) for a in (history.pool, history.prev, history.gap_days))
    for start in range(0, len(frame), batch_size):
        stop = min(start + batch_size, len(frame))
        if seq:
            prev = prev_all[start:stop]
            args = (x[start:stop], pool[prev.clamp_min(0)], gap_all[start:stop], (prev >= 0).float())
        else:
            args = (x[start:stop],)
        out[start:stop] = loaded.scorer(*args).numpy()
    return out


def alerts_table(scores: pa.Table, k: int) -> pa.Table:
    """Top-k cards: max score over the card's transactions, n_tx, rank by score desc then card."""
    version = scores.column("model_version")[0].as_py() if scores.num_rows else ""
    cards = scores.group_by("CUSTOMER_ID").aggregate([("score", "max"), ("score", "count")])
    cards = cards.sort_by([("score_max", "descending"), ("CUSTOMER_ID", "ascending")]).slice(0, k)
    n = cards.num_rows
    return pa.table(
        {
            "CUSTOMER_ID": cards.column("CUSTOMER_ID"),
            "score": cards.column("score_max"),
            "n_tx": pc.cast(cards.column("score_count"), pa.int64()),
            "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "model_version": pa.array([version] * n, pa.string()),
        },
        schema=ALERTS_SCHEMA,
    )


class NoChampion(Exception):
    pass


def score_day(lake: Lake, registry: R.Registry, day: date, k: int, cache: dict[str, Loaded]) -> dict:
    """Score one day with its champion and publish scores and alerts; return a summary."""
    champion = registry.champion_as_of(day)
    if champion is None:
        raise NoChampion(f"no champion model as of {day}: nothing scored")
    version = champion["version"]
    if version not in cache:
        cache[version] = load_version(registry.read_file(version, R.CHECKPOINT), version)
    loaded = cache[version]
    started = time.time()
    if loaded.config.kind == "seq":
        frame, history = read_with_history(lake, [day], loaded.config.seq_len, loaded.config.lookback_days,
                                           registry.schedule.first_date)
    else:
        frame, history = frame_from_table(read_feature_table(lake, [day])), None
    scores = predict(loaded, frame, history)
    table = pa.table(
        {
            "TRANSACTION_ID": pa.array(frame.txid),
            "CUSTOMER_ID": pa.array(frame.card),
            "TX_DATETIME": pa.array(frame.time_us, pa.int64()).cast(pa.timestamp("us")),
            "score": pa.array(scores),
            "model_version": pa.repeat(pa.scalar(version, pa.string()), len(frame)),
        },
        schema=SCORES_SCHEMA,
    )
    lake.write_table(Dataset.SCORES, day, table, stats={"model_version": version})
    alerts = alerts_table(table, k)
    lake.write_table(Dataset.ALERTS, day, alerts, stats={"model_version": version, "k": k})
    summary = {"date": day.isoformat(), "rows": table.num_rows, "alerts": alerts.num_rows, "model_version": version,
               "champion_since": champion["champion_since"], "seconds": round(time.time() - started, 3)}
    lake.write_run_record("score", day, uuid.uuid4().hex[:16], {"status": "scored", **summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.torch.score", description=__doc__.split("\n")[0])
    parser.add_argument("--lake", default="", help="lake URI (default: FRAUD_LAKE_URI)")
    parser.add_argument("--date")
    parser.add_argument("--start")
    parser.add_argument("--end")
    parser.add_argument("--k", type=int, default=0, help="cards in the alert list (default FRAUD_ALERT_K)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: min(cores, 8))")
    args = parser.parse_args(argv)
    if bool(args.date) == bool(args.start or args.end) or bool(args.start) != bool(args.end):
        parser.error("give --date D, or --start D1 --end D2")
    days = [parse_day(args.date)] if args.date else day_range(parse_day(args.start), parse_day(args.end))
    s = settings()
    k = args.k or s.alert_k
    torch.set_num_threads(args.threads or min(os.cpu_count() or 1, 8))
    lake = Lake.from_uri(args.lake or s.lake_uri)
    registry = R.Registry(lake)
    cache: dict[str, Loaded] = {}
    skipped, done = [], []
    for i, day in enumerate(days):
        try:
            summary = score_day(lake, registry, day, k, cache)
            done.append(day)
            print(f"score {day}: {summary['rows']} rows, {summary['alerts']} alerts, model {summary['model_version']} "
                  f"(champion since {summary['champion_since']}), {summary['seconds']} s")
        except NoChampion as exc:
            print(f"score {day}: {exc}")
            lake.write_run_record("score", day, uuid.uuid4().hex[:16], {"status": "skipped", "reason": str(exc)})
            skipped.append(day)
        except R.WaitingForDecision as exc:
            print(f"score {day}: {exc}; not done: {', '.join(d.isoformat() for d in days[i:])}", file=sys.stderr)
            return EXIT_WAITING
        except Exception as exc:
            print(f"score {day}: failed ({exc}); not done: {', '.join(d.isoformat() for d in days[i:])}",
                  file=sys.stderr)
            raise
    return EXIT_NO_CHAMPION if skipped and not done else 0


if __name__ == "__main__":
    sys.exit(main())
