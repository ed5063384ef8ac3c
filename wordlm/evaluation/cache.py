"""The neural cache (Grave et al. 2017, "Improving neural language models with a continuous cache").

The model's final hidden features of the previous ``window`` tokens are stored, each with the word that
followed it. A position's cache distribution is a softmax over ``theta * <h_t, h_i>`` spread onto those
words, and ``p = lam * p_cache + (1 - lam) * p_model``. Each column of the batch keeps its own cache,
carried across windows; a position only ever sees entries of earlier positions (their next word is
already scored), so nothing leaks from the future. While the cache is empty (the very first token) the
model's distribution is used alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import CacheConfig as CacheSettings


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


CACHE_GRID = {"theta": [0.3, 0.662, 1.0], "lam": [0.05, 0.1279, 0.2]}
