"""Embedding -> dropout -> LSTM/GRU/Elman RNN -> dropout -> linear decoder -> log_softmax."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig

State = Optional[object]  # tensor (GRU/RNN), (h, c) tuple (LSTM), or None (zeros)


class RNNModel(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
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

    def forward(self, tokens: torch.Tensor, state: State = None):
        emb = self.drop(self.encoder(tokens))  # (T, B, E)
        out, state = self.rnn(emb, state)  # (T, B, H)
        logits = self.decoder(self.drop(out))  # (T, B, V)
        # The carried state stays fp32 whatever autocast computed it in.
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
        return F.log_softmax(logits.float(), dim=-1), state
