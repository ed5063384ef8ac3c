"""Evaluation that adapts to the text it scores: the neural cache and dynamic evaluation, for any model.

Neural cache (Grave et al. 2017, "Improving neural language models with a continuous cache"): the
model's final hidden features of the previous ``window`` tokens are stored, each with the word that
followed it. A position's cache distribution is a softmax over ``theta * <h_t, h_i>`` spread onto those
words, and ``p = lam * p_cache + (1 - lam) * p_model``. Each column of the batch keeps its own cache,
carried across windows; a position only ever sees entries of earlier positions (their next word is
already scored), so nothing leaks from the future. While the cache is empty (the very first token) the
model's distribution is used alone.

Dynamic evaluation (Krause et al. 2018, "Dynamic evaluation of neural sequence models", and their
reference code): gradient statistics are gathered once on the training split — ``MS`` = root mean
square gradient per weight over batches of 100 columns, ``decrate = MS / mean_over_tensors(mean(MS))``
clipped at ``1 / decay`` — then the text is scored segment by segment, each segment *first* scored,
*then* used for one update ``theta += decay * decrate * (theta0 - theta) - lr * grad / (MS + eps)``
(``rule=rms``) or ``theta -= lr * grad`` (``rule=sgd``), where ``theta0`` are the trained weights.
The model's weights are restored afterwards; the checkpoint on disk is never touched.

Both work through the model interface alone (``forward(x, state, aux=True)`` gives ``hidden``), so the
evaluator never asks which model it holds.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import runtime
from .config import CacheConfig as CacheSettings
from .config import DynamicConfig as DynamicSettings
from .data import batchify, get_window
from .models import detach_state


class Cache:
    """Per-column memory of (hidden feature, next word) pairs."""

    def __init__(self, settings: CacheSettings):
        self.s = settings
        self.h: Optional[torch.Tensor] = None  # (L, B, D)
        self.y: Optional[torch.Tensor] = None  # (L, B)

    def _attention(self, hidden: torch.Tensor, targets: torch.Tensor):
        """(T, B, L') attention of each position over the entries it may see, the entries' words (L', B), and
        which positions see no entry at all (T, B)."""
        T = hidden.size(0)
        h = hidden.float()
        mem_h = h if self.h is None else torch.cat([self.h, h], 0)  # (L', B, D): the past, then this window
        mem_y = targets if self.y is None else torch.cat([self.y, targets], 0)
        past = 0 if self.h is None else self.h.size(0)
        L = mem_h.size(0)
        scores = torch.einsum("tbd,lbd->tbl", h, mem_h) * self.s.theta  # (T, B, L')
        pos = past + torch.arange(T, device=h.device).unsqueeze(1)  # (T, 1): global index of each position
        idx = torch.arange(L, device=h.device).unsqueeze(0)  # (1, L')
        visible = (idx < pos) & (idx >= pos - self.s.window)  # strictly earlier entries, at most `window` of them
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        empty = ~visible.any(1)  # (T,)
        attn = torch.softmax(scores.masked_fill(empty.view(T, 1, 1), 0.0), dim=-1)
        attn = attn.masked_fill(empty.view(T, 1, 1), 0.0)
        return attn, mem_y, empty.unsqueeze(1).expand(T, hidden.size(1))

    def target_logp(self, hidden: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(T, B) log-probability of each target under the mixture; then the window joins the memory."""
        attn, mem_y, empty = self._attention(hidden, targets)
        hit = (mem_y.t().unsqueeze(0) == targets.unsqueeze(-1)).float()  # (T, B, L'): entry's word is the target
        p_cache = (attn * hit).sum(-1)  # (T, B)
        model = logp.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lam = self.s.lam
        if lam <= 0:
            mixed = model
        else:
            mixed = torch.logaddexp(math.log(lam) + torch.log(p_cache), math.log1p(-lam) + model)
        out = torch.where(empty, model, mixed)
        self._push(hidden, targets)
        return out

    def distribution(self, hidden: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(T, B, V) mixed probabilities over the whole vocabulary (what target_logp picks from); no push."""
        attn, mem_y, empty = self._attention(hidden, targets)
        T, B, L = attn.shape
        p_cache = torch.zeros(T, B, logp.size(-1), device=logp.device)
        p_cache.scatter_add_(-1, mem_y.t().unsqueeze(0).expand(T, B, L), attn)
        mixed = self.s.lam * p_cache + (1 - self.s.lam) * logp.float().exp()
        return torch.where(empty.unsqueeze(-1), logp.float().exp(), mixed)

    def _push(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        h = hidden.detach().float()
        self.h = h if self.h is None else torch.cat([self.h, h], 0)[-self.s.window:]
        self.y = targets if self.y is None else torch.cat([self.y, targets], 0)[-self.s.window:]


class Dynamic:
    """Krause et al.'s dynamic evaluation state: trained weights, gradient statistics, the update rule."""

    def __init__(self, model: torch.nn.Module, settings: DynamicSettings, ms: Dict[str, torch.Tensor]):
        self.model, self.s = model, settings
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {k: p.detach().clone() for k, p in self.params.items()}
        self.ms = ms
        gsum = sum(float(m.mean()) for m in ms.values()) / max(1, len(ms))
        cap = 1 / settings.decay if settings.decay > 0 else float("inf")
        self.decrate = {k: (m / gsum).clamp(max=cap) if gsum > 0 else torch.zeros_like(m) for k, m in ms.items()}

    @torch.no_grad()
    def update(self) -> None:
        s = self.s
        for k, p in self.params.items():
            if p.grad is None:
                continue
            if s.rule == "sgd":
                p.add_(p.grad, alpha=-s.lr)
            else:
                p.add_(s.decay * self.decrate[k] * (self.theta0[k] - p) - s.lr * p.grad / (self.ms[k] + s.eps))
            p.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.theta0[k])
            p.grad = None


def gradient_stats(model: torch.nn.Module, train_ids: torch.Tensor, segment: int, device: torch.device,
                   precision: str, batch_size: int = 100, max_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """MS: root-mean-square gradient of each weight over training batches (eval mode: no dropout)."""
    data = batchify(train_ids, batch_size, device)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sq = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    model.eval()
    state, n = None, 0
    with _rnn_backward_ok(device):
        for i in range(0, data.size(0) - 1, segment):
            if max_batches is not None and n >= max_batches:
                break
            x, y = get_window(data, i, segment)
            model.zero_grad(set_to_none=True)
            with runtime.autocast(device, precision):
                logp, state = model(x, state)
            F.nll_loss(logp.float().reshape(-1, logp.size(-1)), y.reshape(-1)).backward()
            state = detach_state(state)
            for k, p in params.items():
                if p.grad is not None:
                    sq[k] += p.grad.float() ** 2
            n += 1
    model.zero_grad(set_to_none=True)
    return {k: torch.sqrt(v / max(1, n)) for k, v in sq.items()}


def _rnn_backward_ok(device: torch.device):
    # cuDNN's RNN backward refuses eval mode: without it, the native kernels take over (evaluation only).
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def token_nll(model: torch.nn.Module, data: torch.Tensor, segment: int, device: torch.device, precision: str = "fp32",
              cache: Optional[CacheSettings] = None, dynamic: Optional[Dynamic] = None) -> torch.Tensor:
    """(T - 1, B) negative log-likelihood of every target of ``data`` (T, B), scored window by window; with a
    cache and/or dynamic evaluation. The model is back to its trained weights afterwards."""
    model.eval()
    mem = Cache(cache) if cache is not None else None
    out: List[torch.Tensor] = []
    state = None
    try:
        with _rnn_backward_ok(device) if dynamic else contextlib.nullcontext():
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


CACHE_GRID = {"theta": [0.3, 0.662, 1.0], "lam": [0.05, 0.1279, 0.2]}
DYNAMIC_GRID_LR = [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4]  # Krause's grid for 5-token segments,
DYNAMIC_GRID_DECAY = [1e-3, 2e-3, 3e-3, 5e-3]  # scaled by segment / 5 as in the reference code
