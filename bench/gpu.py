"""Training and scoring on a GPU: this project's trainer and scorer against the per-row loop on the same GPU.

Runs only where torch sees a CUDA device (CI has none: the benchmark then says so and writes
nothing). Same data as ``bench training`` (synthetic features, the default 21-day window) at ten
times the rows a day, so an epoch is long enough to time at GPU rates. Per model (the MLP and the
default sequence model), side by side in one process on one device:

- the reference: a per-row ``Dataset`` over device-resident tensors, a ``DataLoader`` of batch 64,
  Adam, with torch's ``nn.Dropout`` (the handbook's loop, moved to the GPU as its readers would);
- ``jobs.torch.fit.fit`` (device-resident tensors, one permutation an epoch, contiguous batches, bf16
  autocast, fused Adam) at the product's batch size and at a large batch;
- scoring: ``jobs.torch.predict.predict_on`` on the GPU against ``predict`` on the host's cores,
  on the same frame, the scores compared.

``python -m bench gpu [--small] [--cpu]`` (``--cpu``: the same steps, small, on the CPU: a smoke check)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import markdown_table, write_section
from bench.scoring import big_day
from bench.training import CALENDAR, FIRST, handbook_dropout, reference_loop, synthetic_window
from jobs.common.lake import Lake
from jobs.common.progress import progress
from jobs.torch.checkpoint import checkpoint_bytes, load_version
from jobs.torch.data import CardHistory, frame_from_table, read_for_model
from jobs.torch.fit import Dist, fit, prepare
from jobs.torch.model import InputTransform, build_model
from jobs.torch.predict import predict, predict_on
from jobs.torch.train import TrainConfig

LARGE_BATCH = {"mlp": 1 << 16, "seq": 1 << 15}


def timed_fit(model, data, cfg, device) -> float:
    """Samples a second of ``fit`` after one warm-up epoch on the same model (CUDA context, cuBLAS
    handles and autocast caches are paid once per process, not per epoch)."""
    fit(model, data, replace(cfg, epochs=1), device, Dist())  # reads the loss: synchronised
    t0 = time.perf_counter()
    fit(model, data, cfg, device, Dist())  # ends by reading the loss: synchronised
    return len(data.y) * cfg.epochs / (time.perf_counter() - t0)


def main(flags: list[str]) -> int:
    small = "--small" in flags
    if "--cpu" in flags:  # the same code on the CPU, small: a smoke check of the benchmark itself
        device, small, name = torch.device("cpu"), True, "cpu (smoke check)"
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    else:
        print("bench gpu: torch sees no CUDA device here: not measured (nothing written)")
        return 0
    defaults = TrainConfig(lake="-", date="2018-04-22", device=device.type).resolved()
    days, rows_per_day = (7, 20_000) if small else (defaults.window_days, 96_000)
    rows, score_rows = [], []
    kinds = ("mlp", "seq")
    # on a terminal: the runs done (per model: the per-row loop, two trainer batches, scoring)
    with tempfile.TemporaryDirectory() as tmp, progress("bench gpu", total=4 * len(kinds), unit="runs") as advance:
        lake = Lake.from_uri(Path(tmp).as_uri())
        window = synthetic_window(lake, days, rows_per_day, cards=50_000)
        for kind in kinds:
            advance.doing(f"{kind}, the per-row loop")
            cfg = replace(defaults, lake=lake.uri, model=kind, hidden=[]).resolved()
            mcfg = cfg.model_config()
            t0 = time.perf_counter()
            frame, history = read_for_model(lake, window, mcfg, CALENDAR)
            data = prepare(frame, history, InputTransform.fit(torch.from_numpy(frame.x))).to(device)
            read_s = time.perf_counter() - t0
            torch.manual_seed(0)
            samples, seconds = reference_loop(handbook_dropout(build_model(mcfg)).to(device), data,
                                              max_seconds=3 if small else 10)
            ref = samples / seconds  # the loop is host-bound: the device queue behind it is a few steps
            advance()
            rows.append([kind, "reference: per-row Dataset, DataLoader, Adam, nn.Dropout (fp32)", 64, "-",
                         f"{ref:,.0f}", "1.0x"])
            for label, batch, epochs in (("this trainer (`fit`), product batch, bf16 autocast", cfg.batch_size, 2),
                                         ("this trainer (`fit`), large batch, bf16 autocast", LARGE_BATCH[kind],
                                          5 if small else 20)):
                advance.doing(f"{kind}, batch {batch}")
                torch.manual_seed(0)
                rate = timed_fit(build_model(mcfg), data, replace(cfg, batch_size=batch, epochs=epochs), device)
                advance()
                rows.append([kind, label, batch, epochs, f"{rate:,.0f}", f"**{rate / ref:.0f}x**"])
                print(f"gpu {kind} batch {batch}: {rate:,.0f} samples/s ({rate / ref:.0f}x the per-row loop)", flush=True)

            # scoring: a model trained briefly here, the same frame on the GPU and on the host's cores
            advance.doing(f"{kind}, scoring")
            torch.manual_seed(0)
            model = build_model(mcfg)
            transform = InputTransform.fit(torch.from_numpy(frame.x))
            fit(model, prepare(frame, history, transform).to(device), replace(cfg, epochs=1, batch_size=1 << 14),
                device, Dist())
            loaded = load_version(checkpoint_bytes(cfg.recipe(), mcfg, model.cpu(), transform), f"{kind}-gpu-bench")
            if kind == "mlp":
                big = frame_from_table(big_day(FIRST, 1_000_000 if small else 10_000_000))
                target, target_history = big, None
            else:
                target, target_history = frame, history
            predict_on(device, loaded, target.take(np.arange(min(len(target), 4096))),
                       None if target_history is None else _head(target_history, 4096))  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            on_gpu = predict_on(device, loaded, target, target_history)
            gpu_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            on_cpu = predict(loaded, target, target_history)
            cpu_s = time.perf_counter() - t0
            diff = float(np.max(np.abs(on_gpu - on_cpu))) if len(target) else 0.0
            score_rows.append([kind, f"{len(target):,}", f"{gpu_s:.2f}", f"{len(target) / gpu_s:,.0f}",
                               f"{cpu_s:.2f}", f"{len(target) / cpu_s:,.0f}", f"{cpu_s / gpu_s:.1f}x", f"{diff:.1e}"])
            print(f"gpu scoring {kind}: {len(target) / gpu_s:,.0f} rows/s on the GPU, {len(target) / cpu_s:,.0f} "
                  f"on {os.cpu_count()} cores; max |difference| {diff:.1e} (read for the model {read_s:.1f} s)",
                  flush=True)
            advance()
    table = markdown_table(["model", "loop", "batch", "epochs timed", "samples/s", "vs the per-row loop"], rows)
    table2 = markdown_table(["model", "rows scored", "GPU s (host to device, score, back)", "GPU rows/s",
                             "host cores s (`predict`)", "host rows/s", "GPU vs host", "max |score difference|"],
                            score_rows)
    note = (f"Device: {name}, torch {torch.__version__}. Training: {days * rows_per_day:,} synthetic rows "
            f"({days} days), tensors resident on the device; targets: MLP >= 10,000,000 samples/s and >= 50x the "
            "per-row loop on the same GPU. Timed epochs follow one warm-up epoch on the same model. Scoring: the "
            "MLP on a 10M-row synthetic day, the sequence model on the training frame with its card and "
            "terminal history (reading the lake and building the history are host work, not in these seconds); "
            "the GPU path scores in float32, as the host does.")
    print(table)
    print()
    print(table2)
    print(note)
    if not small and device.type == "cuda":
        write_section("gpu", f"{table}\n\n{table2}\n\n{note}")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _head(history, k: int):
    """The first ``k`` targets' history (the pool stays whole: the rows point into it)."""
    return CardHistory(history.prev[:k], history.gap_days[:k], None if history.terminal is None else history.terminal[:k],
                       history.pool_rows, history.source)
