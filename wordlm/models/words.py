"""The vocabulary-sized layers every model type shares: the input embedding and the output softmax, each full or
adaptive.

Adaptive softmax (Grave et al. 2017, "Efficient softmax approximation for GPUs"): the vocabulary, in frequency
order (wordlm's ids are: see ``wordlm.data.vocab``), is cut at ``cutoffs`` into a head (the ``cutoffs[0]`` most
frequent words) and tail clusters. The head scores its words plus one entry per cluster; cluster ``i`` scores its
words from a projection of the features down to ``dim / div_value ** (i + 1)`` dimensions, and a word's
probability is ``p(cluster) * p(word | cluster)``. Training scores each target through the head and, only for the
positions whose target lies in a cluster, through that cluster: the cost follows the head's size, not the
vocabulary's. :meth:`AdaptiveSoftmax.log_prob` assembles the full (..., V) log-probabilities (they sum to 1) for
evaluation, generation and every other user of the model interface.

Adaptive input (Baevski & Auli 2019, "Adaptive input representations for neural language modeling"): the same
bands of the vocabulary, band ``i`` embedded in ``dim / div_value ** i`` dimensions and projected to ``dim``.
With ``model.tied`` both are tied as in the reference code (fairseq's ``tie_adaptive_weights`` and
``tie_adaptive_proj``): the head's word rows are band 0's embedding, each cluster's words are its band's embedding
and each cluster's projection is its band's projection, transposed.

The full layers are the classic ``nn.Embedding`` and ``nn.Linear`` (a :class:`Softmax` is an ``nn.Linear`` with
the two scoring methods), so checkpoints of the full models keep their parameter names.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, UserError


def bands(vocab_size: int, cutoffs: Sequence[int]) -> List[int]:
    """Band edges ``[0, *cutoffs, vocab_size]``."""
    return [0, *cutoffs, vocab_size]


def band_dims(dim: int, n_bands: int, div_value: float) -> List[int]:
    """Width of each band: ``dim / div_value ** i``, at least 1."""
    return [max(1, int(dim // (div_value ** i))) for i in range(n_bands)]


def check_cutoffs(cfg: ModelConfig, vocab_size: int) -> None:
    """The cutoffs must cut this vocabulary (known only once the corpus is read): one line naming the fix."""
    if not any_adaptive(cfg):
        return
    c = list(cfg.cutoffs)
    if c[-1] >= vocab_size:
        smaller = [max(1, vocab_size // 8), max(2, vocab_size // 2)] if vocab_size > 16 else None
        hint = f" (e.g. model.cutoffs=[{smaller[0]},{smaller[1]}])" if smaller else ""
        raise UserError(f"model.cutoffs={c} do not fit a vocabulary of {vocab_size:,} words: every cutoff must be "
                        f"below the vocabulary size{hint}")


def any_adaptive(cfg: ModelConfig) -> bool:
    """Whether the model has an adaptive layer (softmax or input)."""
    return getattr(cfg, "softmax", "full") == "adaptive" or getattr(cfg, "adaptive_input", False)


# Generation feeds one word at a time: a (1, H) row times a (V, H) weight. On a CPU that product reads the whole
# matrix for one row, and oneDNN/MKL read a large row-major ``(V, H)`` one far slower than its transpose ``(H, V)``
# (measured on 2 cores, V = 33,278, H = 200: 2.2 ms against 0.8 ms a word). So a call with at most FEW_ROWS rows,
# without autograd or autocast, multiplies a large weight by a cached contiguous transpose, rebuilt whenever the
# weight changes. Small matrices (a 200-wide transformer layer's) gain nothing from it: they keep F.linear.
FEW_ROWS = 8
TRANSPOSE_MIN, TRANSPOSE_MAX = 1 << 20, 1 << 26  # elements: from 4 MB to 256 MB of fp32 weights


def few_rows(h: torch.Tensor) -> bool:
    """Whether ``h`` (..., in) is a generation-sized input on the CPU that :func:`linear` serves from a transpose."""
    return (h.device.type == "cpu" and h.dtype == torch.float32 and h.numel() <= FEW_ROWS * h.size(-1)
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not (torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()))


def linear(owner: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           key: str = "weight") -> torch.Tensor:
    """``F.linear(h, weight, bias)``; for :func:`few_rows` inputs through a transpose of ``weight`` cached on
    ``owner`` (not a buffer: never saved). The cache is keyed by the weight's storage and version counter, which
    every in-place update (an optimizer step, ``load_state_dict``) bumps, so it never serves stale weights."""
    if not few_rows(h) or not TRANSPOSE_MIN <= weight.numel() <= TRANSPOSE_MAX:
        return F.linear(h, weight, bias)
    cache = owner.__dict__.setdefault("_transposed", {})
    stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, weight.detach().t().contiguous())  # (in, out)
    out = h.reshape(-1, h.size(-1)) @ hit[1]  # (rows, out); mm then add: addmm takes a slower route for one row
    if bias is not None:
        out += bias
    return out.reshape(*h.shape[:-1], weight.size(0))


def target_log_softmax(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       target: torch.Tensor) -> torch.Tensor:
    """(...) log-probability of each ``target`` under ``log_softmax(h W^T + b)``, fp32 whatever autocast computed
    the logits in: what :meth:`Softmax.target_log_prob` computes, as one function of tensors to compile."""
    return F.log_softmax(F.linear(h, weight, bias).float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


class Softmax(nn.Linear):
    """The full softmax: a linear decoder to V logits, then log_softmax (the classic example's)."""

    _compiled = None  # see compile_scoring

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return linear(self, h, self.weight, self.bias)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """(..., V) log-probabilities, in fp32 whatever autocast computed the logits in."""
        return F.log_softmax(self(h).float(), dim=-1)

    def compile_scoring(self, on: bool = True) -> None:
        """Score training targets through ``torch.compile(target_log_softmax, dynamic=True)`` (one compile for
        every window length), or eagerly again. Eager, the cast to fp32, log_softmax, the gather and their
        backward are ten passes over the (T, B, V) logits; compiled, two or three (a 200 -> 13,780 decoder at
        700 positions under bf16 autocast, forward and backward, 2-core Xeon: 30 ms against 62 ms). The trainer
        asks for it where it does not compile the whole step (``LanguageModel.compile_head``). Evaluation and
        generation (no gradient, or eval mode) and a single position stay eager."""
        self.__dict__["_compiled"] = torch.compile(target_log_softmax, dynamic=True) if on else None

    def target_log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(...) log-probability of each ``target``."""
        if self._compiled is not None and self.training and torch.is_grad_enabled() and target.numel() > 1:
            # Flat (N, dim) rows: one graph for every window shape (a size-1 dimension would compile another).
            flat = self._compiled(h.reshape(-1, h.size(-1)), self.weight, self.bias, target.reshape(-1))
            return flat.view(target.shape)
        return self.log_prob(h).gather(-1, target.unsqueeze(-1)).squeeze(-1)


class AdaptiveInput(nn.Module):
    """Baevski & Auli's adaptive input embeddings: band ``i`` of the vocabulary is embedded in
    ``dim / div_value ** i`` dimensions and projected (no bias) to ``dim``. Initialised as the reference code:
    embeddings N(0, width ** -0.5), projections Xavier-uniform."""

    def __init__(self, vocab_size: int, dim: int, cutoffs: Sequence[int], div_value: float):
        super().__init__()
        self.edges = bands(vocab_size, cutoffs)
        self.dim = dim
        widths = band_dims(dim, len(self.edges) - 1, div_value)
        self.embeddings = nn.ModuleList(nn.Embedding(hi - lo, w) for lo, hi, w in
                                        zip(self.edges[:-1], self.edges[1:], widths, strict=True))
        self.projections = nn.ModuleList(nn.Linear(w, dim, bias=False) for w in widths)
        for e in self.embeddings:
            nn.init.normal_(e.weight, 0.0, e.weight.size(1) ** -0.5)
        for p in self.projections:
            nn.init.xavier_uniform_(p.weight)

    def forward(self, tokens: torch.Tensor, word_dropout: float = 0.0) -> torch.Tensor:
        """(..., dim) vectors of ``tokens``. ``word_dropout``: each word (row) of every band is dropped with this
        probability, the rest scaled by 1 / (1 - p) (AWD-LSTM's embedding dropout; training only)."""
        weights = [e.weight for e in self.embeddings]
        if word_dropout > 0 and self.training:
            weights = [w * torch.empty(w.size(0), 1, device=w.device, dtype=w.dtype).bernoulli_(1 - word_dropout)
                       .div_(1 - word_dropout) for w in weights]
        flat = tokens.reshape(-1)
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            # Export graphs: every band for every token, masked (no data-dependent shapes).
            out = 0
            for (lo, hi), w, proj in zip(self._ranges(), weights, self.projections, strict=True):
                inside = (flat >= lo) & (flat < hi)
                vec = proj(F.embedding((flat - lo).clamp(0, hi - lo - 1), w))
                out = out + vec * inside.unsqueeze(-1).to(vec.dtype)
            return out.reshape(*tokens.shape, self.dim)
        parts = []
        for (lo, hi), w, proj in zip(self._ranges(), weights, self.projections, strict=True):
            # A band no token falls in still runs (on zero rows): every parameter is then in the graph, as DDP
            # requires of each step (it would otherwise wait forever for the band's gradients).
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            parts.append((idx, proj(F.embedding(flat.index_select(0, idx) - lo, w))))
        out = parts[0][1].new_zeros(flat.size(0), self.dim)
        for idx, vec in parts:
            out = out.index_copy(0, idx, vec.to(out.dtype))
        return out.reshape(*tokens.shape, self.dim)

    def _ranges(self):
        return list(zip(self.edges[:-1], self.edges[1:], strict=True))


class AdaptiveSoftmax(nn.Module):
    """Grave et al.'s adaptive softmax over features of size ``in_dim`` (no biases, as the reference code).

    Parameters: ``head_words`` (cutoffs[0], in_dim), ``head_clusters`` (clusters, in_dim) and per cluster ``i``
    ``proj[i]`` (in_dim, width) and ``out[i]`` (cluster size, width), width = in_dim / div_value ** (i + 1).
    ``tie`` (an :class:`AdaptiveInput` of the same bands and ``dim == in_dim``) shares its embeddings and
    projections instead of owning them. ``dropout`` is fairseq's ``adaptive_softmax_dropout``, placed where fairseq
    places it: on the softmax's input (the features the head and every cluster read; one mask, in training only),
    and again on each cluster's projected features.
    """

    def __init__(self, in_dim: int, vocab_size: int, cutoffs: Sequence[int], div_value: float,
                 dropout: float = 0.0, tie: Optional[AdaptiveInput] = None, input_dropout: bool = True):
        super().__init__()
        self.edges = bands(vocab_size, cutoffs)
        self.shortlist, self.n_clusters, self.dropout = self.edges[1], len(self.edges) - 2, dropout
        self.input_dropout = dropout if input_dropout else 0.0  # (False: checkpoints from before 2026-12-06)
        widths = band_dims(in_dim, len(self.edges) - 1, div_value)[1:]
        self.head_clusters = nn.Parameter(torch.empty(self.n_clusters, in_dim))
        nn.init.xavier_uniform_(self.head_clusters)
        if tie is not None:
            if tie.dim != in_dim or tie.edges != self.edges:
                raise ValueError("a tied adaptive input must have the softmax's bands and width")
            self.head_words = tie.embeddings[0].weight
            self.proj = nn.ParameterList(p.weight for p in tie.projections[1:])  # (in_dim, width): shared
            self.out = nn.ParameterList(e.weight for e in tie.embeddings[1:])
            return
        self.head_words = nn.Parameter(torch.empty(self.shortlist, in_dim))
        self.proj = nn.ParameterList(nn.Parameter(torch.empty(in_dim, w)) for w in widths)
        self.out = nn.ParameterList(nn.Parameter(torch.empty(hi - lo, w)) for lo, hi, w in
                                    zip(self.edges[1:-1], self.edges[2:], widths, strict=True))
        # Xavier-uniform, as the reference code's linears (fan-in and fan-out of the layer each matrix is).
        nn.init.xavier_uniform_(self.head_words)
        for p in self.proj:
            nn.init.xavier_uniform_(p)
        for p in self.out:
            nn.init.xavier_uniform_(p)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if few_rows(h):  # generation: the two parts' logits from cached transposes, no concatenated copy per word
            logits = torch.cat([linear(self, h, self.head_words, key="head_words"),
                                linear(self, h, self.head_clusters, key="head_clusters")], dim=-1)
        else:
            logits = F.linear(h, torch.cat([self.head_words, self.head_clusters]))
        return F.log_softmax(logits.float(), dim=-1)

    def _tail(self, h: torch.Tensor, i: int) -> torch.Tensor:
        z = F.dropout(h @ self.proj[i], self.dropout, self.training)
        return F.log_softmax(linear(self, z, self.out[i], key=f"out.{i}").float(), dim=-1)

    def log_prob(self, h: torch.Tensor) -> torch.Tensor:
        """(..., V) log-probabilities over the whole vocabulary (every cluster computed for every position)."""
        h = F.dropout(h, self.input_dropout, self.training) if self.input_dropout else h
        head = self._head(h)
        parts = [head[..., : self.shortlist]]
        for i in range(self.n_clusters):
            c = self.shortlist + i
            parts.append(head[..., c : c + 1] + self._tail(h, i))
        return torch.cat(parts, dim=-1)

    def target_log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(...) log-probability of each ``target``: the head for every position, a cluster only for the positions
        whose target lies in it."""
        shape = target.shape
        if self.input_dropout:
            h = F.dropout(h, self.input_dropout, self.training)
        flat_h, flat_t = h.reshape(-1, h.size(-1)), target.reshape(-1)
        head = self._head(flat_h)
        edges = torch.tensor(self.edges[1:-1], device=flat_t.device, dtype=flat_t.dtype)
        cluster = torch.bucketize(flat_t, edges, right=True)  # 0: the head, i + 1: cluster i
        col = torch.where(cluster == 0, flat_t, self.shortlist + cluster - 1)
        out = head.gather(1, col.unsqueeze(1)).squeeze(1)
        for i in range(self.n_clusters):
            # A cluster no target falls in still runs, on zero rows: its parameters stay in the graph (DDP).
            idx = (cluster == i + 1).nonzero().squeeze(1)
            tail = self._tail(flat_h.index_select(0, idx), i)
            word = flat_t.index_select(0, idx) - self.edges[i + 1]
            out = out.index_add(0, idx, tail.gather(1, word.unsqueeze(1)).squeeze(1))
        return out.reshape(shape)


def make_input(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """``nn.Embedding(V, emsize)``, or an :class:`AdaptiveInput` with ``model.adaptive_input``."""
    if cfg.adaptive_input:
        return AdaptiveInput(vocab_size, cfg.emsize, cfg.cutoffs, cfg.div_value)
    return nn.Embedding(vocab_size, cfg.emsize)


def make_output(cfg: ModelConfig, in_dim: int, vocab_size: int, encoder: nn.Module, bias: bool = True) -> nn.Module:
    """The decoder: a :class:`Softmax` (full) or an :class:`AdaptiveSoftmax`, tied to ``encoder`` with
    ``model.tied`` (the full one by sharing the weight matrix, which the model does after its own init)."""
    if cfg.softmax == "adaptive":
        tie = encoder if cfg.tied else None
        return AdaptiveSoftmax(in_dim, vocab_size, cfg.cutoffs, cfg.div_value, cfg.adaptive_dropout, tie=tie,
                               input_dropout=cfg.adaptive_dropout_input)
    return Softmax(in_dim, vocab_size, bias=bias)


def embed(encoder: nn.Module, tokens: torch.Tensor, word_dropout: float, training: bool) -> torch.Tensor:
    """Look ``tokens`` up with whole words dropped with probability ``word_dropout`` in training (AWD-LSTM's
    embedding dropout), for either input layer."""
    if isinstance(encoder, AdaptiveInput):
        return encoder(tokens, word_dropout if training else 0.0)
    return embedding_dropout(encoder, tokens, word_dropout, training)


def embedding_dropout(embed: nn.Embedding, tokens: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Look ``tokens`` up in ``embed`` with whole rows (words) dropped with probability ``p``, the rest / (1 - p):
    every occurrence of a dropped word in the batch reads zeros."""
    w = embed.weight
    if training and p > 0:
        mask = torch.empty(w.size(0), 1, device=w.device, dtype=w.dtype).bernoulli_(1 - p).div_(1 - p)
        w = w * mask
    return F.embedding(tokens, w)


def output_flops(cfg: ModelConfig, in_dim: int, vocab_size: int) -> float:
    """Forward matmul FLOPs per token of the decoder. For the adaptive softmax the clusters count by the share of
    tokens they score, estimated by Zipf's law (the words of ranks lo..hi take about ln(hi/lo) / ln(V) of a text)."""
    if cfg.softmax != "adaptive":
        return 2.0 * in_dim * vocab_size
    edges = bands(vocab_size, cfg.cutoffs)
    widths = band_dims(in_dim, len(edges) - 1, cfg.div_value)[1:]
    flops = 2.0 * in_dim * (edges[1] + len(edges) - 2)
    for lo, hi, w in zip(edges[1:-1], edges[2:], widths, strict=True):
        share = math.log(hi / lo) / math.log(vocab_size)
        flops += share * 2.0 * w * (in_dim + hi - lo)
    return flops


def input_flops(cfg: ModelConfig, vocab_size: int) -> float:
    """Forward matmul FLOPs per token of the input projections of adaptive input (an embedding is a lookup)."""
    if not cfg.adaptive_input:
        return 0.0
    edges = bands(vocab_size, cfg.cutoffs)
    widths = band_dims(cfg.emsize, len(edges) - 1, cfg.div_value)
    share = [math.log(max(hi, 2) / max(lo, 1)) / math.log(vocab_size) for lo, hi in zip(edges[:-1], edges[1:],
                                                                                         strict=True)]
    return sum(s * 2.0 * w * cfg.emsize for s, w in zip(share, widths, strict=True))
