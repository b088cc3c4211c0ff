"""The training loop: device-resident minibatch Adam, DDP under ``torchrun``, ensembles merged exactly.

Per epoch the rows are permuted once and every batch is a contiguous slice: no per-row
``Dataset.__getitem__``, no per-batch gather (docs/contract.md, "Training"). CPU training is
deterministic for a seed; on GPU batches run under bf16 autocast.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from datetime import date
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jobs.common.calendar import ONE_DAY, Calendar
from jobs.common.lake import Lake
from jobs.torch.data import CardHistory, FeatureFrame, read_for_model
from jobs.torch.model import InputTransform, ModelConfig, build_model, gather_rows

if TYPE_CHECKING:
    from jobs.torch.train import TrainConfig


# --- distributed -------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device(name)


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


# --- training -----------------------------------------------------------------------------------
@dataclass
class TrainingData:
    z: torch.Tensor  # scaled features of the rows trained on [n, 25]
    y: torch.Tensor  # float labels [n]
    pool: torch.Tensor | None = None  # seq: scaled features of history + target rows
    prev: torch.Tensor | None = None  # seq: [n, k] pool rows, -1 = none
    gap: torch.Tensor | None = None  # seq: [n, k] days
    terminal: torch.Tensor | None = None  # seq with terminal history: [n, kt, TERMINAL_STEP]

    def to(self, device: torch.device) -> TrainingData:
        return TrainingData(*(t.to(device) if t is not None else None for t in
                              (self.z, self.y, self.pool, self.prev, self.gap, self.terminal)))


def prepare(frame: FeatureFrame, history: CardHistory | None, transform: InputTransform) -> TrainingData:
    with torch.no_grad():
        z = transform(torch.from_numpy(frame.x))
        y = torch.from_numpy(frame.label.astype(np.float32))
        if history is None:
            return TrainingData(z, y)
        pool = transform(torch.from_numpy(history.pool))
        terminal = torch.from_numpy(history.terminal) if history.terminal is not None else None
        return TrainingData(z, y, pool, torch.from_numpy(history.prev), torch.from_numpy(history.gap_days), terminal)


def fit(model: nn.Module, data: TrainingData, cfg: TrainConfig, device: torch.device, ddp: Dist) -> list[float]:
    """Minibatch Adam on device-resident tensors; bf16 autocast on GPU.

    Per epoch the rows are permuted once (one gather of the whole table), and every batch is then
    a contiguous slice of it: no per-batch index gather or copy. The scaler was applied once in
    :func:`prepare`, never per batch. Adam is the fused (single-kernel) implementation where the
    device supports it, deterministic on CPU. The loss sum stays a tensor (no per-batch sync).
    """
    data = data.to(device)
    model.to(device)
    net = model
    if ddp.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = data.y.shape[0]
    per_rank = n // ddp.world
    losses = []
    net.train()
    seq = data.pool is not None
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)[: per_rank * ddp.world][ddp.rank :: ddp.world].to(device)
        z, y = data.z[perm], data.y[perm]
        prev, gap = (data.prev[perm], data.gap[perm]) if seq else (None, None)
        terminal = data.terminal[perm] if data.terminal is not None else None
        total = torch.zeros((), device=device)
        for start in range(0, per_rank, cfg.batch_size):
            stop = min(start + cfg.batch_size, per_rank)
            if seq:
                p = prev[start:stop]
                args = (z[start:stop], gather_rows(data.pool, p), gap[start:stop], (p >= 0).to(z.dtype))
                if terminal is not None:
                    args = (*args, terminal[start:stop])
            else:
                args = (z[start:stop],)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = net(*args)
            loss = loss_fn(logits.float(), y[start:stop])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * (stop - start)
        losses.append(float(total) / max(per_rank, 1))
    model.eval()
    return losses


@dataclass
class Trained:
    model: nn.Module
    transform: InputTransform
    losses: list[float]
    frame: FeatureFrame
    history: CardHistory | None


def read_training_data(lake: Lake, cfg: TrainConfig, window: list[date], cal: Calendar,
                       labels_as_of: date | None = None) -> tuple[FeatureFrame, CardHistory | None]:
    """The window's features (and for ``seq`` their history) with the targets as known before
    ``labels_as_of`` (default: the day after the window, when they are all known)."""
    return read_for_model(lake, window, cfg.model_config(), cal, labels_as_of or max(window) + ONE_DAY)


def label_digest(frame: FeatureFrame, history: CardHistory | None) -> str:
    """sha256 of every label a training reads: each row's target (with its transaction id) and, for
    a ``seq`` model with terminal history, the labels of the terminal rows it sees. Two trainings
    on the same features see the same labels exactly when these digests are equal."""
    h = hashlib.sha256()
    for part in (frame.txid, frame.label):
        h.update(np.ascontiguousarray(part).tobytes())
    if history is not None and history.terminal is not None:
        h.update(np.ascontiguousarray(history.terminal[..., 0]).tobytes())
    return h.hexdigest()


def train_model(lake: Lake, cfg: TrainConfig, window: list[date], cal: Calendar, device: torch.device,
                ddp: Dist | None = None, labels_as_of: date | None = None,
                data: tuple[FeatureFrame, CardHistory | None] | None = None) -> Trained:
    """Read the window's features and their targets as known before ``labels_as_of``
    (:func:`read_training_data`; ``data``: already read), fit the scaler on them, train; the model
    comes back on CPU."""
    mcfg = cfg.model_config()
    seed_everything(cfg.seed, device)
    frame, history = data if data is not None else read_training_data(lake, cfg, window, cal, labels_as_of)
    transform = InputTransform.fit(torch.from_numpy(frame.x))
    data = prepare(frame, history, transform)
    if cfg.ensemble <= 1:
        model = build_model(mcfg)
        losses = fit(model, data, cfg, device, ddp or Dist())
        return Trained(model.cpu(), transform, losses, frame, history)
    members, losses = [], []
    for i in range(cfg.ensemble):
        member_cfg = replace(cfg, seed=cfg.seed + i)
        seed_everything(member_cfg.seed, device)
        member = build_model(cfg.member_config())
        losses += fit(member, data, member_cfg, device, ddp or Dist())
        members.append(member.cpu())
    return Trained(merge_ensemble(members, mcfg), transform, losses, frame, history)


def merge_ensemble(members: list[nn.Module], mcfg: ModelConfig) -> nn.Module:
    """K one-hidden-layer MLPs -> one MLP of K x h hidden units whose logit is the members' mean.

    Exact: the hidden units are concatenated and the output layer averages the members' output
    layers, so scoring, export and the checkpoint format are those of a single (wider) MLP.
    """
    merged = build_model(mcfg)
    sds = [m.state_dict() for m in members]
    first, out = "mlp.net.0", f"mlp.net.{len(merged.mlp.net) - 1}"
    merged.load_state_dict({
        f"{first}.weight": torch.cat([sd[f"{first}.weight"] for sd in sds]),
        f"{first}.bias": torch.cat([sd[f"{first}.bias"] for sd in sds]),
        f"{out}.weight": torch.cat([sd[f"{out}.weight"] for sd in sds], dim=1) / len(sds),
        f"{out}.bias": torch.stack([sd[f"{out}.bias"] for sd in sds]).mean(dim=0),
    })
    return merged.eval()
