"""Embedding -> dropout -> LSTM/GRU/Elman RNN -> dropout -> linear decoder -> log_softmax.

With its defaults this is the classic example's model (one multi-layer ``nn.LSTM``, standard dropout).
The AWD-LSTM regularisers (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models") are
keys of the same config, each off by default:

- ``dropoute``: embedding dropout, whole words (rows of the embedding matrix) dropped, the rest rescaled;
- ``locked``: variational ("locked") dropout, one mask per sequence shared by every time step, on the
  embedding output (``dropouti``), between layers (``dropouth``) and on the last layer's output (``dropout``);
- ``wdrop``: weight drop (DropConnect) on each layer's hidden-to-hidden matrix, a new mask every forward;
- ``last_nhid``: the last layer's size (AWD-LSTM: 400 -> 1150 -> 1150 -> 400, so the decoder can be tied).

Locked dropout, weight drop and per-layer sizes need the layers one by one: then each layer is a
:class:`RNNLayer` that owns its weights and calls the same fused kernel ``nn.LSTM`` calls (``torch.lstm``
and friends) with the dropped matrix. No monkey-patching of ``nn.LSTM``, nothing mutated during forward,
so autograd, DDP, bf16 autocast and checkpoints see ordinary parameters.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, UserError
from ..runtime import cpu_has_fast_bf16
from .base import LanguageModel, register
from .words import (  # noqa: F401
    AdaptiveInput,
    Softmax,
    any_adaptive,
    embed,
    embedding_dropout,
    input_flops,
    make_input,
    make_output,
    output_flops,
)

# Classic path: None (zeros), a tensor (GRU/RNN, (nlayers, B, H)) or an (h, c) tuple (LSTM).
# Layered path: a flat tuple, per layer h (GRU/RNN) or h, c (LSTM), each (1, B, H_layer).
State = Optional[object]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
CLASSIC_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN_TANH", "rnn_relu": "RNN_RELU"}
KERNELS = {"lstm": torch.lstm, "gru": torch.gru, "rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu}
CELLS = {"lstm": torch.lstm_cell, "gru": torch.gru_cell, "rnn_tanh": torch.rnn_tanh_cell,
         "rnn_relu": torch.rnn_relu_cell}
# Generation feeds one word at a time. On a CPU, oneDNN's fused RNN kernel (what torch.lstm calls there) costs about
# 0.5 ms a layer to set up for one time step, 5x the plain cell kernels'; so windows of at most CELL_STEPS steps
# outside training run the cells, step by step (the same arithmetic: no dropout outside training).
CELL_STEPS = 4
# oneDNN's bf16 RNN kernels need AVX512-BF16/AMX: elsewhere a bf16 recurrence is an error, so under bf16 autocast
# the recurrence runs in fp32 there (the embedding and the decoder, most of the work, stay bf16).
CPU_RNN_FP32 = not cpu_has_fast_bf16()
# cuDNN warns when an RNN's weights are not one flat buffer. A weight-dropped matrix is new every forward, so it
# cannot be part of one: the copy cuDNN makes is the price of weight drop (the reference pays it too).
_CUDNN_FLAT = "RNN module weights are not part of single contiguous chunk of memory"


@contextlib.contextmanager
def _cudnn_copies_weights():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CUDNN_FLAT)
        yield


@dataclass
class RNNConfig(ModelConfig):
    """lstm | gru | rnn_tanh | rnn_relu: the shared keys of ModelConfig and the AWD-LSTM regularisers."""

    dropouti: Optional[float] = None  # dropout on the embedding output; null = model.dropout
    dropouth: Optional[float] = None  # dropout between RNN layers; null = model.dropout
    dropoute: float = 0.0  # embedding dropout: probability of dropping a whole word (embedding row)
    wdrop: float = 0.0  # weight drop (DropConnect) on the hidden-to-hidden weights of every layer
    locked: bool = False  # locked (variational) dropout: one mask per sequence, the same at every time step
    last_nhid: Optional[int] = None  # size of the last layer; null = nhid (AWD-LSTM: = emsize, to tie)

    # Checkpoints written before these keys existed were the classic model.
    LEGACY: ClassVar[Dict[str, Any]] = {**ModelConfig.LEGACY, "dropouti": None, "dropouth": None,
                                        "dropoute": 0.0, "wdrop": 0.0, "locked": False, "last_nhid": None}

    @property
    def sizes(self) -> List[int]:
        """Output size of each layer."""
        last = self.last_nhid if self.last_nhid is not None else self.nhid
        return [self.nhid] * (self.nlayers - 1) + [last]

    @property
    def layered(self) -> bool:
        """Whether the layers run one by one (locked dropout, weight drop or a last layer of its own size)."""
        return self.locked or self.wdrop > 0 or self.sizes[-1] != self.nhid

    def p(self, key: str) -> float:
        v = getattr(self, key)
        return self.dropout if v is None else v

    def effective(self) -> Dict[str, Any]:
        out = {**super().effective(), "dropouti": self.p("dropouti"), "dropouth": self.p("dropouth"),
               "last_nhid": self.sizes[-1]}
        if self.nlayers == 1:
            del out["dropouth"]  # nothing between layers
        return out

    def validate(self) -> None:
        super().validate()
        for k in ("dropouti", "dropouth", "dropoute", "wdrop"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v < 1.0:
                raise UserError(f"model.{k}={v} must be in [0, 1)")
        if self.last_nhid is not None and self.last_nhid < 1:
            raise UserError(f"model.last_nhid={self.last_nhid} is impossible: it must be >= 1 or null")
        if self.tied and self.emsize != self.sizes[-1]:
            key = "model.last_nhid" if self.last_nhid is not None else "model.nhid"
            raise UserError(f"model.tied=true needs the last layer's size == model.emsize (got {key}="
                            f"{self.sizes[-1]} and emsize {self.emsize}): set model.last_nhid={self.emsize} "
                            f"(AWD-LSTM's choice) or model.nhid={self.emsize}, or model.tied=false")


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence (column of ``x``, (T, B, H)), the same at every time step."""
    if not training or p == 0:
        return x
    mask = torch.empty(1, x.size(1), x.size(2), device=x.device, dtype=x.dtype).bernoulli_(1 - p).div_(1 - p)
    return x * mask


