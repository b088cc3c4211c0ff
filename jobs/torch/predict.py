"""Scoring a frame of transactions with a loaded model, fast on CPU (docs/contract.md, "Scoring").

The MLP path is built for throughput: the Arrow columns are read as numpy views (no pandas, no
[n, 15] frame), the scaler is folded into the first layer, and chunks of ``SCORE_CHUNK`` rows are
scored under ``inference_mode`` by one thread per core with single-threaded torch ops. The
sequence model projects each history row once through its step layer (the scaler folded in),
then scores chunks the same way.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from jobs.common.schema import MODEL_INPUTS
from jobs.torch.checkpoint import Loaded
from jobs.torch.data import CardHistory, FeatureFrame, gather_inputs
from jobs.torch.model import _AMOUNT, _AVERAGES, _COUNTS, N_DERIVED, Scorer, gather_rows

SCORE_BATCH = 1 << 16
SCORE_CHUNK = 1024  # rows per matmul: the [chunk, hidden] activations stay in the core's cache
SEQ_CHUNK = 8192  # sequence model: rows per step of its GRU
HEAD_CHUNK = 2048  # and of its head, whose [rows, 128] output then stays in the core's L2 cache (a fifth quicker)


def score_workers() -> int:
    """Worker threads for scoring: one per core (capped at 8)."""
    return max(1, min(os.cpu_count() or 1, 8))


def _derived_rows(cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The 10 derived features [10, n] of inputs laid out a feature per row, ``cols`` [15, n]: log
    amount, log counts, log ratios of the amount to the averages (:func:`jobs.torch.model.derive`),
    each computed along a row of ``cols``, with no [n, 25] gather and concatenation (into ``out``)."""
    d = torch.empty(N_DERIVED - len(MODEL_INPUTS), cols.shape[1]) if out is None else out
    torch.log1p(cols[_AMOUNT].clamp_min(0), out=d[0])
    torch.log1p(cols[_COUNTS].clamp_min(0), out=d[1 : 1 + len(_COUNTS)])
    ratio = d[1 + len(_COUNTS) :]
    torch.log1p(cols[_AVERAGES].clamp_min(0), out=ratio)
    torch.sub(d[0:1], ratio, out=ratio)
    return d


