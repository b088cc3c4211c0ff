"""``python -m jobs.torch.train --lake URI --date D``: train on the window ending D-8, then decide.

On a scheduled training day T (SPEC §5) the job

1. waits for the decision of the previous training day (exit 75 while it is missing),
2. trains the candidate on the labelled window ending T-8 and registers it as a version,
3. trains the same configuration on the window ending T-15 (or reuses a registered version
   with the same configuration and inputs), scores it and the current champion on the labelled
   week T-14 .. T-8 with the reference test-set rule, and
4. records the decision: the candidate becomes champion from T unless the configuration is worse
   than the champion on average precision by more than the tolerance (first day: promoted).

On any other day it only trains and registers a version (promote it by hand with
``python -m jobs.torch.registry promote``). Under ``torchrun`` with more than one process the
model trains with DistributedDataParallel (gloo on CPU, NCCL on GPU) and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date, timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from jobs.common.config import REPO_ROOT, settings
from jobs.common.lake import Dataset, Lake, parse_day
from jobs.common.schedule import (
    CARD_HISTORY_DAYS,
    LAST_LABELLED_OFFSET,
    TERMINAL_HISTORY_DAYS,
    train_window,
    validation_week,
)
from jobs.common.schema import FEATURE_SCHEMA_VERSION, MODEL_INPUTS
from jobs.torch import metrics as M
from jobs.torch import registry as R
from jobs.torch.data import (
    TERMINAL_STEP,
    CardHistory,
    FeatureFrame,
    model_history_days,
    partition_hashes,
    read_features,
    read_for_model,
)
from jobs.torch.model import TRANSFORM, InputTransform, ModelConfig, build_model, gather_rows
from jobs.torch.score import Loaded, load_version, predict

DEFAULT_HIDDEN = {"mlp": [500], "seq": [128]}  # mlp: the reference's layer; seq: chosen on validation folds
EXIT_WAITING = 75  # EX_TEMPFAIL: an earlier decision is missing; the DAG retries
VALIDATION_OFFSET = LAST_LABELLED_OFFSET + 7  # the configuration is validated on the window ending T-15


@dataclass
class TrainConfig:
    lake: str = ""
    date: str = ""
    window_days: int = 0  # 0: settings().train_window_days
    # seq (the card-history model) by default: on the validation folds (training starts 06-27 ..
    # 07-18, 21-day window, Spark-built features) AP 0.701 vs 0.690 for the MLP at the same AUC
    # (0.875 / 0.876) and CP@100 (0.304 / 0.303); AP is the metric promotion decides on.
    model: str = ""  # empty: settings().model (FRAUD_MODEL, default seq)
    hidden: list[int] = field(default_factory=list)  # empty: DEFAULT_HIDDEN of the model kind
    dropout: float = 0.2
    seq_len: int = 5
    lookback_days: int = CARD_HISTORY_DAYS
    # seq: the terminal's last 5 matured transactions (label, amount, age) beside the card history: on the
    # validation folds AP 0.714 vs 0.703 and CP@100 0.310 vs 0.304 without them (every fold better)
    terminal_len: int = 5
    terminal_lookback_days: int = TERMINAL_HISTORY_DAYS
    # batch 2048, lr 2e-3, 20 epochs (was 512 / 1e-3 / 10): chosen on the validation folds (training
    # starts 06-27..07-18, 21-day window, MLP 500): AP 0.690 vs 0.679 (batch 1024, 10 epochs), AUC
    # 0.876 vs 0.871; and ~7x the samples/s of batch 512 on one CPU thread (bench/RESULTS.md).
    epochs: int = 20
    batch_size: int = 2048
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = -1  # -1: settings().seed
    ensemble: int = 1  # mlp: train this many seeds (seed, seed+1, ...) and merge them (merge_ensemble)
    device: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0: torch's default (the cores); 1 on a busy shared host

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> TrainConfig:
        parser = argparse.ArgumentParser(prog="python -m jobs.torch.train", description=__doc__.split("\n")[0])
        defaults = cls()
        for f in fields(cls):
            value = getattr(defaults, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, list):
                parser.add_argument(flag, type=int, nargs="+", default=value)
            else:
                parser.add_argument(flag, type=type(value), default=value, required=f.name == "date")
        parser.set_defaults(lake="")
        args = parser.parse_args(argv)
        cfg = cls(**vars(args))
        return cfg.resolved()

    def resolved(self) -> TrainConfig:
        s = settings()
        out = TrainConfig(**asdict(self))
        out.lake = out.lake or s.lake_uri
        out.window_days = out.window_days or s.train_window_days
        out.model = out.model or s.model
        out.seed = s.seed if out.seed < 0 else out.seed
        out.threads = out.threads if out.threads > 0 else torch.get_num_threads()
        out.hidden = list(out.hidden) or list(DEFAULT_HIDDEN.get(out.model, [500]))
        if out.model not in ("mlp", "seq"):
            raise SystemExit(f"--model must be mlp or seq, got {out.model!r}")
        if out.ensemble > 1 and (out.model != "mlp" or len(out.hidden) != 1):
            raise SystemExit("--ensemble needs --model mlp with one hidden layer")
        return out

    def model_config(self) -> ModelConfig:
        """The architecture of the stored model (an ensemble is stored merged: ensemble x hidden units)."""
        hidden = [self.hidden[0] * self.ensemble] if self.ensemble > 1 else list(self.hidden)
        return ModelConfig(kind=self.model, hidden=hidden, dropout=self.dropout,
                           seq_len=self.seq_len, lookback_days=self.lookback_days,
                           terminal_len=self.terminal_len, terminal_lookback_days=self.terminal_lookback_days)

    def member_config(self) -> ModelConfig:
        return replace(self.model_config(), hidden=list(self.hidden))

    def recipe(self) -> dict:
        """What defines the configuration (not the data, date or place): its hash names it."""
        d = asdict(self)
        for key in ("lake", "date", "device", "threads"):
            d.pop(key)
        return d

    def recipe_hash(self) -> str:
        return R.content_hash(self.recipe())[:12]


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

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.pool is None:
            return (self.z[idx],)
        prev = self.prev[idx]
        present = (prev >= 0).to(self.z.dtype)
        out = (self.z[idx], gather_rows(self.pool, prev), self.gap[idx], present)
        return out if self.terminal is None else (*out, self.terminal[idx])


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


def checkpoint_bytes(cfg: TrainConfig, mcfg: ModelConfig, model: nn.Module, transform: InputTransform) -> bytes:
    ckpt = {
        "model": mcfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": list(MODEL_INPUTS),
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "transform": TRANSFORM,
        "scaler_mean": transform.mean.cpu(),
        "scaler_std": transform.std.cpu(),
        "recipe": json.dumps(cfg.recipe(), sort_keys=True),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def export_bytes(loaded: Loaded) -> bytes:
    """A self-contained program (torch.export, .pt2) of the scorer with the scaler folded in."""
    scorer = loaded.scorer.cpu().eval()
    batch = torch.export.Dim("batch", min=1)
    x = torch.zeros(4, len(MODEL_INPUTS))
    if loaded.config.kind == "seq":
        k = loaded.config.seq_len
        args = (x, torch.zeros(4, k, len(MODEL_INPUTS)), torch.zeros(4, k), torch.ones(4, k))
        if loaded.config.terminal_len:
            args = (*args, torch.zeros(4, loaded.config.terminal_len, TERMINAL_STEP))
        shapes = tuple({0: batch} for _ in args)
    else:
        args, shapes = (x,), ({0: batch},)
    program = torch.export.export(scorer, args, dynamic_shapes=shapes)
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class Trained:
    model: nn.Module
    transform: InputTransform
    losses: list[float]
    frame: FeatureFrame
    history: CardHistory | None


def train_model(lake: Lake, cfg: TrainConfig, window: list[date], first_date: date, device: torch.device,
                ddp: Dist | None = None) -> Trained:
    """Read the window's features, fit the scaler on them, train; the model comes back on CPU."""
    mcfg = cfg.model_config()
    seed_everything(cfg.seed, device)
    frame, history = read_for_model(lake, window, mcfg, first_date)
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


