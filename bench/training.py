"""Training throughput: this project's trainer vs the reference's per-row DataLoader loop.

Side by side in one run, on the same data (synthetic features, the product's default window at
reference scale: 9,600 rows a day) and the same torch thread count, for each model (the MLP and
the card-history sequence model) with the product's default configuration. The reference loop is
a ``torch.utils.data.Dataset`` whose ``__getitem__`` returns one row (for the sequence model: the
row and its card's previous rows), batched by a ``DataLoader`` of batch 64, Adam (as in the
handbook); for the MLP also with torch's ``nn.Dropout`` exactly as the handbook has it. Ours is
``jobs.torch.fit.fit`` with the product defaults (batch size, learning rate: the configuration
the quality figures are measured with). Then the wall time of one complete model (read the window
from the lake, fit the scaler, train the default number of epochs) per model kind.

``python -m bench training [--small]``
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path

import torch
from torch import nn

from bench import markdown_table, write_section
from jobs.common.calendar import Calendar
from jobs.common.lake import Dataset, Lake
from jobs.common.progress import progress
from jobs.torch.data import read_for_model
from jobs.torch.fit import Dist, TrainingData, fit, prepare, train_model
from jobs.torch.model import ByteDropout, InputTransform, build_model
from jobs.torch.synthetic import synthetic_features
from jobs.torch.train import TrainConfig

FIRST = date(2018, 4, 1)
CALENDAR = Calendar(FIRST)
ROUNDS = 3


class RowDataset(torch.utils.data.Dataset):
    """The handbook's FraudDataset: one row per ``__getitem__`` (for seq: the row and its card history)."""

    def __init__(self, data: TrainingData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.y)

    def __getitem__(self, i: int):
        d = self.data
        if d.pool is None:
            return d.z[i], d.y[i]
        prev = d.prev[i]
        row = (d.z[i], d.pool[prev.clamp_min(0)], d.gap[i], (prev >= 0).float())
        return (*row, d.terminal[i], d.y[i]) if d.terminal is not None else (*row, d.y[i])


def synthetic_window(lake: Lake, days: int, rows_per_day: int, cards: int) -> list[date]:
    """Write ``days`` synthetic feature days from FIRST (1% fraud) into ``lake``; return those days."""
    window = [FIRST + timedelta(days=i) for i in range(days)]
    for day in window:
        lake.write_table(Dataset.FEATURES, day, synthetic_features(day, rows_per_day, cards=cards, fraud_rate=0.01))
    return window