def drop_weight(w: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(w, p)`` with the mask drawn as ``rand >= p``: on a CPU ``bernoulli_`` (what dropout draws with)
    takes 15 ms for a 2,400 x 600 matrix and ``rand_like`` 5 ms (2-core Xeon), a tenth of a training step of
    experiment=cpu_20min. Same distribution, same scaling; another random stream."""
    keep = (torch.rand_like(w) >= p).to(w.dtype)
    return w * keep.mul_(1.0 / (1.0 - p))


class RNNLayer(nn.Module):
    """One LSTM/GRU/Elman layer with weight drop on its hidden-to-hidden matrix (:func:`drop_weight`, a new mask
    each forward, none in eval), then the fused kernel ``nn.LSTM`` itself calls."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, wdrop: float):
        super().__init__()
        self.kind, self.hidden_size, self.wdrop = kind, hidden_size, wdrop
        g = GATES[kind] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(g))
        self.bias_hh = nn.Parameter(torch.empty(g))
        k = 1.0 / math.sqrt(hidden_size)  # nn.LSTM's initialisation
        for w in self.parameters():
            nn.init.uniform_(w, -k, k)

    def forward(self, x: torch.Tensor, state):
        w_hh = drop_weight(self.weight_hh, self.wdrop) if self.wdrop and self.training else self.weight_hh
        weights = [self.weight_ih, w_hh, self.bias_ih, self.bias_hh]
        if state is None:
            z = x.new_zeros(1, x.size(1), self.hidden_size)
            state = (z, z) if self.kind == "lstm" else z
        with _cudnn_copies_weights() if x.is_cuda else contextlib.nullcontext():
            if self.kind == "lstm":
                out, h, c = KERNELS["lstm"](x, tuple(state), weights, True, 1, 0.0, self.training, False, False)
                return out, (h, c)
            out, h = KERNELS[self.kind](x, state, weights, True, 1, 0.0, self.training, False, False)
            return out, h


