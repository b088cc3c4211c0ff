"""Training throughput: this project's trainer vs the reference's per-row DataLoader loop.

Same data (synthetic features, the size of the reference's 7-day window: ~67k rows), same model
(MLP, one hidden layer of 500, dropout 0.2, Adam), same thread count. The reference loop is a
``torch.utils.data.Dataset`` whose ``__getitem__`` returns one row, batched by a ``DataLoader``
of batch 64 (as in the handbook); ours indexes whole batches of device-resident tensors. Then
the wall time of one complete model (read the window from the lake, fit the scaler, train the
default number of epochs) for the MLP and the sequence model.

``python -m bench training [--small]``
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import torch
from torch import nn

from bench import markdown_table, write_section
from jobs.common.lake import Dataset, Lake
from jobs.torch.data import read_features
from jobs.torch.model import InputTransform, ModelConfig, build_model
from jobs.torch.synthetic import synthetic_features
from jobs.torch.train import Dist, TrainConfig, fit, prepare, train_model

FIRST = date(2018, 4, 1)


class RowDataset(torch.utils.data.Dataset):
    """The handbook's FraudDataset: one row per ``__getitem__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def reference_loop(model: nn.Module, z: torch.Tensor, y: torch.Tensor, max_seconds: float) -> tuple[int, float]:
    """Per-row DataLoader, batch 64, shuffled; returns (samples, seconds) when the time is up."""
    loader = torch.utils.data.DataLoader(RowDataset(z, y), batch_size=64, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    while True:
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(xb)
            if time.perf_counter() - start > max_seconds:
                return seen, time.perf_counter() - start


def main(flags: list[str]) -> int:
    small = "--small" in flags
    days, rows_per_day = (7, 2_000) if small else (7, 9_600)
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake.from_uri(Path(tmp).as_uri())
        window = [FIRST + timedelta(days=i) for i in range(days)]
        for day in window:
            lake.write_table(Dataset.FEATURES, day, synthetic_features(day, rows_per_day, cards=5000, fraud_rate=0.01))
        frame = read_features(lake, window)
        transform = InputTransform.fit(torch.from_numpy(frame.x))
        data = prepare(frame, None, transform)
        n = len(frame)

        cfg = TrainConfig(lake=lake.uri, date="2018-04-22", epochs=1 if small else 3, threads=threads).resolved()
        loops = []
        for hidden in ([500], [128]):
            torch.manual_seed(0)
            model = build_model(ModelConfig(kind="mlp", hidden=hidden))
            t0 = time.perf_counter()
            fit(model, data, cfg, torch.device("cpu"), Dist())
            ours_rate = n * cfg.epochs / (time.perf_counter() - t0)
            torch.manual_seed(0)
            ref_samples, ref_s = reference_loop(build_model(ModelConfig(kind="mlp", hidden=hidden)), data.z, data.y,
                                                max_seconds=5 if small else 15)
            loops.append((hidden, ref_samples / ref_s, ours_rate))

        whole = []
        for kind in ("mlp", "seq"):
            full = TrainConfig(lake=lake.uri, date="2018-04-22", model=kind, threads=threads).resolved()
            t0 = time.perf_counter()
            trained = train_model(lake, full, window, FIRST, torch.device("cpu"))
            whole.append((kind, len(trained.frame), full.epochs, full.batch_size, time.perf_counter() - t0))

    rows = []
    for hidden, ref_rate, ours_rate in loops:
        rows.append([f"MLP {hidden}: reference per-row Dataset, DataLoader batch 64", f"{ref_rate:,.0f}", "1.0x"])
        rows.append([f"MLP {hidden}: this trainer, whole-batch indexing, batch {cfg.batch_size}",
                     f"{ours_rate:,.0f}", f"{ours_rate / ref_rate:.1f}x"])
    table = markdown_table(["loop (Adam, CPU)", "samples/s", "speed-up"], rows)
    table2 = markdown_table(
        ["model", "rows", "epochs", "batch", "one model, wall s (read + scaler + train)"],
        [[k, f"{r:,}", e, b, f"{s:.1f}"] for k, r, e, b, s in whole],
    )
    note = (f"{n:,} training rows (synthetic features, {days} days); torch threads {threads}; "
            f"load average at start {load:.1f} (a shared machine: figures are noisy).")
    print(table)
    print()
    print(table2)
    print(note)
    if not small:  # a --small run is a smoke check, not a figure
        write_section("training", f"{table}\n\n{table2}\n\n{note}")
    return 0
