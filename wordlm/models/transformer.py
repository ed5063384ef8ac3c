"""Decoder-only transformer: nn.TransformerEncoder run with a causal mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, UserError
from . import LanguageModel, register


@dataclass
class TransformerConfig(ModelConfig):
    name: str = "transformer"
    nhead: int = 2  # attention heads; must divide emsize

    def validate(self) -> None:
        super().validate()
        if self.nhead < 1:
            raise UserError(f"model.nhead={self.nhead} is impossible: it must be >= 1")
        if self.emsize % self.nhead:
            raise UserError(f"model.nhead={self.nhead} does not divide model.emsize={self.emsize}: "
                            f"pick nhead that divides emsize")


def sinusoids(length: int, dim: int, device=None) -> torch.Tensor:
    """(length, 1, dim) sinusoidal positions, computed for any length (no max_len to outgrow)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, 1, dim, device=device)
    pe[:, 0, 0::2] = torch.sin(pos * div)
    pe[:, 0, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


@register("transformer", config=TransformerConfig)
class TransformerModel(LanguageModel):
    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.scale = math.sqrt(cfg.emsize)
        self.encoder = nn.Embedding(vocab_size, cfg.emsize)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.emsize, cfg.nhead, cfg.nhid, cfg.dropout)
        self.layers = nn.TransformerEncoder(layer, cfg.nlayers, enable_nested_tensor=False)
        self.decoder = nn.Linear(cfg.emsize, vocab_size)
        self._pe = torch.empty(0)  # cache of sinusoids, not a buffer: not saved in checkpoints
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight

    def positions(self, length: int, device) -> torch.Tensor:
        if torch.compiler.is_exporting():
            # torch.export (wordlm.export's ONNX graph): the length is symbolic, and a cached table would become a
            # constant of the traced length in the graph; compute the positions of this length instead.
            return sinusoids(length, self.cfg.emsize, device)
        if self._pe.size(0) < length or self._pe.device != torch.device(device):
            self._pe = sinusoids(max(length, 64), self.cfg.emsize, device)
        return self._pe[:length]

    def init_state(self, batch_size: int, device=None) -> None:
        return None  # attention has no carried state

    def forward(self, tokens: torch.Tensor, state=None, aux: bool = False):
        T = tokens.size(0)
        x = self.drop(self.encoder(tokens) * self.scale + self.positions(T, tokens.device))  # (T, B, E)
        # is_causal=True lets scaled_dot_product_attention use its causal kernels; the mask is the
        # same constraint spelt out for code paths that need one: position t sees only <= t.
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=x.dtype)
        h = self.layers(x, mask=mask, is_causal=True)  # (T, B, E)
        logp = F.log_softmax(self.decoder(h).float(), dim=-1)  # (T, B, V)
        if aux:
            return logp, None, {"hidden": h, "raw_hidden": h}
        return logp, None

    @classmethod
    def flops_per_token(cls, cfg: TransformerConfig, vocab_size: int, bptt: int) -> float:
        d, f = cfg.emsize, cfg.nhid
        per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * bptt / 2  # projections, FFN, causal attention
        return cfg.nlayers * per_layer + 2 * d * vocab_size

    @classmethod
    def classic_args(cls, cfg: TransformerConfig) -> List[str]:
        args = ["--model", "Transformer", "--emsize", str(cfg.emsize), "--nhid", str(cfg.nhid), "--nlayers",
                str(cfg.nlayers), "--nhead", str(cfg.nhead), "--dropout", str(cfg.dropout)]
        return args + (["--tied"] if cfg.tied else [])
