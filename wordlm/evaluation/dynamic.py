"""Dynamic evaluation (Krause et al. 2018, "Dynamic evaluation of neural sequence models", and their reference
code ``dynamiceval.py``).

Gradient statistics are gathered once on the training split — ``MS`` = root mean square gradient per weight
over batches of 100 columns cut into segments of the same length as the evaluation's, ``decrate = MS /
mean_over_tensors(mean(MS))`` clipped at ``1 / decay`` — then the text is scored segment by segment
(:mod:`wordlm.evaluation.stream`), each segment *first* scored, *then* used for one update
``theta += decay * decrate * (theta0 - theta) - lr * grad / (MS + eps)`` (``rule=rms``) or
``theta -= lr * grad`` (``rule=sgd``), where ``theta0`` are the trained weights. The model's weights are
restored afterwards; the checkpoint on disk is never touched.

Defaults are the reference's: segments of 5 tokens, lr 5e-5, decay 2e-3, eps 2e-5. A null lr or decay is the
reference's value scaled by ``segment / 5``, the rule ``dynamiceval.py`` applies to its grid when ``--bptt``
changes (:func:`settings`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Optional

import torch

from .. import runtime
from ..config import DynamicConfig as DynamicSettings
from ..config import UserError
from ..data import batchify
from ..models import detach_state, target_log_probs
from .scoring import windows

REFERENCE = {"segment": 5, "lr": 5e-5, "decay": 2e-3}  # dynamiceval.py's defaults (tuned for AWD-LSTM on PTB)


def settings(d: DynamicSettings, bptt: int) -> DynamicSettings:
    """``d`` with its segment (null = ``bptt``), lr and decay filled: a null lr or decay is the reference's scaled by
    segment / 5."""
    segment = d.segment or bptt
    scale = segment / REFERENCE["segment"]
    return dataclasses.replace(d, segment=segment,
                               lr=REFERENCE["lr"] * scale if d.lr is None else d.lr,
                               decay=REFERENCE["decay"] * scale if d.decay is None else d.decay)


def segment_for(segment: Optional[int], bptt: int, context: int = 0) -> int:
    """The segment length dynamic evaluation uses: ``segment`` (null = the tokens a window scores: ``bptt -
    context``, ``context`` being a stateless model's history). The default 5 is shortened to fit a shorter window;
    a longer segment asked for explicitly is refused (a segment is cut from one window)."""
    longest = bptt - context
    if segment is None:
        return longest
    if segment > longest:
        if segment == REFERENCE["segment"]:
            return longest
        where = f"bptt={bptt}" if not context else f"bptt - eval_context = {bptt} - {context}"
        raise UserError(f"dynamic.segment={segment} is longer than the {longest} tokens a window scores ({where}): "
                        f"the segments are cut from windows of bptt tokens; use dynamic.segment<={longest} (5 = the "
                        f"reference's) or a larger bptt")
    return segment


class Dynamic:
    """Krause et al.'s dynamic evaluation state: trained weights, gradient statistics, the update rule."""

    def __init__(self, model: torch.nn.Module, s: DynamicSettings, ms: Dict[str, torch.Tensor]):
        """``s``: null lr / decay are the reference's for its segment (:func:`settings`)."""
        self.model, self.s = model, settings(s, s.segment or REFERENCE["segment"])
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.theta0 = {k: p.detach().clone() for k, p in self.params.items()}
        self.ms = ms
        gsum = sum(float(m.mean()) for m in ms.values()) / max(1, len(ms))
        cap = 1 / self.s.decay if self.s.decay > 0 else float("inf")
        decrate = {k: (m / gsum).clamp(max=cap) if gsum > 0 else torch.zeros_like(m) for k, m in ms.items()}
        # The rule rewritten with what stays constant precomputed, so a segment's update is three passes over the
        # weights: theta * keep + pull - step * grad, where pull = decay * decrate * theta0 (the same numbers as
        # theta + decay * decrate * (theta0 - theta) - lr * grad / (MS + eps), tests/test_adaptive.py).
        if self.s.rule == "rms":
            pull = {k: self.s.decay * r for k, r in decrate.items()}
            self.keep = {k: 1 - a for k, a in pull.items()}
            self.pull = {k: a * self.theta0[k] for k, a in pull.items()}
            self.step = {k: self.s.lr / (m + self.s.eps) for k, m in ms.items()}

    @torch.no_grad()
    def update(self) -> None:
        s = self.s
        for k, p in self.params.items():
            if p.grad is None:
                continue
            if s.rule == "sgd":
                p.add_(p.grad, alpha=-s.lr)
            else:
                p.mul_(self.keep[k]).add_(self.pull[k]).addcmul_(p.grad, self.step[k], value=-1)
            p.grad = None

    @torch.no_grad()
    def restore(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.theta0[k])
            p.grad = None


def gradient_stats(model: torch.nn.Module, train_ids: torch.Tensor, segment: int, device: torch.device,
                   precision: str, batch_size: int = 100, max_batches: Optional[int] = None, bptt: Optional[int] = None,
                   context: int = 0) -> Dict[str, torch.Tensor]:
    """MS: root-mean-square gradient of each weight over training batches of ``batch_size`` columns, cut into the
    segments the evaluation updates on (eval mode: no dropout); a stateless model's segments carry the history
    they carry in the evaluation (``bptt``, ``context``: :func:`wordlm.evaluation.scoring.windows`)."""
    data = batchify(train_ids, batch_size, device)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sq = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    model.eval()
    stateless = getattr(model, "stateless", False)
    state, n = None, 0
    with rnn_backward_ok(device):
        for lo, i, j in windows(data.size(0) - 1, segment, bptt or segment, context, stateless):
            if max_batches is not None and n >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            with runtime.autocast(device, precision):
                tok, state = target_log_probs(model, data[lo:j], state, data[lo + 1:j + 1])
            (-tok.float()[i - lo:].mean()).backward()
            state = None if stateless else detach_state(state)
            for k, p in params.items():
                if p.grad is not None:
                    sq[k] += p.grad.float() ** 2
            n += 1
    model.zero_grad(set_to_none=True)
    return {k: torch.sqrt(v / max(1, n)) for k, v in sq.items()}


def rnn_backward_ok(device: torch.device):
    # cuDNN's RNN backward refuses eval mode: without it, the native kernels take over (evaluation only).
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()


# tune=true: Krause's grid for 5-token segments, scaled by segment / 5 as the reference code scales it; a best value
# on the grid's edge is then pushed past it (wordlm.evaluation.tuning).
DYNAMIC_GRID_LR = [3e-5, 4e-5, 5e-5, 6e-5, 7e-5, 1e-4]
DYNAMIC_GRID_DECAY = [1e-3, 2e-3, 3e-3, 5e-3]
