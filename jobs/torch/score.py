"""``python -m jobs.torch.score --lake URI --date D [--k 100]``: score day D with its champion.

The model is the registry's champion *as of D* (never the newest one): while the decision of
the latest training day <= D is missing the job exits 75 ("waiting for decision"); before any
champion exists it prints why, records the skip, publishes nothing and exits 99. A model whose
feature list or feature schema version differs from the features is refused. Writes
``scores/transactions/date=D`` and ``alerts/cards/date=D`` (docs/contract.md, "Scoring").
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common.calendar import Calendar
from jobs.common.cli import EXIT_NO_CHAMPION, EXIT_OK, Waiting, day_parser, parse_days, run_each
from jobs.common.config import settings
from jobs.common.lake import Dataset, Lake
from jobs.common.provenance import CHAMPION, InputRecorder, lineage
from jobs.common.schema import ALERTS_SCHEMA, FEATURE_SCHEMA, MODEL_INPUTS, SCORES_SCHEMA
from jobs.torch import keep_freed_memory
from jobs.torch import registry as R
from jobs.torch.checkpoint import Loaded, load_version
from jobs.torch.data import model_history_days, read_for_model
from jobs.torch.explain import METHOD, attribution_lists, integrated_gradients
from jobs.torch.predict import predict, predict_columns, score_workers

keep_freed_memory()  # a batch step: freed memory kept for its next allocation (jobs/torch/__init__.py)


def alerts_table(scores: pa.Table, k: int, explain: Callable[[np.ndarray], list[list[dict]]] | None = None
                 ) -> pa.Table:
    """Top-k cards: max score over the card's transactions, n_tx, rank by score desc then card, the
    top transaction, and with ``explain`` (row positions -> attribution lists) why it scored so.

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
    top_row = sel[order][first][:k]  # the row of each card's highest score
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
            "top_transaction_id": pc.take(scores.column("TRANSACTION_ID"), pa.array(top_row, pa.int64())),
            "attributions": pa.array(explain(top_row) if explain else [None] * kk, ALERTS_SCHEMA.field("attributions").type),
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


def write_scores(lake: Lake, day: date, table: pa.Table, stats: dict, provenance: dict) -> dict:
    """Write the scores partition's file (tuned Parquet options) and return its prepared manifest:
    the alerts' publish commits it (``Lake.publish``'s companions)."""
    attempt = lake.new_attempt(Dataset.SCORES, day)
    record = lake.write_parquet(attempt, table, **SCORES_PARQUET)
    return lake.prepare(attempt, stats, provenance, files=[record])


class NoChampion(Exception):
    pass


def model_input_days(loaded: Loaded, day: date, cal: Calendar) -> list[date]:
    """The feature days a model reads to score D: D, and for the sequence model its history before D."""
    cfg = loaded.config
    back = model_history_days(cfg.lookback_days, cfg.terminal_len, cfg.terminal_lookback_days) if cfg.kind == "seq" else 0
    return cal.expected(cal.span(day, back))


def score_day(lake: Lake, registry: R.Registry, day: date, k: int, cache: dict[str, Loaded], workers: int = 0) -> dict:
    """Score one day with its champion and publish scores and alerts; return a summary."""
    champion = registry.champion_as_of(day)
    if champion is None:
        raise NoChampion(f"no champion model as of {day}: nothing scored")
    version = champion["version"]
    if version not in cache:
        cache[version] = load_version(registry.read_checkpoint(version), version)
    loaded = cache[version]
    started = time.time()
    inputs = InputRecorder(lake).days(Dataset.FEATURES, model_input_days(loaded, day, registry.calendar))
    inputs.append({"dataset": CHAMPION, "date": day.isoformat(), "digest": version})
    provenance = lineage("score", inputs, {"k": k, "model_version": version})
    if loaded.config.kind == "seq":
        frame, history = read_for_model(lake, [day], loaded.config, registry.calendar)
        scores = predict(loaded, frame, history, workers=workers)
        ids = {"TRANSACTION_ID": pa.array(frame.txid), "CUSTOMER_ID": pa.array(frame.card),
               "TX_DATETIME": pa.array(frame.time_us, pa.int64()).cast(pa.timestamp("us"))}

        def explain(rows: np.ndarray) -> list[list[dict]]:
            return attribution_lists(frame.x[rows], integrated_gradients(loaded, frame.x[rows], history, rows)[0])
    else:  # Arrow columns straight to numpy views and back: no [n, 15] frame, no pandas
        features = lake.read_days(Dataset.FEATURES, [day], schema=FEATURE_SCHEMA, columns=[*ID_COLUMNS, *MODEL_INPUTS])
        cols = [_numpy(features.column(name)) for name in MODEL_INPUTS]
        scores = predict_columns(loaded, cols, workers)
        ids = {name: features.column(name) for name in ID_COLUMNS}

        def explain(rows: np.ndarray) -> list[list[dict]]:
            x = np.stack([col[rows] for col in cols], axis=1).astype(np.float32)
            return attribution_lists(x, integrated_gradients(loaded, x)[0])
    n = len(scores)
    table = pa.table(
        {**ids, "score": pa.array(scores),
         "model_version": pa.repeat(pa.scalar(version, pa.string()), n)},
        schema=SCORES_SCHEMA,
    )
    with ThreadPoolExecutor(1) as pool:  # the Parquet write (GIL released) overlaps the alert list
        written = pool.submit(write_scores, lake, day, table, {"model_version": version}, provenance)
        alerts = alerts_table(table, k, explain)
        scores_manifest = written.result()
    attempt = lake.new_attempt(Dataset.ALERTS, day)  # scores and alerts are published by one write
    lake.publish(attempt, stats={"model_version": version, "k": k, "attributions": METHOD}, lineage=provenance,
                 files=[lake.write_parquet(attempt, alerts)], companions=[scores_manifest])
    summary = {"date": day.isoformat(), "rows": table.num_rows, "alerts": alerts.num_rows, "model_version": version,
               "champion_since": champion["champion_since"], "seconds": round(time.time() - started, 3)}
    lake.write_run_record("score", day, uuid.uuid4().hex[:16], {"status": "scored", **summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = day_parser("python -m jobs.torch.score", __doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=0, help="cards in the alert list (default FRAUD_ALERT_K)")
    parser.add_argument("--threads", type=int, default=0,
                        help="scoring threads, each running single-threaded torch ops (default: min(cores, 8))")
    args = parse_days(parser, argv)
    k = args.k or settings().alert_k
    workers = args.threads or score_workers()
    lake = Lake.from_uri(args.lake)
    registry = R.Registry(lake)
    cache: dict[str, Loaded] = {}
    skipped: list[date] = []

    def one(day: date) -> None:
        try:
            summary = score_day(lake, registry, day, k, cache, workers)
        except NoChampion as exc:
            print(f"score {day}: {exc}")
            lake.write_run_record("score", day, uuid.uuid4().hex[:16], {"status": "skipped", "reason": str(exc)})
            skipped.append(day)
            return
        except R.WaitingForDecision as exc:
            raise Waiting(str(exc)) from exc
        print(f"score {day}: {summary['rows']} rows, {summary['alerts']} alerts, model {summary['model_version']} "
              f"(champion since {summary['champion_since']}), {summary['seconds']} s")

    code = run_each("score", args.days, one, lake=lake)
    if code != EXIT_OK:
        return code
    return EXIT_NO_CHAMPION if len(skipped) == len(args.days) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