def train_version(lake: Lake, registry: R.Registry, cfg: TrainConfig, window: list[date], role: str,
                  device: torch.device, ddp: Dist, for_day: date) -> dict:
    """Train ``cfg`` on ``window`` and register the version (or reuse one with the same key)."""
    first_date = registry.schedule.first_date
    mcfg = cfg.model_config()
    inputs = partition_hashes(lake, Dataset.FEATURES, window)
    history_inputs = []
    if mcfg.kind == "seq":
        reach = model_history_days(mcfg.lookback_days, mcfg.terminal_len, mcfg.terminal_lookback_days)
        lookback = [d for d in (min(window) - timedelta(days=i) for i in range(reach, 0, -1)) if d >= first_date]
        history_inputs = partition_hashes(lake, Dataset.FEATURES, lookback)
    training_key = R.content_hash({"recipe": cfg.recipe(), "inputs": inputs, "history": history_inputs,
                                   "device": device.type, "threads": cfg.threads})[:24]
    found = registry.find_version(training_key)
    if found is not None:
        return found

    started = time.time()
    trained = train_model(lake, cfg, window, first_date, device, ddp)
    seconds = time.time() - started
    if not ddp.main:
        return {}
    frame, history, losses = trained.frame, trained.history, trained.losses
    ckpt = checkpoint_bytes(cfg, mcfg, trained.model, trained.transform)
    version = f"{mcfg.kind}-{max(window):%Y%m%d}-{hashlib.sha256(ckpt).hexdigest()[:10]}"
    loaded = load_version(ckpt, version)
    train_scores = predict(loaded, frame, history)
    train_metrics = {
        "rows": len(frame), "frauds": int(frame.label.sum()), "epoch_loss": losses,
        "auc_roc": M.auc_roc(frame.label, train_scores),
        "average_precision": M.average_precision(frame.label, train_scores),
    }
    lineage = {
        "inputs": inputs, "history_inputs": history_inputs, "code_version": code_version(),
        "parameters": cfg.recipe(), "seed": cfg.seed, "device": device.type, "threads": cfg.threads,
        "world_size": ddp.world, "torch": torch.__version__, "window": [d.isoformat() for d in window],
    }
    files = {
        R.CHECKPOINT: ckpt,
        R.EXPORT: export_bytes(loaded),
        R.METRICS: R.canonical_json({"train": train_metrics}),
        R.LINEAGE: R.canonical_json(lineage),
    }
    record = {
        "model": mcfg.kind, "role": role, "train_day": for_day.isoformat(), "window_start": min(window).isoformat(),
        "window_end": max(window).isoformat(), "recipe_hash": cfg.recipe_hash(), "training_key": training_key,
        "features": list(MODEL_INPUTS), "feature_schema_version": FEATURE_SCHEMA_VERSION, "export": R.EXPORT,
    }
    stored = registry.register_version(version, files, record)
    lake.write_run_record("train", for_day, uuid.uuid4().hex[:16], {
        "version": version, "role": role, "seconds": round(seconds, 3), "rows": len(frame),
        "samples_per_s": round(len(frame) * cfg.epochs / max(seconds, 1e-9)), "device": str(device),
    })
    return stored