@register("lstm", "gru", "rnn_tanh", "rnn_relu", config=RNNConfig)
class RNNModel(LanguageModel):
    scores_targets = True

    def __init__(self, cfg: RNNConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        # the dropouts it trains with: the config's, until set_dropouts (short_run) changes them
        self.dropouts = {"dropout": cfg.dropout, "dropouth": cfg.p("dropouth"), "dropouti": cfg.p("dropouti"),
                         "dropoute": cfg.dropoute}
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_in = nn.Dropout(cfg.p("dropouti"))
        self.encoder = make_input(cfg, vocab_size)
        self.layered = cfg.layered
        if self.layered:
            ins = [cfg.emsize] + cfg.sizes[:-1]
            self.layers = nn.ModuleList(RNNLayer(cfg.name, i, o, cfg.wdrop)
                                        for i, o in zip(ins, cfg.sizes, strict=True))
        else:
            # One multi-layer nn.RNN: its inter-layer dropout matches the classic example.
            inter = cfg.p("dropouth") if cfg.nlayers > 1 else 0.0
            if cfg.name == "lstm":
                self.rnn = nn.LSTM(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=inter)
            elif cfg.name == "gru":
                self.rnn = nn.GRU(cfg.emsize, cfg.nhid, cfg.nlayers, dropout=inter)
            else:
                act = cfg.name.split("_")[1]  # rnn_tanh -> tanh
                self.rnn = nn.RNN(cfg.emsize, cfg.nhid, cfg.nlayers, nonlinearity=act, dropout=inter)
        self.decoder = make_output(cfg, cfg.sizes[-1], vocab_size, self.encoder)
        if not isinstance(self.encoder, AdaptiveInput):  # the classic init; the adaptive layers have their own
            nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if isinstance(self.decoder, Softmax):
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
            if cfg.tied:
                self.decoder.weight = self.encoder.weight

    def init_state(self, batch_size: int, device=None) -> State:
        """Zeros (what ``None`` means to the RNN), as tensors: a compiled step then sees one input type."""
        per = 2 if self.cfg.name == "lstm" else 1
        if self.layered:
            return tuple(torch.zeros(1, batch_size, h, device=device) for h in self.cfg.sizes for _ in range(per))
        z = torch.zeros(self.cfg.nlayers, batch_size, self.cfg.nhid, device=device)
        return (z, z.clone()) if per == 2 else z

    def _dropout(self, x: torch.Tensor, p: float, module: Optional[nn.Dropout] = None) -> torch.Tensor:
        if self.cfg.locked:
            return locked_dropout(x, p, self.training)
        return module(x) if module is not None else F.dropout(x, p, self.training)

    def _layer_weights(self) -> List[List[torch.Tensor]]:
        """Per layer [weight_ih, weight_hh, bias_ih, bias_hh], whichever path holds them."""
        if self.layered:
            return [[m.weight_ih, m.weight_hh, m.bias_ih, m.bias_hh] for m in self.layers]
        return [[getattr(self.rnn, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                for k in range(self.cfg.nlayers)]

    def _cell_steps(self, emb: torch.Tensor, state: State):
        """The recurrence of a short window outside training, one cell call per layer and step (see CELL_STEPS);
        takes and returns the state in the same layout as :meth:`_recurrence`."""
        lstm, B = self.cfg.name == "lstm", emb.size(1)
        per = 2 if lstm else 1
        sizes = self.cfg.sizes
        if state is None:
            layers = [tuple(emb.new_zeros(B, h) for _ in range(per)) for h in sizes]
        elif self.layered:  # a flat tuple of (1, B, H) tensors, per layer h (and c)
            flat = [s[0] for s in state]
            layers = [tuple(flat[per * i: per * i + per]) for i in range(len(sizes))]
        else:  # (nlayers, B, H), or (h, c) of them
            layers = [tuple(s[i] for s in state) if lstm else (state[i],) for i in range(self.cfg.nlayers)]
        cell, weights = CELLS[self.cfg.name], self._layer_weights()
        outs = []
        for x in emb.unbind(0):  # (B, E)
            for i, w in enumerate(weights):
                st = cell(x, layers[i] if lstm else layers[i][0], *w)
                layers[i] = st if lstm else (st,)
                x = layers[i][0]
            outs.append(x)
        out = torch.stack(outs)  # (T, B, H)
        if self.layered:
            return out, tuple(s.unsqueeze(0) for layer in layers for s in layer)
        stacked = tuple(torch.stack([layer[j] for layer in layers]) for j in range(per))
        return out, stacked if lstm else stacked[0]

    def _recurrence(self, emb: torch.Tensor, state: State):
        if (not self.training and emb.size(0) <= CELL_STEPS and emb.device.type == "cpu"
                and not torch.is_grad_enabled() and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()):
            return self._cell_steps(emb, state)
        if not self.layered:
            return self.rnn(emb, state)
        per = 2 if self.cfg.name == "lstm" else 1
        x, new = emb, []
        for i, layer in enumerate(self.layers):
            st = None if state is None else (state[per * i: per * i + per] if per == 2 else state[i])
            x, st = layer(x, st)
            new.extend(st if per == 2 else (st,))
            if i < len(self.layers) - 1:
                x = self._dropout(x, self.dropouts["dropouth"])
        return x, tuple(new)

    def forward(self, tokens: torch.Tensor, state: State = None, aux: bool = False,
                targets: Optional[torch.Tensor] = None):
        emb = embed(self.encoder, tokens, self.dropouts["dropoute"], self.training)
        emb = self._dropout(emb, self.dropouts["dropouti"], self.drop_in)  # (T, B, E)
        if CPU_RNN_FP32 and tokens.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                raw, state = self._recurrence(emb.float(), state)  # (T, B, H)
        else:
            raw, state = self._recurrence(emb, state)  # (T, B, H)
        out = self._dropout(raw, self.dropouts["dropout"], self.drop)
        # The carried state stays fp32 whatever autocast computed it in.
        state = tuple(s.float() for s in state) if isinstance(state, tuple) else state.float()
        logp = self.decoder.log_prob(out) if targets is None else self.decoder.target_log_prob(out, targets)
        if aux:
            return logp, state, {"hidden": out, "raw_hidden": raw}
        return logp, state

    @classmethod
    def flops_per_token(cls, cfg: RNNConfig, vocab_size: int, bptt: int) -> float:
        fwd, fan_in = 0.0, cfg.emsize
        for size in cfg.sizes:
            fwd += 2 * GATES[cfg.name] * size * (fan_in + size)
            fan_in = size
        return fwd + output_flops(cfg, cfg.sizes[-1], vocab_size) + input_flops(cfg, vocab_size)

    @classmethod
    def compiles_well(cls, cfg: RNNConfig) -> bool:
        # Layer by layer, Inductor unrolls every time step of every layer: measured on a 2-core CPU for a
        # 3-layer 200-600-600-200 LSTM at bptt 70, 490 s to compile and then 0.7x the uncompiled speed.
        # The adaptive layers pick each cluster's positions (data-dependent shapes): Inductor recompiles for them.
        return not getattr(cfg, "layered", False) and not any_adaptive(cfg)

    @classmethod
    def changeable_dropouts(cls, cfg: RNNConfig) -> Tuple[str, ...]:
        # weight drop lives in the layer-by-layer path only (a model built without it runs one nn.LSTM)
        return ("dropout", "dropouth", "dropouti", "dropoute", *(("wdrop",) if cfg.layered else ()))

    def set_dropouts(self, **ps: float) -> None:
        bad = set(ps) - set(self.changeable_dropouts(self.cfg))
        if bad:
            super().set_dropouts(**{k: ps[k] for k in sorted(bad)})
        for k, v in ps.items():
            if k == "wdrop":
                for layer in self.layers:
                    layer.wdrop = v
            else:
                self.dropouts[k] = v
        self.drop.p, self.drop_in.p = self.dropouts["dropout"], self.dropouts["dropouti"]
        if not self.layered and self.cfg.nlayers > 1:
            self.rnn.dropout = self.dropouts["dropouth"]

    @classmethod
    def classic_args(cls, cfg: RNNConfig) -> List[str]:
        """The classic example at this model's sizes (it has none of the AWD-LSTM regularisers)."""
        args = ["--model", CLASSIC_NAMES[cfg.name], "--emsize", str(cfg.emsize), "--nhid", str(cfg.nhid),
                "--nlayers", str(cfg.nlayers), "--dropout", str(cfg.dropout)]
        return args + (["--tied"] if cfg.tied and cfg.emsize == cfg.nhid else [])
