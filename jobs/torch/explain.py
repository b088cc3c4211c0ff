"""Why a card is on the alert list: integrated gradients of its top transaction's score.

For each alerted card the scoring job explains the transaction that put it there (the card's
highest score of the day). The attribution of input *i* is the integrated gradient of the model's
logit along the straight line from a baseline to the transaction's own inputs:

    attr_i = (x_i - b_i) * mean over t in (0, 1] of d logit / d x_i at b + t (x - b)

The baseline ``b`` is the average training transaction (the input transform's training means of
the 15 raw inputs). The method is *complete*: the attributions add up to ``logit(x) - logit(b)``,
so each one says by how much that input moved the score's log-odds away from an average
transaction's, in the model's own units; inputs that do not matter to the model get nothing. For
the sequence model the card's previous transactions and the terminal's matured rows are held as
they are: the attributions explain the day's inputs given that history, and the baseline's logit
includes what the history contributes. Computed at scoring time (a few dozen rows, ``STEPS``
evaluations each) and stored with the alerts (``ALERT_ATTRIBUTIONS`` of the alerts schema).
"""

from __future__ import annotations

import numpy as np
import torch

from jobs.common.schema import MODEL_INPUTS
from jobs.torch.checkpoint import Loaded
from jobs.torch.data import CardHistory

STEPS = 32
METHOD = f"integrated gradients of the logit, baseline the average training transaction, {STEPS} steps"


def integrated_gradients(loaded: Loaded, x: np.ndarray, history: CardHistory | None = None,
                         rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attributions [m, 15] of the raw inputs ``x`` [m, 15], the logits [m] and the baseline logits [m].

    For the sequence model ``history`` is the scored frame's history and ``rows`` the positions of
    the ``m`` rows in it. A few thousand rows: torch's ops run single-threaded here. With intra-op
    threads such small ops wait on the thread pool's barriers, ten times longer while the scores'
    write runs beside them (0.11 s against 0.012 s for 100 alerts on two cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _integrated_gradients(loaded, x, history, rows)
    finally:
        torch.set_num_threads(threads)


def _integrated_gradients(loaded: Loaded, x: np.ndarray, history: CardHistory | None,
                          rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scorer = loaded.scorer
    m = len(x)
    if m == 0:
        empty = np.zeros(0)
        return np.zeros((0, len(MODEL_INPUTS))), empty, empty
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    base = scorer.transform.mean[: len(MODEL_INPUTS)].detach().float().expand_as(xt)
    alphas = (torch.arange(STEPS, dtype=torch.float32) + 0.5) / STEPS  # midpoints of STEPS equal steps
    path = (base + alphas.view(-1, 1, 1) * (xt - base)).reshape(STEPS * m, -1)  # [STEPS * m, 15]
    ends = torch.cat([xt, base])  # the logits at x and at the baseline, for the record

    if loaded.config.kind == "seq":
        if history is None or rows is None:
            raise ValueError(f"model {loaded.version} is a sequence model: it needs the card history")
        prev = torch.from_numpy(history.prev[rows])
        with torch.no_grad():  # just these rows' previous rows, not the whole pool
            scaled = scorer.transform(torch.from_numpy(history.pool_inputs(np.clip(prev.numpy(), 0, None).ravel()))
                                      ).view(m, prev.shape[1], -1)
        gap = torch.from_numpy(history.gap_days[rows])
        terminal = torch.from_numpy(history.terminal[rows]) if history.terminal is not None else None

        present = (prev >= 0).float()

        def logit(inputs: torch.Tensor, repeat: int) -> torch.Tensor:
            def rep(t: torch.Tensor) -> torch.Tensor:
                return t.repeat(repeat, *([1] * (t.dim() - 1)))

            return scorer.model(scorer.transform(inputs), rep(scaled), rep(gap), rep(present),
                                None if terminal is None else rep(terminal)).reshape(-1)
    else:
        def logit(inputs: torch.Tensor, repeat: int) -> torch.Tensor:
            return scorer.model(scorer.transform(inputs)).reshape(-1)

    was_training = scorer.training
    scorer.eval()
    try:
        path.requires_grad_(True)
        out = logit(path, STEPS)
        (grad,) = torch.autograd.grad(out.sum(), path)
        with torch.no_grad():
            both = logit(ends, 2)
    finally:
        scorer.train(was_training)
    mean_grad = grad.view(STEPS, m, -1).mean(dim=0)
    attributions = ((xt - base) * mean_grad).detach().double().numpy()
    return attributions, both[:m].double().numpy(), both[m:].double().numpy()


def attribution_lists(x: np.ndarray, attributions: np.ndarray) -> list[list[dict]]:
    """Per row, every input with its value and attribution, largest effect first."""
    out = []
    for values, attr in zip(x, attributions, strict=True):
        order = np.argsort(-np.abs(attr), kind="stable")
        out.append([{"input": MODEL_INPUTS[j], "value": float(values[j]), "attribution": float(attr[j])}
                    for j in order])
    return out
