"""Embedding -> dropout -> LSTM/GRU/Elman RNN -> dropout -> linear decoder -> log_softmax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, UserError
from ..runtime import cpu_has_fast_bf16
from . import LanguageModel, register

State = Optional[object]  # tensor (GRU/RNN), (h, c) tuple (LSTM), or None (zeros)
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CLASSIC_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}
# oneDNN's bf16 RNN kernels need AVX512-BF16/AMX: elsewhere a bf16 recurrence is an error, so under bf16 autocast
# the recurrence runs in fp32 there (the embedding and the decoder, most of the work, stay bf16).
CPU_RNN_FP32 = not cpu_has_fast_bf16()


@dataclass
class RNNConfig(ModelConfig):
    """lstm | gru | rnn_tanh | rnn_relu: the shared keys of ModelConfig, nothing else yet."""

    def validate(self) -> None:
        super().validate()
        if self.tied and self.emsize != self.nhid:
            raise UserError(f"model.tied=true needs model.emsize == model.nhid (got {self.emsize} and {self.nhid}): "
                            f"set model.nhid={self.emsize} or model.tied=false")


@register("lstm", "gru", "rnn_tanh", "rnn_relu", config=RNNConfig)
class RNNModel(LanguageModel):
    def __init__(self, cfg: RNNConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.Embedding(vocab_size, cfg.emsize)
        # nn.LSTM's inter-layer dropout matches the classic example.
        inter = cfg.dropout if cfg.nlayers > 1 else 0.0
        if cfg.name == "lstm":
            self.rnn = nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=inter)
        elif cfg.name == "gru":
            self.rnn = nn.GRU(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=inter)
        else:
            act = cfg.name.split("_")[1]  # rnn_tanh -> tanh
            self.rnn = nn.RNN(cfg.emsize, cfg.nhid, cfg.nlayers, nonlinearity=act, dropout=inter)
        self.decoder = nn.Linear(cfg.nhid, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight

    def init_state(self, batch_size: int, device=None) -> State:
        """Zeros (what ``None`` means to nn.RNN), as tensors: a compiled step then sees one input type."""
        z = torch.zeros(self.cfg.nlayers, batch_size, self.cfg.nhid, device=device)
        return (z, z.clone()) if self.cfg.name == "lstm" else z

    def forward(self, tokens: torch.Tensor, state: State = None, aux: bool = False):
        emb = self.drop(self.encoder(tokens))  # (T, B, E)
        if CPU_RNN_FP32 and tokens.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                raw, state = self.rnn(emb.float(), state)  # (T, B, H)
        else:
            raw, state = self.rnn(emb, state)  # (T, B, H)
        out = self.drop(raw)
        logits = self.decoder(out)  # (T, B, V)
        # The carried state stays fp32 whatever autocast computed it in.
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
        logp = F.log_softmax(logits.float(), dim=-1)
        if aux:
            return logp, state, {"hidden": out, "raw_hidden": raw}
        return logp, state

    @classmethod
    def flops_per_token(cls, cfg: RNNConfig, vocab_size: int, bptt: int) -> float:
        fwd = 0.0
        for layer in range(cfg.nlayers):
            fan_in = cfg.emsize if layer == 0 else cfg.nhid
            fwd += 2 * GATES[cfg.name] * cfg.nhid * (fan_in + cfg.nhid)
        return fwd + 2 * cfg.nhid * vocab_size

    @classmethod
    def classic_args(cls, cfg: RNNConfig) -> List[str]:
        args = ["--model", CLASSIC_NAMES[cfg.name], "--emsize", str(cfg.emsize), "--nhid", str(cfg.nhid),
                "--nlayers", str(cfg.nlayers), "--dropout", str(cfg.dropout)]
        return args + (["--tied"] if cfg.tied else [])
