"""Models: the feed-forward baseline and a card-history sequence model, plus the input transform.

Both take the 15 ``MODEL_INPUTS`` in order. :class:`InputTransform` turns them into 25 model
features (the raw 15, log amount and log counts, the amount's log ratio to the card's average
amount over 1/7/30 days), standardised with training-data statistics kept as buffers; it is part
of the checkpoint and of the exported program, so scoring needs only the raw inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from jobs.common.schema import MODEL_INPUTS, customer_avg_amount, customer_count, terminal_count
from jobs.torch.data import TERMINAL_STEP

TRANSFORM = "log_ratio_v1"
_AMOUNT = MODEL_INPUTS.index("TX_AMOUNT")
_COUNTS = [MODEL_INPUTS.index(f(n)) for f in (customer_count, terminal_count) for n in (1, 7, 30)]
_AVERAGES = [MODEL_INPUTS.index(customer_avg_amount(n)) for n in (1, 7, 30)]
N_DERIVED = len(MODEL_INPUTS) + 1 + len(_COUNTS) + len(_AVERAGES)


def derive(x: torch.Tensor) -> torch.Tensor:
    """Raw inputs [..., 15] -> unscaled model features [..., 25]."""
    amount = x[..., _AMOUNT : _AMOUNT + 1]
    log_amount = torch.log1p(amount.clamp_min(0))
    log_counts = torch.log1p(x[..., _COUNTS].clamp_min(0))
    log_ratio = log_amount - torch.log1p(x[..., _AVERAGES].clamp_min(0))
    return torch.cat([x, log_amount, log_counts, log_ratio], dim=-1)


class InputTransform(nn.Module):
    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mean", mean if mean is not None else torch.zeros(N_DERIVED))
        self.register_buffer("std", std if std is not None else torch.ones(N_DERIVED))

    @staticmethod
    def fit(x: torch.Tensor) -> InputTransform:
        """Statistics of the training rows only (float64 for stable sums)."""
        d = derive(x.double())
        std = d.std(dim=0, unbiased=False)
        return InputTransform(d.mean(dim=0).float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (derive(x) - self.mean) / self.std


STORED_SEQ_HIDDEN = 32  # the GRU width of every seq model stored before the width was a training setting


@dataclass
class ModelConfig:
    kind: str = "mlp"  # mlp | seq
    hidden: list[int] = field(default_factory=lambda: [500])
    dropout: float = 0.2
    seq_len: int = 5  # seq: previous transactions of the card
    seq_hidden: int = STORED_SEQ_HIDDEN  # the trainer's default is TrainConfig.seq_hidden
    # The day counts below are filled from the calendar by the trainer (jobs.torch.train) and stored
    # with the model, so a model scores with the history it was trained with.
    lookback_days: int = 0  # seq: feature days before the first target day searched for history
    terminal_len: int = 0  # seq: matured transactions of the terminal seen (0: none, as models before it had)
    terminal_lookback_days: int = 0  # seq: feature days searched for them
    label_delay_days: int = 0  # seq: the terminal rows seen are at least this old (their labels matured)

    def to_dict(self) -> dict:
        return asdict(self)


def random_bytes(n: int) -> torch.Tensor:
    """At least ``n`` uniform random bytes (contiguous uint8) from the default CPU generator, cheaply.

    Each 64-bit draw over the whole int64 range gives eight uniform bytes, where ``bernoulli_``
    spends a 32-bit draw on every element. (``random_()`` without bounds stops at 2**63, leaving the
    top byte of every word non-uniform; the explicit range covers all 64 bits.)
    """
    words = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return words.view(torch.uint8)


def _keep(x: torch.Tensor, keep_below: int) -> torch.Tensor:
    """Float 0/1 mask shaped like ``x``: 1 with probability keep_below / 256.

    Computed in float arithmetic (``clamp(keep_below - byte, 0, 1)`` is 1 exactly when the byte is
    below ``keep_below``): CPU comparisons that make bool tensors cost several times more.
    """
    n = x.numel()
    return random_bytes(n)[:n].view_as(x).to(x.dtype).neg_().add_(keep_below).clamp_(0, 1)


class _ReluDropout(torch.autograd.Function):
    """relu(x) then dropout, as one multiplier: x * m with m = scale where kept and x > 0, else 0.

    Forward and backward are then one multiply each (the separate ReLU, its backward and the
    dropout multiply each made a pass over the [batch, hidden] activations).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep_below: int) -> torch.Tensor:
        mult = _keep(x, keep_below).mul_(torch.sign(torch.relu(x))).mul_(256.0 / keep_below)
        ctx.save_for_backward(mult)
        return x * mult

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mult,) = ctx.saved_tensors
        return grad * mult, None