def evaluate_version(lake: Lake, registry: R.Registry, version: str, test_days: list[date],
                     train_start: date, k: int = 100) -> dict:
    """Score a version on labelled test days with the reference test-set rule (SPEC §5)."""
    loaded = load_version(registry.read_file(version, R.CHECKPOINT), version)
    return evaluate_loaded(lake, loaded, test_days, train_start, registry.schedule.first_date, k)


def evaluate_loaded(lake: Lake, loaded: Loaded, test_days: list[date], train_start: date,
                    first_date: date, k: int = 100) -> dict:
    frame, history = read_for_model(lake, test_days, loaded.config, first_date)
    return evaluate_scores(lake, frame, predict(loaded, frame, history), test_days, train_start, k)


def evaluate_scores(lake: Lake, frame: FeatureFrame, scores: np.ndarray, test_days: list[date], train_start: date,
                    k: int = 100) -> dict:
    """Metrics of scores for the rows of ``frame`` (the test days) under the reference test-set rule."""
    last_known = max(test_days) - timedelta(days=LAST_LABELLED_OFFSET)
    known_days = [train_start + timedelta(days=i) for i in range((last_known - train_start).days + 1)]
    known = read_features(lake, known_days) if known_days else frame.take(np.zeros(0, np.int64))
    keep = M.keep_unblocked(frame.day, frame.card, known.day, known.card, known.label,
                            np.datetime64(train_start), delay_days=LAST_LABELLED_OFFSET)
    out = M.evaluate(frame.day[keep], frame.card[keep], frame.label[keep], scores[keep], k)
    return {"days": [d.isoformat() for d in test_days], "train_start": train_start.isoformat(), **out}


