"""Scoring a token stream: the token-weighted mean negative log-likelihood, and perplexity."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import runtime
from .data import get_window
from .distributed import Dist


def ppl(loss: float) -> float:
    """Perplexity; NaN stays NaN, a huge loss gives inf instead of an OverflowError."""
    return math.exp(loss) if not loss >= 700 else float("inf")


@torch.no_grad()
def nll(model: torch.nn.Module, data: torch.Tensor, bptt: int, device: torch.device, precision: str = "fp32",
        dist: Optional[Dist] = None, progress_desc: Optional[str] = None) -> float:
    """Token-weighted mean negative log-likelihood of ``data`` (T, B) under ``model``, in eval mode,
    carrying the state across windows of ``bptt`` tokens (reduced across ranks under DDP)."""
    from .tracking import progress

    dist = dist or Dist()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    starts = range(0, data.size(0) - 1, bptt)
    for i in progress(starts, total=len(starts), desc=progress_desc or "", enabled=progress_desc is not None):
        x, y = get_window(data, i, bptt)
        with runtime.autocast(device, precision):
            logp, state = model(x, state)
        total += F.nll_loss(logp.reshape(-1, logp.size(-1)).float(), y.reshape(-1), reduction="sum").double()
        count += y.numel()
    dist.all_sum(total)
    dist.all_sum(count)
    model.train(was_training)
    return float(total.item() / count.item())