class ByteDropout(nn.Module):
    """Dropout whose CPU mask costs a seventh of ``bernoulli_``'s random draws.

    An element is kept when its random byte (:func:`random_bytes`) is below
    ``round(256 (1 - p))``, i.e. with probability within 1/512 of ``1 - p``, and kept elements
    are scaled by the exact inverse of that probability (unbiased). Same generator, so a seed
    still fixes the bytes. Right after a ReLU in training on CPU, :class:`MLP` fuses the two
    (:meth:`relu_then_drop`). Identity in eval mode; plain dropout on other devices.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.keep_below = round(256 * (1 - p))

    def active_on(self, x: torch.Tensor) -> bool:
        return self.training and self.p > 0 and x.device.type == "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.p, True)
        return x * _keep(x, self.keep_below).mul_(256.0 / self.keep_below)

    def relu_then_drop(self, x: torch.Tensor) -> torch.Tensor:
        """``self(relu(x))`` in one pass forward and one backward (CPU training only)."""
        return _ReluDropout.apply(x, self.keep_below)


class _OneHiddenLayer(torch.autograd.Function):
    """``Linear(n, H) -> ReLU -> ByteDropout -> Linear(H, 1)`` in training on CPU, with a backward that
    never makes a pass over the [batch, H] activations: only matrix products read them.

    With ``m`` the 0/1 multiplier (kept and positive before the ReLU), ``h = a * m`` and the dropout
    scale ``s`` applied to the output layer's tiny vectors, the logit's gradient ``g`` gives
    ``dW1 = w2 (m^T (s g x))``, ``db1 = w2 (m^T s g)`` (one product of m^T with [s g x | s g]),
    ``dw2 = s h^T g`` and ``dx = s g (m (w2 W1))``: the [batch, H] gradient of ``a`` that autograd
    would build, and the passes that scale it by the mask, are never formed. Same random bytes as
    :class:`ByteDropout`, so a seed gives the same masks as the layer-by-layer path.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep_below: int):
        a = torch.addmm(b1, x, w1.t().contiguous())  # a contiguous [n, H] right operand: ~20% quicker
        keep = _keep(a, keep_below)  # 0/1
        h = a.clamp_min_(0).mul_(keep)  # relu then the mask, in place: a is not needed again
        m = torch.gt(h, 0, out=keep)  # 0/1 where the unit passed both (as float, reusing the mask)
        scale = 256.0 / keep_below
        ctx.scale = scale
        ctx.save_for_backward(x, w1, w2, h, m)
        return torch.addmv(b2, h, w2.view(-1), alpha=scale)

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, h, m = ctx.saved_tensors
        gs = g * ctx.scale
        w2v = w2.view(-1)
        # [n + 1, H]: m as the right operand, read as stored (quicker than m.t() on the left)
        both = torch.mm(torch.cat([x * gs.unsqueeze(1), gs.unsqueeze(1)], dim=1).t(), m).mul_(w2v)
        dw1 = both[:-1].t().contiguous()
        db1 = both[-1]
        dw2 = torch.mv(h.t(), gs).view_as(w2)
        dx = torch.mm(m, w2v.unsqueeze(1) * w1).mul_(gs.unsqueeze(1)) if ctx.needs_input_grad[0] else None
        return dx, dw1, db1, dw2, g.sum().view(1), None


