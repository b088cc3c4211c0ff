"""Training throughput: this project's trainer vs the reference's per-row DataLoader loop.

Side by side in one run, on the same data (synthetic features, the product's default window at
reference scale: 9,600 rows a day), the same model (the product default MLP: one hidden layer of
500, dropout 0.2, Adam) and the same torch thread count. The reference loop is a
``torch.utils.data.Dataset`` whose ``__getitem__`` returns one row, batched by a ``DataLoader``
of batch 64 (as in the handbook); ours is ``jobs.torch.train.fit`` with the product defaults
(batch size, learning rate: the configuration the quality figures are measured with). Then the
wall time of one complete model (read the window from the lake, fit the scaler, train the default
number of epochs) for the MLP and the sequence model.

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
from jobs.torch.model import ByteDropout, InputTransform, build_model
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
    defaults = TrainConfig(lake="-", date="2018-04-22").resolved()
    days, rows_per_day = (7, 2_000) if small else (defaults.window_days, 9_600)
    threads = int(os.environ.get("BENCH_THREADS", str(defaults.threads)))
    torch.set_num_threads(threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake.from_uri(Path(tmp).as_uri())
        window = [FIRST + timedelta(days=i) for i in range(days)]
        for day in window:
            lake.write_table(Dataset.FEATURES, day, synthetic_features(day, rows_per_day, cards=5000, fraud_rate=0.01))
        frame = read_features(lake, window)
        transform = InputTransform.fit(torch.from_numpy(frame.x))
        data = prepare(frame, None, transform)
        n = len(frame)

        cfg = TrainConfig(lake=lake.uri, date="2018-04-22", epochs=1 if small else 2, threads=threads).resolved()
        mcfg = cfg.model_config()
        refs = []
        for handbook in (True, False):  # the handbook's nn.Dropout, then our model as is (ByteDropout)
            torch.manual_seed(0)
            ref_model = build_model(mcfg)
            if handbook:
                ref_model.mlp.net = nn.Sequential(*(nn.Dropout(m.p) if isinstance(m, ByteDropout) else m
                                                    for m in ref_model.mlp.net))
            refs.append(reference_loop(ref_model, data.z, data.y, max_seconds=5 if small else 20))
        torch.manual_seed(0)
        t0 = time.perf_counter()
        fit(build_model(mcfg), data, cfg, torch.device("cpu"), Dist())
        ours_s = time.perf_counter() - t0
        ours_rate = n * cfg.epochs / ours_s

        whole = []
        for kind in ("mlp", "seq"):
            full = TrainConfig(lake=lake.uri, date="2018-04-22", model=kind, threads=threads).resolved()
            t0 = time.perf_counter()
            trained = train_model(lake, full, window, FIRST, torch.device("cpu"))
            whole.append((kind, len(trained.frame), full.epochs, full.batch_size, time.perf_counter() - t0))
    end_load = os.getloadavg()

    model = f"MLP {mcfg.hidden}, dropout {mcfg.dropout}"
    (hb_samples, hb_s), (ref_samples, ref_s) = refs
    hb_rate, ref_rate = hb_samples / hb_s, ref_samples / ref_s
    rows = [
        ["reference: per-row Dataset, DataLoader, Adam", f"{model} (nn.Dropout, as the handbook)", threads, 64,
         f"{hb_samples / n:.1f} ({hb_s:.0f} s)", f"{hb_rate:,.0f}", "1.0x", ""],
        ["reference: per-row Dataset, DataLoader, Adam", f"{model} (our model: ByteDropout)", threads, 64,
         f"{ref_samples / n:.1f} ({ref_s:.0f} s)", f"{ref_rate:,.0f}", f"{ref_rate / hb_rate:.1f}x", "1.0x"],
        ["this trainer (`fit`, product defaults), Adam", f"{model} (our model: ByteDropout)", threads,
         cfg.batch_size, cfg.epochs, f"{ours_rate:,.0f}", f"{ours_rate / hb_rate:.1f}x", f"{ours_rate / ref_rate:.1f}x"],
    ]
    table = markdown_table(["loop (CPU)", "model", "threads", "batch", "epochs measured", "samples/s",
                            "speed-up vs handbook loop", "vs the same loop on our model"], rows)
    table2 = markdown_table(
        ["model", "rows", "epochs", "batch", "threads", "one model, wall s (read + scaler + train)", "target"],
        [[k, f"{r:,}", e, b, threads, f"{s:.1f}", "<= 60 s" if k == "mlp" else ""] for k, r, e, b, s in whole],
    )
    note = (f"{n:,} training rows (synthetic features, {days} days; the default window is {defaults.window_days}); "
            f"all loops in the same process, one after the other, same threads; target >= 10x; learning rate "
            f"{cfg.lr}. Load average (1/5/15 min) on the 2 shared "
            f"cores: start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, end {end_load[0]:.1f}/{end_load[1]:.1f}/"
            f"{end_load[2]:.1f} (a shared machine: figures are noisy; the ratio less so).")
    print(table)
    print()
    print(table2)
    print(note)
    if not small:  # a --small run is a smoke check, not a figure
        write_section("training", f"{table}\n\n{table2}\n\n{note}")
    return 0