def decide(lake: Lake, registry: R.Registry, cfg: TrainConfig, day: date, candidate: dict,
           device: torch.device, ddp: Dist) -> dict | None:
    """Compare the configuration with the champion on the week T-14..T-8; the record to write."""
    tolerance = settings().promotion_tolerance
    champion = registry.champion_before(day)
    record: dict = {
        "train_day": day.isoformat(),
        "candidate": {"version": candidate.get("version"), "recipe_hash": cfg.recipe_hash(), "recipe": cfg.recipe()},
        "previous_champion": champion["version"] if champion else None,
        "tolerance": tolerance,
        "metric": "average_precision",
    }
    val_window = train_window(day, cfg.window_days, VALIDATION_OFFSET)
    if champion is None:
        reason, validation = "first champion: no model to compare with", None
    elif min(val_window) < registry.schedule.first_date:
        reason, validation = "no labelled window ending T-15 yet: refreshed without comparison", None
    else:
        val_model = train_version(lake, registry, cfg, val_window, "validation", device, ddp, day)
        if not ddp.main:
            return None
        week = validation_week(day)
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
    if not ddp.main:
        return None
    record.update(outcome=R.PROMOTED, champion=candidate["version"], validation=validation, reason=reason)
    return record


def run(cfg: TrainConfig) -> int:
    day = parse_day(cfg.date)
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ddp = init_distributed(device)
    lake = Lake.from_uri(cfg.lake)
    registry = R.Registry(lake)
    decision_day = registry.schedule.is_training_day(day)
    if decision_day:
        registry.require_previous_decision(day)
        existing = registry.decision(day)
        if existing is not None and existing["candidate"]["recipe_hash"] == cfg.recipe_hash():
            if ddp.main:
                print(f"train {day}: decision already recorded ({existing['outcome']}, champion "
                      f"{existing['champion']}); nothing to do")
            return 0
    window = train_window(day, cfg.window_days)
    if min(window) < registry.schedule.first_date:
        raise SystemExit(f"train {day}: the window {min(window)}..{max(window)} starts before the first date "
                         f"{registry.schedule.first_date}")
    candidate = train_version(lake, registry, cfg, window, "candidate", device, ddp, day)
    if ddp.main:
        print(f"train {day}: version {candidate['version']} on {min(window)}..{max(window)} -> {candidate['path']}")
    if not decision_day:
        if ddp.main:
            print(f"train {day}: not a scheduled training day; no decision (promote by hand if wanted)")
        return 0
    record = decide(lake, registry, cfg, day, candidate, device, ddp)
    if record is None:
        return 0
    stored, outcome = registry.record_decision(record)
    print(f"train {day}: decision {stored['outcome']} -> champion {stored['champion']} ({stored['reason']})")
    if outcome == "conflict":
        print(f"train {day}: a different decision was already recorded for {day}; it stands "
              f"(this run's version {candidate['version']} stays registered)")
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = TrainConfig.from_argv(argv)
    try:
        return run(cfg)
    except R.WaitingForDecision as exc:
        print(f"train {cfg.date}: {exc}", file=sys.stderr)
        return EXIT_WAITING
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
