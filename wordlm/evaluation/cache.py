"""The neural cache (Grave et al. 2017, "Improving neural language models with a continuous cache"), scored as
AWD-LSTM's ``pointer.py`` scores it.

The model's final hidden features of the previous ``window`` tokens are stored, each with the word that
followed it. A position's cache distribution is a softmax over ``theta * <h_t, h_i>`` spread onto those
words, and ``p = lam * p_cache + (1 - lam) * p_model``. Each column of the batch keeps its own cache,
carried across windows; a position only ever sees entries of earlier positions (their next word is
already scored), so nothing leaks from the future.

``warmup``: ``reference`` (the default) scores with the model alone until more than ``window`` tokens precede a
position, as ``pointer.py`` does (``start_idx + idx > window``); ``none`` mixes the cache in from the second
token on. The settings left null are the reference's for the data set (:data:`DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ..config import CACHE_WARMUPS
from ..config import CacheConfig as CacheSettings

# The reference's settings: PTB from its README's pointer command (window 500, theta 1.0, lambda 0.1); WikiText-2
# from pointer.py's defaults and its WT2 command (3785, 0.662, 0.1279), used for every other data set too.
DEFAULTS = {"ptb": {"window": 500, "theta": 1.0, "lam": 0.1},
            "wikitext": {"window": 3785, "theta": 0.6625523432485668, "lam": 0.12785920428335693}}
WARMUPS = CACHE_WARMUPS


def settings(c: CacheSettings, data_name: Optional[str]) -> CacheSettings:
    """``c`` with its null window / theta / lam filled with the reference's values for ``data_name``."""
    d = DEFAULTS["ptb"] if data_name == "ptb" else DEFAULTS["wikitext"]
    return dataclasses.replace(c, **{k: v for k, v in d.items() if getattr(c, k) is None})


class Cache:
    """Per-column memory of (hidden feature, next word) pairs; null settings are WikiText's (:func:`settings`)."""

    def __init__(self, s: CacheSettings):
        self.s = settings(s, None)
        self.h: Optional[torch.Tensor] = None  # (L, B, D)
        self.y: Optional[torch.Tensor] = None  # (L, B)
        self.seen = 0  # positions pushed so far (the global index of the next position)
        self.first = self.s.window + 1 if self.s.warmup == "reference" else 1  # the first position mixed

    def _attention(self, hidden: torch.Tensor, targets: torch.Tensor):
        """(T, B, L') attention of each position over the entries it may see, the entries' words (L', B), and
        which positions are scored by the model alone (T, B)."""
        T = hidden.size(0)
        h = hidden.float()
        mem_h = h if self.h is None else torch.cat([self.h, h], 0)  # (L', B, D): the past, then this window
        mem_y = targets if self.y is None else torch.cat([self.y, targets], 0)
        past = 0 if self.h is None else self.h.size(0)
        L = mem_h.size(0)
        scores = torch.einsum("tbd,lbd->tbl", h, mem_h) * self.s.theta  # (T, B, L')
        pos = past + torch.arange(T, device=h.device).unsqueeze(1)  # (T, 1): index of each position in mem
        idx = torch.arange(L, device=h.device).unsqueeze(0)  # (1, L')
        visible = (idx < pos) & (idx >= pos - self.s.window)  # strictly earlier entries, at most `window` of them
        scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
        glob = self.seen + torch.arange(T, device=h.device)  # (T,): the position's index in the whole stream
        alone = ~visible.any(1) | (glob < self.first)  # (T,)
        attn = torch.softmax(scores.masked_fill(alone.view(T, 1, 1), 0.0), dim=-1)
        attn = attn.masked_fill(alone.view(T, 1, 1), 0.0)
        return attn, mem_y, alone.unsqueeze(1).expand(T, hidden.size(1))

    def target_logp(self, hidden: torch.Tensor, model_logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(T, B) log-probability of each target under the mixture, from the model's (T, B) log-probability of
        it; then the window joins the memory."""
        attn, mem_y, alone = self._attention(hidden, targets)
        hit = (mem_y.t().unsqueeze(0) == targets.unsqueeze(-1)).float()  # (T, B, L'): entry's word is the target
        p_cache = (attn * hit).sum(-1)  # (T, B)
        model = model_logp.float()
        lam = self.s.lam
        if lam <= 0:
            mixed = model
        else:
            mixed = torch.logaddexp(math.log(lam) + torch.log(p_cache), math.log1p(-lam) + model)
        out = torch.where(alone, model, mixed)
        self._push(hidden, targets)
        return out

    def distribution(self, hidden: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(T, B, V) mixed probabilities over the whole vocabulary (what target_logp picks from); no push."""
        attn, mem_y, alone = self._attention(hidden, targets)
        T, B, L = attn.shape
        p_cache = torch.zeros(T, B, logp.size(-1), device=logp.device)
        p_cache.scatter_add_(-1, mem_y.t().unsqueeze(0).expand(T, B, L), attn)
        mixed = self.s.lam * p_cache + (1 - self.s.lam) * logp.float().exp()
        return torch.where(alone.unsqueeze(-1), logp.float().exp(), mixed)

    def _push(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        h = hidden.detach().float()
        self.h = h if self.h is None else torch.cat([self.h, h], 0)[-self.s.window:]
        self.y = targets if self.y is None else torch.cat([self.y, targets], 0)[-self.s.window:]
        self.seen += hidden.size(0)


@torch.no_grad()
def rescore(hidden: torch.Tensor, model_logp: torch.Tensor, targets: torch.Tensor, settings: CacheSettings,
            chunk: int = 512) -> torch.Tensor:
    """(N, B) log-probabilities of a whole stream's targets with the cache, from the model's features and target
    log-probabilities of that stream (:func:`wordlm.evaluation.stream.features`): the same numbers as scoring
    the stream with the cache window by window, without running the model again (how ``tune`` tries settings)."""
    mem = Cache(settings)
    return torch.cat([mem.target_logp(hidden[i:i + chunk], model_logp[i:i + chunk], targets[i:i + chunk])
                      for i in range(0, hidden.size(0), chunk)], 0)


# tune=true: the grid tried first; a setting whose best value lies on the grid's edge is then pushed past it
# (wordlm.evaluation.tuning), so the grid is a start, not a bound.
CACHE_GRID = {"window": [500, 1000, 2000, 3785], "theta": [0.3, 0.662, 1.0], "lam": [0.05, 0.1279, 0.2]}
