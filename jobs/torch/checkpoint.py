"""Model checkpoints: save, load, export, and the checks that a model fits the features it gets.

A checkpoint is a plain dict that loads with ``torch.load(weights_only=True)``: the model's
configuration and state_dict, the feature list and feature-schema version it was trained on, the
input transform's name and statistics, and the recipe. ``model_export.pt2`` is a ``torch.export``
program of the scorer (transform folded in) that scores without this project's code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, fields

import torch
from torch import nn

from jobs.common.calendar import Calendar
from jobs.common.schema import FEATURE_SCHEMA_VERSION, MODEL_INPUTS
from jobs.torch.data import TERMINAL_STEP
from jobs.torch.model import TRANSFORM, InputTransform, ModelConfig, Scorer, build_model, scorer_for


class IncompatibleModel(RuntimeError):
    """The model was trained on other features than the ones it would score."""


@dataclass
class Loaded:
    version: str
    config: ModelConfig
    scorer: Scorer


def checkpoint_bytes(recipe: dict, mcfg: ModelConfig, model: nn.Module, transform: InputTransform) -> bytes:
    ckpt = {
        "model": mcfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "features": list(MODEL_INPUTS),
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "transform": TRANSFORM,
        "scaler_mean": transform.mean.cpu(),
        "scaler_std": transform.std.cpu(),
        "recipe": json.dumps(recipe, sort_keys=True),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def check_compatible(ckpt: dict, version: str) -> None:
    """Refuse a model made for other features, another feature schema or another input transform."""
    if list(ckpt["features"]) != list(MODEL_INPUTS):
        raise IncompatibleModel(f"model {version} was trained on features {ckpt['features']}, not {list(MODEL_INPUTS)}")
    if ckpt["feature_schema_version"] != FEATURE_SCHEMA_VERSION:
        raise IncompatibleModel(
            f"model {version} expects feature schema {ckpt['feature_schema_version']}, the features are "
            f"{FEATURE_SCHEMA_VERSION}: train a model on the current features (docs/contract.md, 'Migrating a lake')"
        )
    if ckpt.get("transform") != TRANSFORM:
        raise IncompatibleModel(f"model {version} uses input transform {ckpt.get('transform')}, not {TRANSFORM}")


def model_config(stored: dict) -> ModelConfig:
    """The stored configuration. Checkpoints written before the label delay was stored were all
    trained with the calendar's default delay."""
    known = {f.name for f in fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in stored.items() if k in known})
    if not cfg.label_delay_days:
        cfg.label_delay_days = next(f.default for f in fields(Calendar) if f.name == "label_delay_days")
    return cfg


def load_version(checkpoint: bytes, version: str) -> Loaded:
    """Rebuild a scorer from checkpoint bytes, refusing one made for other features."""
    ckpt = torch.load(io.BytesIO(checkpoint), weights_only=True, map_location="cpu")
    check_compatible(ckpt, version)
    cfg = model_config(ckpt["model"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    transform = InputTransform(torch.as_tensor(ckpt["scaler_mean"]), torch.as_tensor(ckpt["scaler_std"]))
    return Loaded(version, cfg, scorer_for(cfg, transform, model).eval())


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
