"""One interface for every model: ``forward(tokens (T, B), state) -> (log_probs (T, B, V), state)``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..config import ModelConfig, validate_model
from .rnn import RNNModel
from .transformer import TransformerModel


def build_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    validate_model(cfg)
    if cfg.name == "transformer":
        return TransformerModel(cfg, vocab_size)
    return RNNModel(cfg, vocab_size)


def detach_state(state: Any) -> Any:
    """Cut the graph between BPTT windows; works for None, a tensor or a tuple of tensors."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(detach_state(s) for s in state)


def map_state(state: Any, fn) -> Any:
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return tuple(map_state(s, fn) for s in state)


def train_flops_per_token(m: ModelConfig, vocab: int, bptt: int) -> float:
    """Model FLOPs of one training token: 3 x the forward matmul FLOPs (forward + 2 for backward)."""
    gates = {"lstm": 4, "gru": 3}.get(m.name, 1)
    if m.name == "transformer":
        d, f = m.emsize, m.nhid
        per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * bptt / 2  # projections, FFN, causal attention
        fwd = m.nlayers * per_layer + 2 * d * vocab
    else:
        fwd = 0.0
        for layer in range(m.nlayers):
            fan_in = m.emsize if layer == 0 else m.nhid
            fwd += 2 * gates * m.nhid * (fan_in + m.nhid)
        fwd += 2 * m.nhid * vocab
    return 3 * fwd


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["RNNModel", "TransformerModel", "build_model", "count_params", "detach_state", "map_state",
           "train_flops_per_token"]
