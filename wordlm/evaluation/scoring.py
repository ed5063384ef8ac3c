"""Scoring a token stream: the token-weighted mean negative log-likelihood, and perplexity."""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch

from .. import runtime
from ..data import get_window
from ..distributed import Dist
from ..models import target_log_probs
from ..tracking import progress


def ppl(loss: float) -> float:
    """Perplexity; NaN stays NaN, a huge loss gives inf instead of an OverflowError."""
    return math.exp(loss) if not loss >= 700 else float("inf")


def eval_context(model: torch.nn.Module, value: Optional[int], bptt: int) -> int:
    """Tokens of context each evaluation window of a stateless model (the transformer) carries before the tokens
    it scores: ``value``, or half the window (``bptt // 2``) when null; 0 for models that carry a state."""
    if model.init_state(1) is not None:
        return 0
    n = bptt // 2 if value is None else int(value)
    if not 0 <= n < bptt:
        raise ValueError(f"eval_context={n} must be in [0, bptt={bptt})")
    return n


def windows(n: int, segment: int, bptt: int, context: int, stateless: bool) -> Iterator[Tuple[int, int, int]]:
    """The pieces a stream of ``n`` targets is scored in by the cache and dynamic evaluation, as ``(lo, i, j)``:
    feed positions ``lo .. j - 1``, score the targets of ``i .. j - 1``.

    A model with a state (``stateless`` false) reads segments of ``segment`` tokens and carries its state
    (``lo == i``). A stateless one (the transformer) reads the static evaluation's windows (:func:`nll`: ``bptt``
    tokens, the first ``context`` of them history), each cut into segments of ``segment`` scored tokens, and each
    segment is fed from its window's start: every token sees exactly the history the static evaluation gives it,
    so with the methods switched off the score equals the static one."""
    if not stateless:
        for i in range(0, n, segment):
            yield i, i, min(i + segment, n)
        return
    stride = bptt - context
    for w in range(0, n, stride):
        lo, end = max(0, w - context), min(w + stride, n)
        for i in range(w, end, segment):
            yield lo, i, min(i + segment, end)


def _summed(target_logp: torch.Tensor) -> torch.Tensor:
    """The float64 sum of the scored targets' log-probs (one function, so a test can see what is scored)."""
    return target_logp.double().sum()


@torch.no_grad()
def nll(model: torch.nn.Module, data: torch.Tensor, bptt: int, device: torch.device, precision: str = "fp32",
        dist: Optional[Dist] = None, progress_desc: Optional[str] = None, context: int = 0) -> float:
    """Token-weighted mean negative log-likelihood of ``data`` (T, B) under ``model``, in eval mode (reduced across
    ranks under DDP). Windows of ``bptt`` tokens; a model with a state carries it across them. ``context`` (a
    stateless model's, see :func:`eval_context`): each window is still ``bptt`` tokens long, but its first
    ``context`` tokens only give history (the previous window's last ones) and the other ``bptt - context`` are
    scored, so every token is scored exactly once, with at least ``context`` tokens before it (but at the start).
    ``context=0`` is the plain, non-overlapping evaluation."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    stride = bptt - context  # tokens scored per window
    starts = range(0, data.size(0) - 1, stride)
    for i in progress(starts, total=len(starts), desc=progress_desc or "", enabled=progress_desc is not None):
        lo = max(0, i - context)
        x, y = get_window(data, lo, i - lo + stride)
        with runtime.autocast(device, precision):
            logp, state = target_log_probs(model, x, state, y)  # (T, B): each target's log-prob
        scored = logp[i - lo:]  # the scored positions
        total -= _summed(scored)
        count += scored.numel()
    dist.all_sum(total)
    dist.all_sum(count)
    model.train(was_training)
    return float(total.item() / count.item())
