"""Decoder-only transformer: nn.TransformerEncoder run with a causal mask."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, UserError
from .base import LanguageModel, register
from .words import (
    AdaptiveInput,
    Softmax,
    any_adaptive,
    embed,
    input_flops,
    linear,
    make_input,
    make_output,
    output_flops,
)


@dataclass
class TransformerConfig(ModelConfig):
    name: str = "transformer"
    nhead: int = 2  # attention heads; must divide emsize
    norm_first: bool = False  # pre-norm: LayerNorm before attention and FFN, one more after the last layer
    activation: str = "relu"  # feed-forward activation: relu | gelu
    positions: str = "sinusoidal"  # sinusoidal (any length) | learned (one vector per position, up to max_len)
    max_len: int = 512  # learned positions: the longest window (training bptt, generation context, evaluation)
    init: str = "classic"  # classic: embeddings/decoder uniform +-0.1, PyTorch's defaults inside the layers |
    #                        xavier: the same, and every matrix inside the layers Xavier-uniform (nn.Transformer's,
    #                        the classic example since 2023) |
    #                        scaled: N(0, 0.02) everywhere, residual projections / sqrt(2 * nlayers) (GPT-2)
    attn_dropout: Optional[float] = None  # dropout on the attention weights; null = model.dropout
    resid_dropout: Optional[float] = None  # dropout on each sublayer's output before its residual add (and on the
    #                                        embeddings unless emb_dropout is set); null = model.dropout
    emb_dropout: Optional[float] = None  # dropout on the embeddings + positions; null = resid_dropout's value
    ffn_dropout: Optional[float] = None  # dropout inside the feed-forward (after its activation); null = model.dropout
    final_norm: Optional[bool] = None  # a LayerNorm after the last layer; null = norm_first (pre-norm has one)
    bias: bool = True  # biases in every linear layer and LayerNorm
    dropoute: float = 0.0  # embedding (word) dropout: probability of dropping a whole word's embedding row

    # Checkpoints written before these keys existed were the classic example's model.
    LEGACY: ClassVar[Dict[str, Any]] = {**ModelConfig.LEGACY, "norm_first": False, "activation": "relu",
                                        "positions": "sinusoidal", "max_len": 512, "init": "classic",
                                        "attn_dropout": None, "resid_dropout": None, "bias": True,
                                        "dropoute": 0.0, "emb_dropout": None, "ffn_dropout": None,
                                        "final_norm": None}

    def p(self, key: str) -> float:
        v = getattr(self, key)
        if v is None and key == "emb_dropout":
            return self.p("resid_dropout")
        return self.dropout if v is None else v

    @property
    def has_final_norm(self) -> bool:
        return self.norm_first if self.final_norm is None else self.final_norm

    def effective(self) -> Dict[str, Any]:
        out = {**super().effective(), **{k: self.p(k) for k in ("attn_dropout", "resid_dropout", "emb_dropout",
                                                                "ffn_dropout")}, "final_norm": self.has_final_norm}
        if self.positions != "learned":
            del out["max_len"]
        return out

    def validate(self) -> None:
        super().validate()
        if self.nhead < 1:
            raise UserError(f"model.nhead={self.nhead} is impossible: it must be >= 1")
        if self.emsize % self.nhead:
            raise UserError(f"model.nhead={self.nhead} does not divide model.emsize={self.emsize}: "
                            f"pick nhead that divides emsize")
        choices = {"activation": ("relu", "gelu"), "positions": ("sinusoidal", "learned"),
                   "init": ("classic", "xavier", "scaled")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key}={getattr(self, key)!r}: use {'|'.join(allowed)}")
        if self.max_len < 1:
            raise UserError(f"model.max_len={self.max_len} is impossible: it must be >= 1")
        for k in ("attn_dropout", "resid_dropout", "emb_dropout", "ffn_dropout"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v < 1.0:
                raise UserError(f"model.{k}={v} must be in [0, 1) or null")
        if not 0.0 <= self.dropoute < 1.0:
            raise UserError(f"model.dropoute={self.dropoute} must be in [0, 1)")

    @property
    def longest(self) -> Optional[int]:
        """The longest window this model can read (learned positions), None for any."""
        return self.max_len if self.positions == "learned" else None


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
    incremental = True  # decode(): one token at a time through the same weights, with a key/value cache
    scores_targets = True
    stateless = True

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.scale = math.sqrt(cfg.emsize)
        self.encoder = make_input(cfg, vocab_size)
        self.drop = nn.Dropout(cfg.p("emb_dropout"))
        layer = nn.TransformerEncoderLayer(cfg.emsize, cfg.nhead, cfg.nhid, cfg.p("ffn_dropout"),
                                           activation=cfg.activation, norm_first=cfg.norm_first, bias=cfg.bias)
        # The layer's own dropouts: attention weights, each sublayer's output (before the residual add); the one
        # inside the feed-forward (its `dropout`) is ffn_dropout.
        layer.self_attn.dropout = cfg.p("attn_dropout")
        layer.dropout1, layer.dropout2 = nn.Dropout(cfg.p("resid_dropout")), nn.Dropout(cfg.p("resid_dropout"))
        final = nn.LayerNorm(cfg.emsize, bias=cfg.bias) if cfg.has_final_norm else None  # after the last layer
        self.layers = nn.TransformerEncoder(layer, cfg.nlayers, norm=final, enable_nested_tensor=False)
        self.pos = nn.Embedding(cfg.max_len, cfg.emsize) if cfg.positions == "learned" else None
        self.decoder = make_output(cfg, cfg.emsize, vocab_size, self.encoder, bias=cfg.bias)
        self._pe = torch.empty(0)  # cache of sinusoids, not a buffer: not saved in checkpoints
        if cfg.init == "scaled":
            self._scaled_init()
        else:  # the adaptive layers keep their own init (wordlm.models.words)
            if cfg.init == "xavier":  # nn.Transformer's own init of its layers (it runs before the embeddings exist)
                for p in self.layers.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
            if not isinstance(self.encoder, AdaptiveInput):
                nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
            if isinstance(self.decoder, Softmax):
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
                if self.decoder.bias is not None:
                    nn.init.zeros_(self.decoder.bias)
            if self.pos is not None:
                nn.init.uniform_(self.pos.weight, -0.1, 0.1)
        if cfg.tied and isinstance(self.decoder, Softmax):
            self.decoder.weight = self.encoder.weight

    def _scaled_init(self) -> None:
        """GPT-2's: every weight N(0, 0.02), biases 0, and the two projections that end on the residual stream
        (attention's output, the feed-forward's second linear) N(0, 0.02 / sqrt(2 * nlayers)), so the stream's
        variance does not grow with depth."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)  # (LayerNorm weights stay 1)
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.nlayers) if name.endswith(("out_proj.weight", "linear2.weight")) \
                else 0.02
            nn.init.normal_(p, 0.0, std)

    def positions(self, length: int, device, start: int = 0) -> torch.Tensor:
        """(length, 1, emsize) position vectors of positions start .. start + length - 1."""
        if self.pos is not None:
            end = start + length
            if end > self.cfg.max_len:
                raise ValueError(f"a window of {end} tokens is longer than model.max_len={self.cfg.max_len} "
                                 f"(learned positions)")
            return self.pos(torch.arange(start, end, device=device)).unsqueeze(1)
        if torch.compiler.is_exporting():
            # torch.export (wordlm.export's ONNX graph): the length is symbolic, and a cached table would become a
            # constant of the traced length in the graph; compute the positions of this length instead.
            return sinusoids(start + length, self.cfg.emsize, device)[start:]
        if self._pe.size(0) < start + length or self._pe.device != torch.device(device):
            self._pe = sinusoids(max(start + length, 64), self.cfg.emsize, device)
        return self._pe[start:start + length]

    def init_state(self, batch_size: int, device=None) -> None:
        return None  # attention has no carried state

    def _embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        emb = embed(self.encoder, tokens, self.cfg.dropoute, self.training)  # (T, B, E)
        return self.drop(emb * self.scale + self.positions(tokens.size(0), tokens.device, start))

    def forward(self, tokens: torch.Tensor, state=None, aux: bool = False, targets: Optional[torch.Tensor] = None):
        T = tokens.size(0)
        x = self._embed(tokens)  # (T, B, E)
        # is_causal=True lets scaled_dot_product_attention use its causal kernels; the mask is the
        # same constraint spelt out for code paths that need one: position t sees only <= t.
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device, dtype=x.dtype)
        h = self.layers(x, mask=mask, is_causal=True)  # (T, B, E)
        # (T, B, V), or (T, B): the log-prob of each target
        logp = self.decoder.log_prob(h) if targets is None else self.decoder.target_log_prob(h, targets)
        if aux:
            return logp, None, {"hidden": h, "raw_hidden": h}
        return logp, None

    # ------------------------------------------------------------------ incremental decoding
    def init_cache(self) -> Dict[str, Any]:
        """An empty key/value cache for :meth:`decode`: per layer (B, heads, T, head size) keys and values."""
        return {"k": [None] * self.cfg.nlayers, "v": [None] * self.cfg.nlayers, "len": 0}

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: Dict[str, Any]) -> torch.Tensor:
        """Log-probs (t, B, V) of ``tokens`` (t, B) placed after the ``cache["len"]`` tokens the cache holds, which
        it then holds too. The same weights and arithmetic as :meth:`forward` (eval mode): fed a sequence in any
        pieces, the log-probs equal one causal forward over the whole of it (tests/test_transformer.py)."""
        past = cache["len"]
        x = self._embed(tokens, start=past)
        for i, layer in enumerate(self.layers.layers):
            if layer.norm_first:
                x = x + self._attend(layer, layer.norm1(x), cache, i)
                x = x + self._feed_forward(layer, layer.norm2(x))
            else:
                x = layer.norm1(x + self._attend(layer, x, cache, i))
                x = layer.norm2(x + self._feed_forward(layer, x))
        if self.layers.norm is not None:
            x = self.layers.norm(x)
        cache["len"] = past + tokens.size(0)
        return self.decoder.log_prob(x)

    @staticmethod
    def _feed_forward(layer: nn.TransformerEncoderLayer, h: torch.Tensor) -> torch.Tensor:
        # wordlm.models.words.linear: a generation-sized input multiplies a large weight's cached transpose
        z = layer.activation(linear(layer, h, layer.linear1.weight, layer.linear1.bias, key="linear1"))
        return linear(layer, z, layer.linear2.weight, layer.linear2.bias, key="linear2")

    def _attend(self, layer: nn.TransformerEncoderLayer, h: torch.Tensor, cache: Dict[str, Any], i: int):
        """Self-attention of the new positions ``h`` (t, B, E) over the cached ones and themselves (causal)."""
        mha = layer.self_attn
        t, B, E = h.shape
        H = mha.num_heads
        q, k, v = linear(layer, h, mha.in_proj_weight, mha.in_proj_bias, key="in_proj").chunk(3, dim=-1)
        q, k, v = (a.reshape(t, B, H, E // H).permute(1, 2, 0, 3) for a in (q, k, v))  # (B, H, t, d)
        if cache["k"][i] is not None:
            k = torch.cat([cache["k"][i], k], dim=2)
            v = torch.cat([cache["v"][i], v], dim=2)
        cache["k"][i], cache["v"][i] = k, v
        past = k.size(2) - t
        if t == 1 and not h.is_cuda:
            # One new position sees everything cached: three small products, not the fused CPU kernel, which
            # costs more to set up than it saves at one query.
            o = torch.softmax(q @ k.transpose(-2, -1) * (q.size(-1) ** -0.5), dim=-1) @ v  # (B, H, 1, d)
        elif t == 1:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            seen = torch.arange(k.size(2), device=h.device) <= past + torch.arange(t, device=h.device).unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
        return linear(layer, o.permute(2, 0, 1, 3).reshape(t, B, E), mha.out_proj.weight, mha.out_proj.bias,
                      key="out_proj")

    @classmethod
    def flops_per_token(cls, cfg: TransformerConfig, vocab_size: int, bptt: int) -> float:
        d, f = cfg.emsize, cfg.nhid
        per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * bptt / 2  # projections, FFN, causal attention
        return cfg.nlayers * per_layer + output_flops(cfg, d, vocab_size) + input_flops(cfg, vocab_size)

    @classmethod
    def compiles_well(cls, cfg: TransformerConfig) -> bool:
        # The adaptive layers pick each cluster's positions (data-dependent shapes): Inductor recompiles for them.
        return not any_adaptive(cfg)

    @classmethod
    def classic_args(cls, cfg: TransformerConfig) -> List[str]:
        args = ["--model", "Transformer", "--emsize", str(cfg.emsize), "--nhid", str(cfg.nhid), "--nlayers",
                str(cfg.nlayers), "--nhead", str(cfg.nhead), "--dropout", str(cfg.dropout)]
        return args + (["--tied"] if cfg.tied else [])