def reference_loop(model: nn.Module, data: TrainingData, max_seconds: float) -> tuple[int, float]:
    """Per-row DataLoader, batch 64, shuffled, Adam; returns (samples, seconds) when the time is up."""
    loader = torch.utils.data.DataLoader(RowDataset(data), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    while True:
        for *inputs, yb in loader:
            loss = loss_fn(model(*inputs), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(yb)
            if time.perf_counter() - start > max_seconds:
                return seen, time.perf_counter() - start


def handbook_dropout(model: nn.Module) -> nn.Module:
    """The same model with torch's own nn.Dropout wherever ours has ByteDropout, as the handbook has it."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i, m in enumerate(module):
                if isinstance(m, ByteDropout):
                    module[i] = nn.Dropout(m.p)
    return model


def main(flags: list[str]) -> int:
    small = "--small" in flags
    defaults = TrainConfig(lake="-", date="2018-04-22").resolved()
    days, rows_per_day = (7, 2_000) if small else (defaults.window_days, 9_600)
    threads = int(os.environ.get("BENCH_THREADS", str(defaults.threads)))
    torch.set_num_threads(threads)
    load = os.getloadavg()
    rows, whole = [], []
    kinds = ("mlp", "seq")
    # on a terminal: the rounds done (each model's rounds in turns, then its whole training)
    with tempfile.TemporaryDirectory() as tmp, \
            progress("bench training", total=len(kinds) * (ROUNDS + 1), unit="rounds") as advance:
        lake = Lake.from_uri(Path(tmp).as_uri())
        window = synthetic_window(lake, days, rows_per_day, cards=5000)
        for kind in kinds:
            full = replace(defaults, lake=lake.uri, model=kind, hidden=[], threads=threads).resolved()
            cfg = replace(full, epochs=1 if small else 2)
            mcfg = cfg.model_config()
            frame, history = read_for_model(lake, window, mcfg, CALENDAR)
            data = prepare(frame, history, InputTransform.fit(torch.from_numpy(frame.x)))
            n = len(frame)
            name = f"{kind} {mcfg.hidden}, dropout {mcfg.dropout}" + (
                f", GRU {mcfg.seq_hidden} over {mcfg.seq_len} previous rows, {mcfg.terminal_len} terminal rows"
                if kind == "seq" else "")
            # In turns, ROUNDS times: the reference loop (handbook: nn.Dropout), then this trainer (fresh
            # models each time); each one's best round counts, so a noisy moment on the shared cores
            # does not decide the ratio.
            ref_best, ours_best, ref_seen = 0.0, 0.0, (0, 0.0)
            for i in range(ROUNDS):
                advance.doing(f"{kind}, round {i + 1} of {ROUNDS}")
                torch.manual_seed(0)
                samples, seconds = reference_loop(handbook_dropout(build_model(mcfg)), data,
                                                  max_seconds=3 if small else 8)
                if samples / seconds > ref_best:
                    ref_best, ref_seen = samples / seconds, (samples, seconds)
                torch.manual_seed(0)
                t0 = time.perf_counter()
                fit(build_model(mcfg), data, cfg, torch.device("cpu"), Dist())
                ours_best = max(ours_best, n * cfg.epochs / (time.perf_counter() - t0))
                advance()
            rows.append(["reference: per-row Dataset, DataLoader, Adam, the handbook's nn.Dropout", name, threads, 64,
                         f"{ref_seen[0] / n:.2f} ({ref_seen[1]:.0f} s)", f"{ref_best:,.0f}", "1.0x"])
            rows.append(["this trainer (`fit`, product defaults), Adam", name, threads, cfg.batch_size, cfg.epochs,
                         f"{ours_best:,.0f}", f"**{ours_best / ref_best:.1f}x**"])
            print(f"training {kind}: reference {ref_best:,.0f} samples/s, ours {ours_best:,.0f} "
                  f"({ours_best / ref_best:.1f}x)", flush=True)

            advance.doing(f"{kind}, one whole model")
            t0 = time.perf_counter()
            trained = train_model(lake, full, window, CALENDAR, torch.device("cpu"))
            whole.append((kind, len(trained.frame), full.epochs, full.batch_size, time.perf_counter() - t0))
            advance()
    end_load = os.getloadavg()

    table = markdown_table(["loop (CPU)", "model", "threads", "batch", "epochs measured", "samples/s",
                            "vs the per-row loop on the same model"], rows)
    table2 = markdown_table(
        ["model", "rows", "epochs", "batch", "threads", "one model, wall s (read + scaler + train)", "target"],
        [[k, f"{r:,}", e, b, threads, f"{s:.1f}", "<= 60 s"] for k, r, e, b, s in whole],
    )
    note = (f"{rows_per_day * days:,} training rows (synthetic features, {days} days; the default window is "
            f"{defaults.window_days}; the product default model is {defaults.model}); all loops in the same process "
            f"and threads, in turns (the reference, then ours) {ROUNDS} times, each one's best round; target >= 10x; learning rate {defaults.lr}. Load average "
            f"(1/5/15 min) on the 2 cores: start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, end {end_load[0]:.1f}/"
            f"{end_load[1]:.1f}/{end_load[2]:.1f}.")
    print(table)
    print()
    print(table2)
    print(note)
    if not small:  # a --small run is a smoke check, not a figure
        write_section("training", f"{table}\n\n{table2}\n\n{note}")
    return 0
