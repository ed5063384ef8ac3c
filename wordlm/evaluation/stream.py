"""Scoring one stream with the methods that adapt to the text they score: the neural cache
(:mod:`wordlm.evaluation.cache`) and dynamic evaluation (:mod:`wordlm.evaluation.dynamic`), for any model.

Both work through the model interface alone (``forward(x, state, aux=True)`` gives ``hidden``), so the
evaluator never asks which model it holds.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Optional

import torch

from .. import runtime
from ..config import CacheConfig, DynamicConfig, UserError
from ..data import batchify, get_window
from ..models import detach_state
from .cache import CACHE_GRID, Cache  # noqa: F401  (the stream's parts, importable from here)
from .dynamic import DYNAMIC_GRID_DECAY, DYNAMIC_GRID_LR, Dynamic, gradient_stats, rnn_backward_ok  # noqa: F401


def token_nll(model: torch.nn.Module, data: torch.Tensor, segment: int, device: torch.device, precision: str = "fp32",
              cache: Optional[CacheConfig] = None, dynamic: Optional[Dynamic] = None) -> torch.Tensor:
    """(T - 1, B) negative log-likelihood of every target of ``data`` (T, B), scored window by window; with a
    cache and/or dynamic evaluation. The model is back to its trained weights afterwards."""
    model.eval()
    mem = Cache(cache) if cache is not None else None
    out: List[torch.Tensor] = []
    state = None
    try:
        with rnn_backward_ok(device) if dynamic else contextlib.nullcontext():
            for i in range(0, data.size(0) - 1, segment):
                x, y = get_window(data, i, segment)
                with torch.enable_grad() if dynamic else torch.no_grad():
                    with runtime.autocast(device, precision):
                        logp, state, aux = model(x, state, aux=True)
                    tok = logp.float().gather(-1, y.unsqueeze(-1)).squeeze(-1)  # (n, B)
                    if dynamic:
                        (-tok.mean()).backward()  # the segment is scored (below) before its update touches it
                    with torch.no_grad():
                        scored = mem.target_logp(aux["hidden"].detach(), logp.detach(), y) if mem else tok.detach()
                    out.append(-scored.double())
                if dynamic:
                    # NaN, inf, or a segment whose perplexity overflows (a mean NLL over 700 nats): the adapted
                    # weights blew up (a sync per segment, as the segment's backward is one too)
                    if not float(scored.double().mean()) > -700:
                        raise UserError(f"dynamic evaluation diverged at segment {len(out)} (token {i}): the adapted "
                                        f"weights blew up (perplexity over e^700 or NaN); lower dynamic.lr (now "
                                        f"{dynamic.s.lr:g}) or raise dynamic.decay (now {dynamic.s.decay:g})")
                    dynamic.update()
                state = detach_state(state)
    finally:
        if dynamic:
            dynamic.restore()
    return torch.cat(out, 0)


def evaluate(model, data, segment, device, precision="fp32", cache=None, dynamic=None) -> Dict[str, float]:
    t = time.perf_counter()
    nll = token_nll(model, data, segment, device, precision, cache, dynamic)
    loss = float(nll.mean())
    return {"loss": loss, "seconds": time.perf_counter() - t}


FINAL_EVAL = ("static", "cache", "dynamic", "both")


def adapted_scores(model, train_ids: torch.Tensor, ids: torch.Tensor, bptt: int, device: torch.device,
                   methods: str, precision: str = "fp32") -> Dict[str, float]:
    """``trainer.final_eval``: the mean NLL of ``ids`` (one stream) with the cache (``"cache"``), dynamic
    evaluation (``"dynamic"``) or ``"both"`` (each alone, and together), at their default settings; the gradient
    statistics from ``train_ids``. Keys: ``cache``, ``dynamic``, ``both``, and ``seconds``."""
    t = time.perf_counter()
    data = batchify(ids, 1, device)
    want = {"cache": ["cache"], "dynamic": ["dynamic"], "both": ["cache", "dynamic", "both"]}[methods]
    dyn_cfg = DynamicConfig(enabled=True)
    segment = dyn_cfg.segment or bptt
    ms = gradient_stats(model, train_ids, segment, device, precision) if set(want) & {"dynamic", "both"} else None
    out: Dict[str, float] = {}
    for m in want:
        cache = CacheConfig(enabled=True) if m in ("cache", "both") else None
        dyn = Dynamic(model, dyn_cfg, ms) if m in ("dynamic", "both") else None
        out[m] = evaluate(model, data, bptt if dyn is None else segment, device, precision, cache, dyn)["loss"]
    out["seconds"] = time.perf_counter() - t
    return out