def _fold_scaler(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear layer over scaled features ``(d - mean) / std`` as one over the unscaled ``d``: its
    [15, H] and [10, H] right operands for the raw and the derived features, and its bias."""
    w, mean, std = weight.detach().double(), mean.double(), std.double()
    folded = (w / std).t().contiguous().float()
    b = (bias.detach().double() - w @ (mean / std)).float()
    return folded[: len(MODEL_INPUTS)], folded[len(MODEL_INPUTS) :], b


def _project_columns(cols: torch.Tensor, raw_w: torch.Tensor, derived_w: torch.Tensor, bias: torch.Tensor
                     ) -> torch.Tensor:
    """[n, H] = the folded layer (:func:`_fold_scaler`) on inputs laid out a feature per row, [15, n]."""
    return torch.addmm(bias, cols.t(), raw_w).addmm_(_derived_rows(cols).t(), derived_w)


class _FoldedMLP:
    """The MLP scorer as plain matrices, the scaler folded into the first layer.

    ``(d - mean) / std`` followed by ``W d' + b`` is ``(W / std) d + (b - W (mean / std))``: the
    standardisation costs nothing at scoring time; the derived log features are computed per chunk
    into a [25, chunk] buffer that the first matmul reads transposed (no copy). Dropout is the
    identity in eval mode. Results match the module within float32 rounding (rtol 1e-5).
    """

    def __init__(self, scorer: Scorer):
        t = scorer.transform
        linears = [m for m in scorer.model.mlp.net if isinstance(m, nn.Linear)]
        raw_w, derived_w, bias = _fold_scaler(linears[0].weight, linears[0].bias, t.mean, t.std)
        self.layers = [(bias, torch.cat([raw_w, derived_w]))]
        self.layers += [(m.bias.detach().float().clone(), m.weight.detach().t().contiguous().float()) for m in linears[1:]]

    def __call__(self, cols: Sequence[np.ndarray], start: int, stop: int, out: np.ndarray) -> None:
        n = stop - start
        d = torch.empty(N_DERIVED, n)
        dn = d.numpy()
        for j, c in enumerate(cols):
            dn[j] = c[start:stop]  # casts int / float64 columns to float32 in the copy
        _derived_rows(d[: len(MODEL_INPUTS)], out=d[len(MODEL_INPUTS) :])
        h = d.t()
        last = len(self.layers) - 1
        for i, (b, w) in enumerate(self.layers):
            h = torch.addmm(b, h, w)
            if i < last:
                h.relu_()
        out[start:stop] = torch.sigmoid_(h.squeeze(1)).numpy()


class _FoldedSequence:
    """The sequence model's step layer folded into its history rows, for CPU scoring.

    The step layer sees ``[z * p, log1p(gap) * p, p]`` for a previous row with scaled features
    ``z = (derive(raw) - mean) / std`` and presence ``p`` (0 or 1), so its output is
    ``p * (W_z z + w_gap log1p(gap) + w_p) + b``, and ``W_z z = (W_z / std) derive(raw) - W_z (mean / std)``
    depends on the row alone. Each history row is projected once to those ``seq_hidden`` numbers
    (8 by default, against the 25 scaled features the module would gather for every use of it),
    with the presence weight (the mask multiplies both alike); per scored row only the gap term is
    added and the mask applied. The GRU runs as its gate equations
    (:meth:`last_state`): for 8 hidden units ``nn.GRU`` spends more time dispatching than computing,
    about twice as long per row. The head's first layer takes the scored row's inputs with the
    scaler folded in the same way, its GRU state and its terminal rows as three products summed
    into one [n, hidden] output, with no concatenation (:meth:`head`). Both read the inputs a feature
    per row ([15, n], as a frame laid out by column holds them), so the derived features are
    computed along contiguous rows. Scores match the module within float32 rounding.
    """

    def __init__(self, scorer: Scorer):
        t, model = scorer.transform, scorer.model
        step = model.step
        w = step.weight.detach()
        # a previous row's projection carries the presence weight too: the presence mask multiplies
        # both alike, so it is added once per pool row instead of once per use
        self.raw_w, self.derived_w, self.bias = _fold_scaler(w[:, :N_DERIVED], w[:, N_DERIVED + 1], t.mean, t.std)
        self.w_gap = w[:, N_DERIVED : N_DERIVED + 1].float()  # a column: it multiplies the rows of a [H, n] layout
        self.step_bias = step.bias.detach().float().view(-1, 1)
        gru = model.gru
        hid = gru.hidden_size
        # the GRU's matrices as they multiply a state laid out a unit per row ([H, n]); the hidden
        # biases of the reset and update gates added to the input ones (both are plain sums there)
        self.w_ih = gru.weight_ih_l0.detach().clone()  # [3H, H]
        self.b_i = gru.bias_ih_l0.detach().clone()
        self.b_i[: 2 * hid] += gru.bias_hh_l0.detach()[: 2 * hid]
        self.b_i = self.b_i.view(-1, 1)
        w_hh = gru.weight_hh_l0.detach()
        self.w_hh_rz, self.w_hh_n = w_hh[: 2 * hid].contiguous(), w_hh[2 * hid :].contiguous()
        self.b_hn = gru.bias_hh_l0.detach()[2 * hid :].clone().view(-1, 1)
        # the head's first layer over [scaled own inputs (25), GRU state (H), terminal rows]: the scaler
        # folded into the own inputs' part, the others as they are
        linears = [m for m in model.head.net if isinstance(m, nn.Linear)]
        first = linears[0].weight.detach()
        self.head_raw_w, self.head_derived_w, self.head_bias = _fold_scaler(first[:, :N_DERIVED], linears[0].bias,
                                                                            t.mean, t.std)
        self.head_state_w = first[:, N_DERIVED : N_DERIVED + hid].t().contiguous()
        self.head_terminal_w = first[:, N_DERIVED + hid :].t().contiguous() if first.shape[1] > N_DERIVED + hid else None
        self.head_rest = [(m.bias.detach().float(), m.weight.detach().t().contiguous().float()) for m in linears[1:]]

    def project(self, cols: torch.Tensor) -> torch.Tensor:
        """History rows' raw inputs, a feature per row [15, n] -> their part of the step layer's output [n, H]."""
        return _project_columns(cols, self.raw_w, self.derived_w, self.bias)

    def head(self, cols: torch.Tensor, state: torch.Tensor, terminal: torch.Tensor | None) -> torch.Tensor:
        """The logit [n] from the scored rows' raw inputs [15, n] (a feature per row), the GRU's last
        state [n, H] and the terminal rows [n, kt, TERMINAL_STEP] (``CardSequenceModel.head_of``)."""
        h = _project_columns(cols, self.head_raw_w, self.head_derived_w, self.head_bias).addmm_(state, self.head_state_w)
        if self.head_terminal_w is not None:
            h.addmm_(terminal.flatten(1), self.head_terminal_w)
        for b, w in self.head_rest:
            h = torch.addmm(b, h.relu_(), w)
        return h.squeeze(1)

    def steps(self, projected: torch.Tensor, prev: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        """The GRU's inputs, ``relu`` of the step layer's output, laid out a unit per row [H, k, B]:
        for [B, k] previous rows ``prev`` (pool rows, -1 for none) and their ``gap`` in days, from the
        pool rows' ``projected`` [N, H]. The projections are gathered step by step ([k * B, H]) and
        turned once; every elementwise pass then walks rows of k * B numbers."""
        b, k = prev.shape
        hid = projected.shape[1]
        xs = gather_rows(projected, prev.t()).view(k * b, hid).t().contiguous()  # [H, k * B]
        present = (prev.t() >= 0).float().reshape(1, k * b)
        lg = torch.log1p(gap.t().clamp_min(0)).reshape(1, k * b)
        xs.addcmul_(self.w_gap, lg)
        return torch.addcmul(self.step_bias, xs, present).relu_().view(hid, k, b)

    def last_state(self, xs: torch.Tensor) -> torch.Tensor:
        """``nn.GRU``'s last hidden state [B, H] over its inputs ``xs`` [H, k, B] (:meth:`steps`), from
        a zero state.

        Its equations, gates in torch's order (reset, update, new): r, z = sigmoid(W_i x + b_i +
        W_h h + b_h); n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = n + z * (h - n), a lerp
        from n to h. They run on the state laid out a unit per row ([H, B]): each elementwise step
        then walks rows of B numbers, where with [B, H] it walked B rows of 8 to 16 (about half the
        time in all). The input part of every step is one matmul; the first step's hidden part is
        just its bias.
        """
        hid, k, b = xs.shape
        gi = torch.addmm(self.b_i, self.w_ih, xs.view(hid, k * b)).view(3 * hid, k, b)
        g = gi[:, 0]
        rz = torch.sigmoid(g[: 2 * hid])
        n = torch.addcmul(g[2 * hid :], rz[:hid], self.b_hn).tanh_()
        h = torch.addcmul(n, rz[hid:], n, value=-1)  # from a zero state: n - z n
        for t in range(1, k):
            g = gi[:, t]
            rz = torch.addmm(g[: 2 * hid], self.w_hh_rz, h).sigmoid_()
            n = torch.addcmul(g[2 * hid :], rz[:hid], torch.addmm(self.b_hn, self.w_hh_n, h)).tanh_()
            h = torch.lerp(n, h, rz[hid:])
        return h.t()


def _run_chunks(fn, n: int, chunk: int, workers: int) -> None:
    """fn(start, stop) over [0, n) in chunks, on ``workers`` threads with single-threaded torch ops.

    Torch releases the GIL inside its kernels, so the threads run in parallel; one intra-op thread
    each avoids OpenMP barriers, which collapse on a loaded shared machine (measured: 2 OpenMP
    threads scored 5x slower than 1 at load 7). Every chunk writes its own output slice, so the
    result does not depend on the scheduling (bit-for-bit repeatable).
    """
    starts = list(range(0, n, chunk))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if workers <= 1 or len(starts) <= 1:
            for s in starts:
                fn(s, min(s + chunk, n))
            return

        def job(i: int) -> None:
            torch.set_num_threads(1)
            with torch.inference_mode():
                for s in starts[i::workers]:
                    fn(s, min(s + chunk, n))

        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(job, i) for i in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def predict_columns(loaded: Loaded, cols: Sequence[np.ndarray], workers: int = 0,
                    chunk: int = SCORE_CHUNK) -> np.ndarray:
    """MLP: fraud probability (float64) from the 15 input columns (``MODEL_INPUTS`` order, any
    numeric dtype, numpy views of the Arrow columns: no [n, 15] copy is ever built)."""
    n = len(cols[0]) if cols else 0
    out = np.empty(n, dtype=np.float64)
    folded = _FoldedMLP(loaded.scorer)
    _run_chunks(lambda s, e: folded(cols, s, e, out), n, chunk, workers or score_workers())
    return out


@torch.inference_mode()
def predict(loaded: Loaded, frame: FeatureFrame, history: CardHistory | None = None,
            batch_size: int = SCORE_BATCH, workers: int = 0) -> np.ndarray:
    """Fraud probability of every row (float64), in chunks on worker threads, on CPU."""
    if loaded.config.kind != "seq":
        return predict_columns(loaded, [frame.x[:, j] for j in range(frame.x.shape[1])], workers)
    if history is None:
        raise ValueError(f"model {loaded.version} is a sequence model: it needs the card history")
    out = np.empty(len(frame), dtype=np.float64)
    scorer = loaded.scorer
    folded = _FoldedSequence(scorer)
    x = torch.from_numpy(frame.x)
    gap_all = torch.from_numpy(history.gap_days)
    source = torch.from_numpy(history.source)
    # just the rows some scored row looks back at, gathered from the rows as read a chunk at a time
    pool_rows = torch.from_numpy(history.pool_rows) if history.pool_rows is not None else None
    pool_size = len(pool_rows) if pool_rows is not None else len(source)
    prev_all = torch.from_numpy(history.prev)
    projected = torch.empty(max(pool_size, 1), folded.raw_w.shape[1])
    projected[0] = 0  # what a frame with no previous row at all gathers (a missing one, -1, gathers row 0
    #                   before its presence of 0 masks it)

    def project(s: int, e: int) -> None:  # once per pool row, not once per use
        raw = source[s:e] if pool_rows is None else gather_inputs(source, pool_rows[s:e])
        projected[s:e] = folded.project(raw.t())

    terminal_all = torch.from_numpy(history.terminal) if history.terminal is not None else None
    if scorer.model.terminal_len and terminal_all is None:
        raise ValueError(f"model {loaded.version} reads its terminal's last {scorer.model.terminal_len} matured "
                         "rows: the history has none (jobs.torch.data.read_for_model builds them)")

    def score(s: int, e: int) -> None:
        prev = prev_all[s:e]
        steps = folded.steps(projected, prev, gap_all[s:e])
        terminal = terminal_all[s:e] if terminal_all is not None else None
        state = folded.last_state(steps)
        for a in range(s, e, HEAD_CHUNK):
            b = min(a + HEAD_CHUNK, e)
            part = terminal[a - s : b - s] if terminal is not None else None
            out[a:b] = torch.sigmoid(folded.head(x[a:b].t(), state[a - s : b - s], part)).numpy()

    workers = workers or score_workers()
    _run_chunks(project, pool_size, SEQ_CHUNK, workers)
    _run_chunks(score, len(frame), SEQ_CHUNK, workers)
    return out


DEVICE_BATCH = 1 << 18  # rows per step on an accelerator: large enough that kernel launches do not count


@torch.inference_mode()
def predict_on(device: torch.device | str, loaded: Loaded, frame: FeatureFrame, history: CardHistory | None = None,
               batch_size: int = DEVICE_BATCH) -> np.ndarray:
    """Fraud probability of every row (float64), with the scorer module itself on ``device`` (a GPU).

    float32 throughout, as on CPU, so the scores agree with :func:`predict` within float32 rounding.
    The inputs go to the device once per batch; for the sequence model the history pool is copied and
    scaled once, and each batch gathers its rows there. The loaded model is left on CPU.
    """
    device = torch.device(device)
    if loaded.config.kind == "seq" and history is None:
        raise ValueError(f"model {loaded.version} is a sequence model: it needs the card history")
    scorer = copy.deepcopy(loaded.scorer).to(device).eval()
    n = len(frame)
    out = torch.empty(n, dtype=torch.float32, device=device)
    x = torch.from_numpy(frame.x)
    if loaded.config.kind == "seq":
        pool = torch.from_numpy(history.pool).to(device)
        pool = torch.cat([scorer.transform(pool[s : s + batch_size]) for s in range(0, len(pool), batch_size)]) \
            if len(pool) else pool.new_empty((0, N_DERIVED))
        prev_all = torch.from_numpy(history.prev).to(device)
        gap_all = torch.from_numpy(history.gap_days).to(device)
        terminal_all = torch.from_numpy(history.terminal).to(device) if history.terminal is not None else None
    for s in range(0, n, batch_size):
        e = min(s + batch_size, n)
        xb = x[s:e].to(device, non_blocking=True)
        if loaded.config.kind != "seq":
            out[s:e] = scorer(xb)
            continue
        prev = prev_all[s:e]
        terminal = terminal_all[s:e] if terminal_all is not None else None
        logits = scorer.model(scorer.transform(xb), gather_rows(pool, prev), gap_all[s:e], (prev >= 0).float(), terminal)
        out[s:e] = torch.sigmoid(logits)
    return out.double().cpu().numpy()
