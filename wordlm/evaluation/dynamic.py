"""Dynamic evaluation (Krause et al. 2018, "Dynamic evaluation of neural sequence models", and their reference code).

Gradient statistics are gathered once on the training split — ``MS`` = root mean square gradient per weight
over batches of 100 columns, ``decrate = MS / mean_over_tensors(mean(MS))`` clipped at ``1 / decay`` — then
the text is scored segment by segment (:mod:`wordlm.evaluation.stream`), each segment *first* scored, *then*
used for one update ``theta += decay * decrate * (theta0 - theta) - lr * grad / (MS + eps)`` (``rule=rms``)
or ``theta -= lr * grad`` (``rule=sgd``), where ``theta0`` are the trained weights. The model's weights are
restored afterwards; the checkpoint on disk is never touched.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .. import runtime
from ..config import DynamicConfig as DynamicSettings
from ..data import batchify, get_window
from ..models import detach_state


class Dynamic:
    """Krause et al.'s dynamic evaluation state: trained weights, gradient statistics, the update rule."""

    def __init__(self, model: torch.nn.Module, settings: DynamicSettings, ms: Dict[str, torch.Tensor]):
        self.model, self.s = model, settings
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {k: p.detach().clone() for k, p in self.params.items()}
        self.ms = ms
        gsum = sum(float(m.mean()) for m in ms.values()) / max(1, len(ms))
        cap = 1 / settings.decay if settings.decay > 0 else float("inf")
        self.decrate = {k: (m / gsum).clamp(max=cap) if gsum > 0 else torch.zeros_like(m) for k, m in ms.items()}

    @torch.no_grad()
    def update(self) -> None:
        s = self.s
        for k, p in self.params.items():
            if p.grad is None:
                continue
            if s.rule == "sgd":
                p.add_(p.grad, alpha=-s.lr)
            else:
                p.add_(s.decay * self.decrate[k] * (self.theta0[k] - p) - s.lr * p.grad / (self.ms[k] + s.eps))
            p.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.theta0[k])
            p.grad = None


def gradient_stats(model: torch.nn.Module, train_ids: torch.Tensor, segment: int, device: torch.device,
                   precision: str, batch_size: int = 100, max_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """MS: root-mean-square gradient of each weight over training batches (eval mode: no dropout)."""
    data = batchify(train_ids, batch_size, device)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sq = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    model.eval()
    state, n = None, 0
    with rnn_backward_ok(device):
        for i in range(0, data.size(0) - 1, segment):
            if max_batches is not None and n >= max_batches:
                break
            x, y = get_window(data, i, segment)
            model.zero_grad(set_to_none=True)
            with runtime.autocast(device, precision):
                logp, state = model(x, state)
            F.nll_loss(logp.float().reshape(-1, logp.size(-1)), y.reshape(-1)).backward()
            state = detach_state(state)
            for k, p in params.items():
                if p.grad is not None:
                    sq[k] += p.grad.float() ** 2
            n += 1
    model.zero_grad(set_to_none=True)
    return {k: torch.sqrt(v / max(1, n)) for k, v in sq.items()}


def rnn_backward_ok(device: torch.device):
    # cuDNN's RNN backward refuses eval mode: without it, the native kernels take over (evaluation only).
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


DYNAMIC_GRID_LR = [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4]  # Krause's grid for 5-token segments,
DYNAMIC_GRID_DECAY = [1e-3, 2e-3, 3e-3, 5e-3]  # scaled by segment / 5 as in the reference code
