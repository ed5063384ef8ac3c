"""Scoring one stream with the methods that adapt to the text they score: the neural cache
(:mod:`wordlm.evaluation.cache`) and dynamic evaluation (:mod:`wordlm.evaluation.dynamic`), for any model.

Both work through the model interface alone (``forward(x, state, aux=True)`` gives ``hidden``), so the
evaluator never asks which model it holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import runtime
from ..config import CacheConfig, DynamicConfig, UserError
from ..data import batchify
from ..models import detach_state, target_log_probs
from . import cache as caching
from . import dynamic as dynamics
from . import tuning
from .cache import CACHE_GRID, Cache  # noqa: F401  (the stream's parts, importable from here)
from .dynamic import DYNAMIC_GRID_DECAY, DYNAMIC_GRID_LR, Dynamic, gradient_stats, rnn_backward_ok  # noqa: F401
from .scoring import windows


def token_nll(model: torch.nn.Module, data: torch.Tensor, segment: int, device: torch.device, precision: str = "fp32",
              cache: Optional[CacheConfig] = None, dynamic: Optional[Dynamic] = None, bptt: Optional[int] = None,
              context: int = 0) -> torch.Tensor:
    """(T - 1, B) negative log-likelihood of every target of ``data`` (T, B), scored in the pieces of
    :func:`~wordlm.evaluation.scoring.windows` (``segment`` tokens each; a stateless model's with the static
    evaluation's history: ``bptt`` and ``context``); with a cache (settings filled: :func:`cache.settings`) and/or
    dynamic evaluation. The model is back to its trained weights afterwards."""
    model.eval()
    mem = Cache(cache) if cache is not None else None
    stateless = getattr(model, "stateless", False)
    out: List[torch.Tensor] = []
    state = None
    try:
        with rnn_backward_ok(device) if dynamic else contextlib.nullcontext():
            for lo, i, j in windows(data.size(0) - 1, segment, bptt or segment, context, stateless):
                y = data[lo + 1:j + 1]
                with torch.enable_grad() if dynamic else torch.no_grad():
                    with runtime.autocast(device, precision):
                        tok, state, aux = target_log_probs(model, data[lo:j], state, y, aux=True)
                    tok = tok.float()[i - lo:]  # (n, B): the scored positions
                    if dynamic:
                        (-tok.mean()).backward()  # the segment is scored (below) before its update touches it
                    with torch.no_grad():
                        scored = mem.target_logp(aux["hidden"][i - lo:].detach(), tok.detach(), y[i - lo:]) \
                            if mem else tok.detach()
                    out.append(-scored.double())
                if dynamic:
                    # NaN, inf, or a segment whose perplexity overflows (a mean NLL over 700 nats): the adapted
                    # weights blew up (a sync per segment, as the segment's backward is one too)
                    if not float(scored.double().mean()) > -700:
                        raise UserError(f"dynamic evaluation diverged at segment {len(out)} (token {i}): the adapted "
                                        f"weights blew up (perplexity over e^700 or NaN); lower dynamic.lr (now "
                                        f"{dynamic.s.lr:g}) or raise dynamic.decay (now {dynamic.s.decay:g})")
                    dynamic.update()
                state = None if stateless else detach_state(state)
    finally:
        if dynamic:
            dynamic.restore()
    return torch.cat(out, 0)


@torch.no_grad()
def features(model: torch.nn.Module, data: torch.Tensor, bptt: int, device: torch.device, precision: str = "fp32",
             context: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The static model's (T - 1, B, D) final hidden features and (T - 1, B) log-probabilities of the targets of
    ``data``, scored as the static evaluation scores them: what the cache mixes, computed once for every cache
    setting tried (:func:`cache.rescore`)."""
    model.eval()
    stateless = getattr(model, "stateless", False)
    hs, toks, state = [], [], None
    for lo, i, j in windows(data.size(0) - 1, bptt - context if stateless else bptt, bptt, context, stateless):
        with runtime.autocast(device, precision):
            tok, state, aux = target_log_probs(model, data[lo:j], state, data[lo + 1:j + 1], aux=True)
        hs.append(aux["hidden"][i - lo:].float())
        toks.append(tok.float()[i - lo:])
        state = None if stateless else detach_state(state)
    return torch.cat(hs, 0), torch.cat(toks, 0)


def evaluate(model, data, segment, device, precision="fp32", cache=None, dynamic=None, bptt=None,
             context=0) -> Dict[str, float]:
    t = time.perf_counter()
    nll = token_nll(model, data, segment, device, precision, cache, dynamic, bptt, context)
    loss = float(nll.mean())
    return {"loss": loss, "seconds": time.perf_counter() - t}


FINAL_EVAL = ("static", "cache", "dynamic", "both")


def tune(model, valid: torch.Tensor, cache: Optional[CacheConfig], dyn: Optional[DynamicConfig], ms, segment: int,
         bptt: int, device: torch.device, precision: str = "fp32", context: int = 0, cache_tuned: bool = False):
    """Grid-search the settings of the cache and/or dynamic evaluation (whichever is not None) on ``valid`` (a
    batchified tuning text): the cache first, on the static model's features (computed once; not with
    ``cache_tuned``: ``cache`` was tuned already); then dynamic evaluation, with the tuned cache when both are on
    (Krause's grid, scaled to the segment). Returns the tuned ``(cache, dyn, settings tried)``."""
    tried = 0
    if cache is not None and not cache_tuned:
        # Every setting is judged with the cache mixed from the second token (warmup none): with the reference's
        # warm-up a larger window would also mean fewer mixed tokens in the tuning text, and lose for that alone.
        hidden, tok = features(model, valid, bptt, device, precision, context)
        best, _, points = tuning.search(
            caching.CACHE_GRID, lambda p: float(-caching.rescore(
                hidden, tok, valid[1:], dataclasses.replace(cache, warmup="none", **p)).double().mean()),
            limits={"window": valid.size(0)})
        cache, tried = dataclasses.replace(cache, **best), tried + len(points)
    if dyn is not None:
        scale = segment / dynamics.REFERENCE["segment"]  # Krause's grid is for 5-token segments
        grid = {"lr": [v * scale for v in DYNAMIC_GRID_LR], "decay": [v * scale for v in DYNAMIC_GRID_DECAY]}
        best, _, points = tuning.search(grid, lambda p: evaluate(
            model, valid, segment, device, precision, cache, Dynamic(model, dataclasses.replace(dyn, **p), ms), bptt,
            context)["loss"])
        dyn, tried = dataclasses.replace(dyn, **best), tried + len(points)
    return cache, dyn, tried


def adapted_scores(model, train_ids: torch.Tensor, ids: torch.Tensor, bptt: int, device: torch.device,
                   methods: str, precision: str = "fp32", data_name: Optional[str] = None,
                   context: int = 0, cache: Optional[CacheConfig] = None,
                   dynamic: Optional[DynamicConfig] = None, tune_ids: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """``trainer.final_eval``: the mean NLL of ``ids`` (one stream) with the cache (``"cache"``), dynamic
    evaluation (``"dynamic"``) or ``"both"`` (each alone, and together), with the settings ``cache`` and
    ``dynamic`` (the run's ``cache.*`` and ``dynamic.*``; None = the defaults: the cache's for ``data_name``,
    dynamic evaluation on segments of 5 tokens, fewer when a window scores fewer); the gradient statistics from
    ``train_ids``. With ``tune_ids`` (a slice of valid), each method's settings are first tuned on it as
    ``wordlm-evaluate tune=true`` tunes them. Keys: ``cache``, ``dynamic``, ``both`` (losses), ``settings`` (what
    each used), ``tried`` (settings tried while tuning) and ``seconds``."""
    t = time.perf_counter()
    data = batchify(ids, 1, device)
    valid = batchify(tune_ids, 1, device) if tune_ids is not None else None
    want = {"cache": ["cache"], "dynamic": ["dynamic"], "both": ["cache", "dynamic", "both"]}[methods]
    cache_cfg = caching.settings(dataclasses.replace(cache or CacheConfig(), enabled=True), data_name)
    dyn_cfg = ms = None
    if set(want) & {"dynamic", "both"}:  # (dynamic.* are not read for the cache alone)
        dynamic = dynamic or DynamicConfig()
        segment = dynamics.segment_for(dynamic.segment, bptt, context)
        dyn_cfg = dynamics.settings(dataclasses.replace(dynamic, enabled=True, segment=segment), bptt)
        ms = gradient_stats(model, train_ids, dyn_cfg.segment, device, precision, bptt=bptt, context=context,
                            max_batches=dyn_cfg.stat_batches)
    out: Dict[str, Any] = {"settings": {}, "tried": 0}
    tuned_cache = None  # ("both" reuses the cache settings tuned for "cache": the same search on the same features)
    for m in want:
        with_cache = cache_cfg if m in ("cache", "both") else None
        with_dyn = dyn_cfg if m in ("dynamic", "both") else None
        segment = with_dyn.segment if with_dyn is not None else (bptt - context if getattr(model, "stateless", False)
                                                                else bptt)
        if valid is not None:
            reuse = with_cache is not None and tuned_cache is not None
            with_cache, with_dyn, tried = tune(model, valid, tuned_cache if reuse else with_cache, with_dyn, ms,
                                               segment, bptt, device, precision, context, cache_tuned=reuse)
            tuned_cache = tuned_cache or with_cache
            out["tried"] += tried
        dyn = Dynamic(model, with_dyn, ms) if with_dyn is not None else None
        out[m] = evaluate(model, data, segment, device, precision, with_cache, dyn, bptt, context)["loss"]
        out["settings"][m] = {k: dataclasses.asdict(v) for k, v in (("cache", with_cache), ("dynamic", with_dyn))
                              if v is not None}
        del dyn  # (its copies of the weights, before the next one makes its own)
    out["seconds"] = time.perf_counter() - t
    return out
