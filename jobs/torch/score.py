"""``python -m jobs.torch.score --lake URI --date D [--k 100]``: score day D with its champion.

The model is the registry's champion *as of D* (never the newest one): while the decision of
the latest training day <= D is missing the job exits 75 ("waiting for decision"); before any
champion exists it prints why, records the skip, publishes nothing and exits 99
(``EXIT_NO_CHAMPION``). A model whose feature list or feature schema version differs from the
features is refused. Writes ``scores/transactions/date=D`` and ``alerts/cards/date=D``.

The MLP path is built for throughput (SPEC target: >= 1M rows/s end to end on 2 cores): the
Arrow columns are read as numpy views (no pandas, no [n, 15] frame), the scaler is folded into
the first layer, chunks of ``SCORE_CHUNK`` rows are scored under ``inference_mode`` by one thread
per core with single-threaded torch ops, the alert list needs no group-by over the whole day,
and the Parquet write (no compression for the incompressible score column) overlaps it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from jobs.common.config import EXIT_NO_CHAMPION, settings
from jobs.common.lake import Dataset, Lake, day_range, parse_day
from jobs.common.schema import (
    ALERTS_SCHEMA,
    FEATURE_SCHEMA,
    FEATURE_SCHEMA_VERSION,
    MODEL_INPUTS,
    SCORES_SCHEMA,
)
from jobs.torch import registry as R
from jobs.torch.data import CardHistory, FeatureFrame, read_for_model
from jobs.torch.model import (
    _AMOUNT,
    _AVERAGES,
    _COUNTS,
    N_DERIVED,
    TRANSFORM,
    InputTransform,
    ModelConfig,
    Scorer,
    build_model,
    gather_rows,
    scorer_for,
)

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


SCORE_CHUNK = 1024  # rows per matmul: the [chunk, hidden] activations stay in the core's cache


def score_workers() -> int:
    """Worker threads for scoring: one per core (capped at 8)."""
    return max(1, min(os.cpu_count() or 1, 8))


class _FoldedMLP:
    """The MLP scorer as plain matrices, the scaler folded into the first layer.

    ``(d - mean) / std`` followed by ``W d' + b`` is ``(W / std) d + (b - W (mean / std))``: the
    standardisation costs nothing at scoring time; the derived log features are computed per chunk
    into a [25, chunk] buffer that the first matmul reads transposed (no copy). Dropout is the
    identity in eval mode. Results match the module within float32 rounding (rtol 1e-5).
    """

    def __init__(self, scorer: Scorer):
        t = scorer.transform
        linears = [m for m in scorer.model.mlp.net if isinstance(m, nn.Linear)]
        w0, b0 = linears[0].weight.double(), linears[0].bias.double()
        mean, std = t.mean.double(), t.std.double()
        w0f = w0 / std
        self.layers = [((b0 - w0 @ (mean / std)).float(), w0f.t().contiguous().float())]
        self.layers += [(m.bias.detach().float().clone(), m.weight.detach().t().contiguous().float()) for m in linears[1:]]

    def __call__(self, cols: Sequence[np.ndarray], start: int, stop: int, out: np.ndarray) -> None:
        n = stop - start
        d = torch.empty(N_DERIVED, n)
        dn = d.numpy()
        for j, c in enumerate(cols):
            dn[j] = c[start:stop]  # casts int / float64 columns to float32 in the copy
        d15 = d[len(MODEL_INPUTS) :]
        torch.log1p(d[_AMOUNT].clamp_min(0), out=d15[0])
        torch.log1p(d[_COUNTS].clamp_min(0), out=d15[1 : 1 + len(_COUNTS)])
        ratio = d15[1 + len(_COUNTS) :]
        torch.log1p(d[_AVERAGES].clamp_min(0), out=ratio)
        torch.sub(d15[0:1], ratio, out=ratio)
        h = d.t()
        last = len(self.layers) - 1
        for i, (b, w) in enumerate(self.layers):
            h = torch.addmm(b, h, w)
            if i < last:
                h.relu_()
        out[start:stop] = torch.sigmoid_(h.squeeze(1)).numpy()


def _run_chunks(fn, n: int, chunk: int, workers: int) -> None:
    """fn(start, stop) over [0, n) in chunks, on ``workers`` threads with single-threaded torch ops.

    Torch releases the GIL inside its kernels, so the threads run in parallel; one intra-op thread
    each avoids OpenMP barriers, which collapse on a loaded shared machine (measured: 2 OpenMP
    threads scored 5x slower than 1 at load 7). Every chunk writes its own output slice, so the
    result does not depend on the scheduling (bit-for-bit repeatable).
    """
    starts = list(range(0, n, chunk))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1 or len(starts) <= 1:
            for s in starts:
                fn(s, min(s + chunk, n))
            return

        def job(i: int) -> None:
            torch.set_num_threads(1)
            with torch.inference_mode():
                for s in starts[i::workers]:
                    fn(s, min(s + chunk, n))

        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(job, i) for i in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def predict_columns(loaded: Loaded, cols: Sequence[np.ndarray], workers: int = 0,
                    chunk: int = SCORE_CHUNK) -> np.ndarray:
    """MLP: fraud probability (float64) from the 15 input columns (``MODEL_INPUTS`` order, any
    numeric dtype, numpy views of the Arrow columns: no [n, 15] copy is ever built)."""
    n = len(cols[0]) if cols else 0
    out = np.empty(n, dtype=np.float64)
    folded = _FoldedMLP(loaded.scorer)
    _run_chunks(lambda s, e: folded(cols, s, e, out), n, chunk, workers or score_workers())
    return out


@torch.inference_mode()
def predict(loaded: Loaded, frame: FeatureFrame, history: CardHistory | None = None,
            batch_size: int = SCORE_BATCH, workers: int = 0) -> np.ndarray:
    """Fraud probability of every row (float64), in chunks on worker threads, on CPU."""
    if loaded.config.kind != "seq":
        return predict_columns(loaded, [frame.x[:, j] for j in range(frame.x.shape[1])], workers)
    if history is None:
        raise ValueError(f"model {loaded.version} is a sequence model: it needs the card history")
    out = np.empty(len(frame), dtype=np.float64)
    scorer = loaded.scorer
    x = torch.from_numpy(frame.x)
    prev_all, gap_all = torch.from_numpy(history.prev), torch.from_numpy(history.gap_days)
    raw_pool = torch.from_numpy(history.pool)
    pool = torch.empty(raw_pool.shape[0], N_DERIVED)  # the transform once per pool row, not per use
    chunk = 8192

    def scale(s: int, e: int) -> None:
        pool[s:e] = scorer.transform(raw_pool[s:e])

    terminal_all = torch.from_numpy(history.terminal) if history.terminal is not None else None

    def score(s: int, e: int) -> None:
        prev = prev_all[s:e]
        present = (prev >= 0).float()
        z = scorer.transform(x[s:e])
        terminal = terminal_all[s:e] if terminal_all is not None else None
        out[s:e] = torch.sigmoid(scorer.model(z, gather_rows(pool, prev), gap_all[s:e], present, terminal)).numpy()

    workers = workers or score_workers()
    _run_chunks(scale, len(pool), chunk, workers)
    _run_chunks(score, len(frame), chunk, workers)
    return out


def alerts_table(scores: pa.Table, k: int) -> pa.Table:
    """Top-k cards: max score over the card's transactions, n_tx, rank by score desc then card.

    Exact without a group-by over the day: the top-k cards are the first k distinct cards among
    the rows in descending score order, so only the rows at or above a score threshold are
    grouped (the threshold is lowered until they hold k cards); n_tx counts the chosen cards'
    rows over the whole day.
    """
    version = scores.column("model_version")[0].as_py() if scores.num_rows else ""
    score = scores.column("score").to_numpy()
    card = scores.column("CUSTOMER_ID").to_numpy()
    n = len(score)
    m = min(n, max(8 * k, 1024))
    while True:
        if m >= n:
            sel = np.arange(n)
        else:
            threshold = np.partition(score, n - m)[n - m]
            sel = np.flatnonzero(score >= threshold)  # ties at the threshold are all inside
        c, s = card[sel], score[sel]
        order = np.lexsort((c, -s))  # score desc, then card
        c, s = c[order], s[order]
        first = np.unique(c, return_index=True)[1]
        if len(first) >= k or m >= n:
            break
        m = min(n, m * 4)
    first.sort()
    top_card, top_score = c[first][:k], s[first][:k]
    top_card_sorted = np.sort(top_card)
    mine = np.sort(card[pc.is_in(scores.column("CUSTOMER_ID"), pa.array(top_card_sorted)).to_numpy(False)])
    counts = np.searchsorted(mine, top_card, side="right") - np.searchsorted(mine, top_card)
    kk = len(top_card)
    return pa.table(
        {
            "CUSTOMER_ID": pa.array(top_card, pa.int64()),
            "score": pa.array(top_score, pa.float64()),
            "n_tx": pa.array(counts.astype(np.int64)),
            "rank": pa.array(np.arange(1, kk + 1, dtype=np.int32)),
            "model_version": pa.array([version] * kk, pa.string()),
        },
        schema=ALERTS_SCHEMA,
    )


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: zero-copy for a single chunk without nulls."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return arr.to_numpy(zero_copy_only=False)


ID_COLUMNS = ("TRANSACTION_ID", "CUSTOMER_ID", "TX_DATETIME")
SCORES_PARQUET = {
    # the score column is random float64 (incompressible: snappy only costs time); ids compress
    "compression": {"TRANSACTION_ID": "snappy", "CUSTOMER_ID": "snappy", "TX_DATETIME": "snappy",
                    "score": "none", "model_version": "snappy"},
    "use_dictionary": ["model_version"],
}


def write_scores(lake: Lake, day: date, table: pa.Table, stats: dict) -> dict:
    """Publish the scores partition (the lake's attempt + publish protocol, tuned Parquet options)."""
    attempt = lake.new_attempt(Dataset.SCORES, day)
    with lake.fs.open_output_stream(f"{attempt.path}/part-00000.parquet") as f:
        pq.write_table(table, f, **SCORES_PARQUET)
    return lake.publish(attempt, stats)


class NoChampion(Exception):
    pass


def score_day(lake: Lake, registry: R.Registry, day: date, k: int, cache: dict[str, Loaded], workers: int = 0) -> dict:
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
        frame, history = read_for_model(lake, [day], loaded.config, registry.schedule.first_date)
        scores = predict(loaded, frame, history, workers=workers)
        ids = {"TRANSACTION_ID": pa.array(frame.txid), "CUSTOMER_ID": pa.array(frame.card),
               "TX_DATETIME": pa.array(frame.time_us, pa.int64()).cast(pa.timestamp("us"))}
    else:  # Arrow columns straight to numpy views and back: no [n, 15] frame, no pandas
        features = lake.read_days(Dataset.FEATURES, [day], schema=FEATURE_SCHEMA, columns=[*ID_COLUMNS, *MODEL_INPUTS])
        cols = [_numpy(features.column(name)) for name in MODEL_INPUTS]
        scores = predict_columns(loaded, cols, workers)
        ids = {name: features.column(name) for name in ID_COLUMNS}
    n = len(scores)
    table = pa.table(
        {**ids, "score": pa.array(scores),
         "model_version": pa.repeat(pa.scalar(version, pa.string()), n)},
        schema=SCORES_SCHEMA,
    )
    with ThreadPoolExecutor(1) as pool:  # the Parquet write (GIL released) overlaps the alert list
        written = pool.submit(write_scores, lake, day, table, {"model_version": version})
        alerts = alerts_table(table, k)
        written.result()
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
    parser.add_argument("--threads", type=int, default=0,
                        help="scoring threads, each running single-threaded torch ops (default: min(cores, 8))")
    args = parser.parse_args(argv)
    if bool(args.date) == bool(args.start or args.end) or bool(args.start) != bool(args.end):
        parser.error("give --date D, or --start D1 --end D2")
    days = [parse_day(args.date)] if args.date else day_range(parse_day(args.start), parse_day(args.end))
    s = settings()
    k = args.k or s.alert_k
    workers = args.threads or score_workers()
    lake = Lake.from_uri(args.lake or s.lake_uri)
    registry = R.Registry(lake)
    cache: dict[str, Loaded] = {}
    skipped, done = [], []
    for i, day in enumerate(days):
        try:
            summary = score_day(lake, registry, day, k, cache, workers)
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
