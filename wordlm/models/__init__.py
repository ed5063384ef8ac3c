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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["RNNModel", "TransformerModel", "build_model", "count_params", "detach_state", "map_state"]
