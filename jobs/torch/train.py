"""``python -m jobs.torch.train --lake URI --date D``: train on the window ending D-8, then decide.

On a scheduled training day T (docs/contract.md, "Training, evaluation and promotion") the job

1. waits for the decision of the previous training day (exit 75 while it is missing),
2. trains the candidate on the labelled window ending T-8 and registers it as a version,
3. trains the same configuration on the window ending T-15 (or reuses a registered version
   with the same configuration, inputs and labels), scores it and the current champion on the labelled
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
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import date

import torch
import torch.distributed as dist

from jobs.common.calendar import calendar, parse_day
from jobs.common.cli import EXIT_FAILED, EXIT_OK, EXIT_WAITING
from jobs.common.config import settings
from jobs.common.lake import Dataset, Lake
from jobs.common.provenance import InputRecorder
from jobs.common.provenance import lineage as provenance_lineage
from jobs.common.schema import FEATURE_SCHEMA_VERSION, MODEL_INPUTS
from jobs.monitoring import drift_reference
from jobs.torch import keep_freed_memory
from jobs.torch import metrics as M
from jobs.torch import registry as R
from jobs.torch.checkpoint import Loaded, checkpoint_bytes, export_bytes, load_version
from jobs.torch.data import CardHistory, FeatureFrame, model_history_days
from jobs.torch.evaluate import decide, fraud_labels
from jobs.torch.fit import Dist, init_distributed, label_digest, pick_device, read_training_data, train_model
from jobs.torch.model import STORED_SEQ_HIDDEN, ModelConfig
from jobs.torch.predict import predict

keep_freed_memory()  # a batch step: freed memory kept for its next allocation (jobs/torch/__init__.py)

DEFAULT_HIDDEN = {"mlp": [500], "seq": [128]}  # mlp: the reference's layer; seq: chosen on validation folds


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
    # seq: the GRU's width over the card's previous rows. 8 (was 32): on the validation folds AP 0.715 /
    # 0.716 (seeds 0 / 1) against 0.714 / 0.716 at 32, AUC and CP@100 equal, for a sixteenth of the recurrence's
    # arithmetic (the trainer 1.5x the samples/s, the scorer's model 2.4x: bench/RESULTS.md)
    seq_hidden: int = 8
    lookback_days: int = 0  # 0: the calendar's card history (card_history_days)
    # seq: the terminal's last 5 matured transactions (label, amount, age) beside the card history: on the
    # validation folds AP 0.714 vs 0.703 and CP@100 0.310 vs 0.304 without them (every fold better)
    terminal_len: int = 5
    terminal_lookback_days: int = 0  # 0: the calendar's terminal history (terminal_history_days)
    label_delay_days: int = 0  # 0: the calendar's label delay; the terminal rows are at least this old
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
        cal = calendar()
        out.lookback_days = out.lookback_days or cal.card_history_days
        out.terminal_lookback_days = out.terminal_lookback_days or cal.terminal_history_days
        out.label_delay_days = out.label_delay_days or cal.label_delay_days
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
                           seq_len=self.seq_len, seq_hidden=self.seq_hidden, lookback_days=self.lookback_days,
                           terminal_len=self.terminal_len, terminal_lookback_days=self.terminal_lookback_days,
                           label_delay_days=self.label_delay_days)

    def member_config(self) -> ModelConfig:
        return replace(self.model_config(), hidden=list(self.hidden))

    def recipe(self) -> dict:
        """What defines the configuration (not the data, date or place): its hash names it."""
        d = asdict(self)
        for key in ("lake", "date", "device", "threads"):
            d.pop(key)
        if d["model"] != "seq" or d["seq_hidden"] == STORED_SEQ_HIDDEN:
            # recipes from before the width was a setting had none (every seq model was 32 wide): an MLP's
            # or a 32-wide seq's recipe keeps the hash it had, so its recorded decisions still match
            d.pop("seq_hidden")
        return d

    def recipe_hash(self) -> str:
        return R.content_hash(self.recipe())[:12]


def drift_reference_of(loaded: Loaded, frame: FeatureFrame, history: CardHistory | None,
                       scores=None) -> bytes:
    """The version's drift reference (``jobs.monitoring``): deciles of its scores and inputs on its
    training window."""
    scores = predict(loaded, frame, history) if scores is None else scores
    return R.canonical_json(drift_reference(frame.x, MODEL_INPUTS, scores))


def train_version(lake: Lake, registry: R.Registry, cfg: TrainConfig, window: list[date], role: str,
                  device: torch.device, ddp: Dist, for_day: date) -> dict | None:
    """Train ``cfg`` on ``window`` and register the version (or reuse one with the same training key).

    Returns the version record (None on a DDP rank that does not write).
    """
    cal = registry.calendar
    mcfg = cfg.model_config()
    recorder = InputRecorder(lake)
    inputs = recorder.days(Dataset.FEATURES, window)
    history_inputs = []
    if mcfg.kind == "seq":
        reach = model_history_days(mcfg.lookback_days, mcfg.terminal_len, mcfg.terminal_lookback_days)
        history_inputs = recorder.days(Dataset.FEATURES, cal.expected(cal.history_before(window, reach)))
    started = time.time()
    readable = lake.readable(Dataset.FEATURES, window)  # an abandoned day is trained without (lineage names it)
    data = read_training_data(lake, cfg, readable, cal, labels_as_of=for_day)
    labels = label_digest(*data)  # the targets as known on for_day: a late label event changes them
    training_key = R.content_hash({"recipe": cfg.recipe(), "inputs": inputs, "history": history_inputs,
                                   "labels": labels, "device": device.type, "threads": cfg.threads})[:24]
    found = registry.find_version(training_key)
    if found is not None:
        return found
    trained = train_model(lake, cfg, readable, cal, device, ddp, labels_as_of=for_day, data=data)
    seconds = time.time() - started
    if not ddp.main:
        return None
    frame, history, losses = trained.frame, trained.history, trained.losses
    ckpt = checkpoint_bytes(cfg.recipe(), mcfg, trained.model, trained.transform)
    version = f"{mcfg.kind}-{max(window):%Y%m%d}-{hashlib.sha256(ckpt).hexdigest()[:10]}"
    loaded = load_version(ckpt, version)
    train_scores = predict(loaded, frame, history)
    train_metrics = {
        "rows": len(frame), "frauds": int(frame.label.sum()), "epoch_loss": losses,
        "auc_roc": M.auc_roc(frame.label, train_scores),
        "average_precision": M.average_precision(frame.label, train_scores),
    }
    lineage = {
        **provenance_lineage("train", inputs, cfg.recipe()), "history_inputs": history_inputs, "labels_sha256": labels,
        "labels_as_of": for_day.isoformat(),
        "seed": cfg.seed, "device": device.type, "threads": cfg.threads,
        "world_size": ddp.world, "torch": torch.__version__, "window": [d.isoformat() for d in window],
    }
    files = {
        R.CHECKPOINT: ckpt,
        R.EXPORT: export_bytes(loaded),
        R.METRICS: R.canonical_json({"train": train_metrics}),
        R.LINEAGE: R.canonical_json(lineage),
        R.REFERENCE: drift_reference_of(loaded, frame, history, train_scores),
    }
    record = {
        "model": mcfg.kind, "role": role, "train_day": for_day.isoformat(), "window_start": min(window).isoformat(),
        "window_end": max(window).isoformat(), "recipe_hash": cfg.recipe_hash(), "training_key": training_key,
        "features": list(MODEL_INPUTS), "feature_schema_version": FEATURE_SCHEMA_VERSION, "export": R.EXPORT,
        "checkpoint_sha256": hashlib.sha256(ckpt).hexdigest(),
    }
    stored = registry.register_version(version, files, record)
    lake.write_run_record("train", for_day, uuid.uuid4().hex[:16], {
        "version": version, "role": role, "seconds": round(seconds, 3), "rows": len(frame),
        "samples_per_s": round(len(frame) * cfg.epochs / max(seconds, 1e-9)), "device": str(device),
    })
    return stored


def run(cfg: TrainConfig) -> int:
    day = parse_day(cfg.date)
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    ddp = init_distributed(device)
    lake = Lake.from_uri(cfg.lake)
    registry = R.Registry(lake)
    cal = registry.calendar
    decision_day = registry.schedule.is_training_day(day)
    if decision_day:
        registry.require_previous_decision(day)
        existing = registry.decision(day)
        if existing is not None and existing.get("resolved_by") == R.OPERATOR:
            if ddp.main:
                print(f"train {day}: an operator resolved this day ({existing['reason']}; champion "
                      f"{existing['champion']}); nothing to do")
            return EXIT_OK
        if existing is not None and existing["candidate"]["recipe_hash"] == cfg.recipe_hash():
            if ddp.main:
                print(f"train {day}: decision already recorded ({existing['outcome']}, champion "
                      f"{existing['champion']}); nothing to do")
            return EXIT_OK
    window = cal.train_window(day, cfg.window_days)
    if min(window) < cal.first_date:
        raise SystemExit(f"train {day}: the window {min(window)}..{max(window)} starts before the first date "
                         f"{cal.first_date}")
    training_frauds = fraud_labels(lake, window, day, cal) if decision_day else 0
    evident = training_frauds >= settings().min_fraud_labels
    candidate = train_version(lake, registry, cfg, window, "candidate", device, ddp, day) if evident or not decision_day \
        else {}
    if ddp.main and candidate:
        print(f"train {day}: version {candidate['version']} on {min(window)}..{max(window)} -> {candidate['path']}")
    if not decision_day:
        if ddp.main:
            print(f"train {day}: not a scheduled training day; no decision (promote by hand if wanted)")
        return EXIT_OK
    record = decide(
        lake, registry, day, candidate or {}, cfg.recipe(), cfg.recipe_hash(), cfg.window_days,
        lambda val_window: train_version(lake, registry, cfg, val_window, "validation", device, ddp, day),
        training_frauds,
    )
    if record is None or not ddp.main:
        return EXIT_OK
    stored, outcome = registry.record_decision(record)
    if outcome == "conflict":
        print(f"train {day}: a different decision was recorded for {day} first; it stands: {stored['outcome']} -> "
              f"champion {stored['champion']} ({stored['reason']}). This run's decision ({record['outcome']} -> "
              f"{record['champion']}) was not recorded; its version {candidate.get('version')} stays registered.",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"train {day}: decision {stored['outcome']} -> champion {stored['champion']} ({stored['reason']})")
    return EXIT_OK


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