class MLP(nn.Module):
    def __init__(self, n_in: int, hidden: list[int], dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(n_in, h), nn.ReLU(), ByteDropout(dropout)]
            n_in = h
        layers.append(nn.Linear(n_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        drop = self.net[2] if len(self.net) == 4 else None
        if isinstance(drop, ByteDropout) and drop.active_on(z) and z.dtype == torch.float32:
            first, last = self.net[0], self.net[3]  # one hidden layer, training on CPU: fused
            return _OneHiddenLayer.apply(z, first.weight, first.bias, last.weight, last.bias, drop.keep_below)
        h, layers, i = z, list(self.net), 0
        while i < len(layers):
            layer, following = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, nn.ReLU) and isinstance(following, ByteDropout) and following.active_on(h):
                h, i = following.relu_then_drop(h), i + 2
            else:
                h, i = layer(h), i + 1
        return h.squeeze(-1)


class FraudMLP(nn.Module):
    """Scaled features of one transaction -> fraud logit."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mlp = MLP(N_DERIVED, cfg.hidden, cfg.dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z)


class CardSequenceModel(nn.Module):
    """The transaction, its card's previous k transactions (a GRU over them) and its terminal's last
    matured transactions -> fraud logit.

    ``prev`` [B, k, 25] are the scaled features of the previous rows, oldest first, ``gap`` [B, k]
    the days between each and the scored transaction, ``present`` [B, k] 1 where a row exists.
    ``terminal`` [B, kt, TERMINAL_STEP] (``jobs.torch.data.build_terminal_history``) are the last
    ``kt = terminal_len`` transactions at the same terminal at least the label delay older, with
    their labels: what lets the model tell a terminal that started to take frauds at ordinary
    amounts (compromised) from one that saw a single large fraud of a compromised card.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.step = nn.Linear(N_DERIVED + 2, cfg.seq_hidden)
        self.gru = nn.GRU(cfg.seq_hidden, cfg.seq_hidden, batch_first=True)
        self.terminal_len = cfg.terminal_len
        self.head = MLP(N_DERIVED + cfg.seq_hidden + TERMINAL_STEP * cfg.terminal_len, cfg.hidden, cfg.dropout)

    def forward(self, z: torch.Tensor, prev: torch.Tensor, gap: torch.Tensor, present: torch.Tensor,
                terminal: torch.Tensor | None = None):
        p = present.unsqueeze(-1)
        steps = torch.cat([prev * p, torch.log1p(gap.clamp_min(0)).unsqueeze(-1) * p, p], dim=-1)
        _, h = self.gru(torch.relu(self.step(steps)))
        return self.head_of(z, h[-1], terminal)

    def head_of(self, z: torch.Tensor, state: torch.Tensor, terminal: torch.Tensor | None = None):
        """The logit [B] from the scored row's inputs, the GRU's last state [B, seq_hidden] and the
        terminal's rows: the rest of :meth:`forward`."""
        parts = [z, state]
        if self.terminal_len:  # the terminal's matured rows go to the head as they are, oldest first
            if terminal is None:
                raise ValueError(f"this model reads its terminal's last {self.terminal_len} matured rows: "
                                 "pass them (jobs.torch.data.read_for_model builds them)")
            parts.append(terminal.flatten(1))
        return self.head(torch.cat(parts, dim=-1))


def gather_rows(pool: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``pool[prev]`` for [B, k] row numbers (-1: none, given row 0, masked by the model) -> [B, k, F].

    ``index_select`` on the flattened rows: about 4x quicker on CPU than advanced indexing.
    """
    return torch.index_select(pool, 0, prev.clamp_min(0).flatten()).view(*prev.shape, pool.shape[1])


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.kind == "mlp":
        return FraudMLP(cfg)
    if cfg.kind == "seq":
        return CardSequenceModel(cfg)
    raise ValueError(f"unknown model kind {cfg.kind!r} (mlp or seq)")


class Scorer(nn.Module):
    """Raw inputs -> fraud probability: the transform folded in. This is what gets exported."""

    def __init__(self, transform: InputTransform, model: nn.Module):
        super().__init__()
        self.transform = transform
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(self.transform(x)))


class SequenceScorer(Scorer):
    """Raw inputs of the transaction [B, 15], of its previous rows [B, k, 15], gaps and presence,
    and (models with ``terminal_len``) the terminal's matured rows [B, kt, TERMINAL_STEP]."""

    def forward(self, x: torch.Tensor, prev: torch.Tensor, gap: torch.Tensor, present: torch.Tensor,
                terminal: torch.Tensor | None = None):
        return torch.sigmoid(self.model(self.transform(x), self.transform(prev), gap, present, terminal))


def scorer_for(cfg: ModelConfig, transform: InputTransform, model: nn.Module) -> Scorer:
    return SequenceScorer(transform, model) if cfg.kind == "seq" else Scorer(transform, model)
