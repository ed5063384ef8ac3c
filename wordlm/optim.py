"""Optimizers and learning-rate schedules, each with a state_dict for exact resume."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional

import torch

from .config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[torch.nn.Parameter], device: torch.device):
    params = list(params)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    kw: Dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if fused:
        kw["fused"] = True
    else:
        kw["foreach"] = True
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
        if cfg.momentum:
            # Zero buffers up front equal torch's first-step initialisation (buf = grad, dampening 0), and stay
            # valid when that first step is skipped on a found_inf flag (fused kernels would leave the buffers
            # they allocate for it uninitialised).
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return opt
    return torch.optim.AdamW(params, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


class Schedule:
    """lr as a function of the optimizer step (cosine/constant) or of validation results (plateau).

    plateau: the classic example's rule, lr / anneal after an epoch whose validation loss
    is not better than the best so far. cosine: linear warmup, then cosine down to
    lr * min_lr_ratio at ``total_steps`` (``schedule_over=time``: at ``total_steps`` or at the end of the time
    budget, whichever comes first; :attr:`time_frac` is the share of the budget spent, which the trainer sets).
    """

    def __init__(self, cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
        self.cfg = cfg
        self.opt = optimizer
        self.total = max(1, total_steps)
        self.plateau_lr = cfg.lr
        self.time_frac = 0.0
        self.set(0)

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if c.schedule == "plateau":
            return self.plateau_lr
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        span = max(1, self.total - c.warmup_steps)
        t = min(1.0, (step - c.warmup_steps) / span)
        if c.schedule_over == "time":
            t = min(1.0, max(t, self.time_frac))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def set(self, step: int, scale: float = 1.0) -> float:
        """Set the lr of ``step``, times ``scale`` (a variable-length BPTT step scales it by its length)."""
        lr = self.lr_at(step) * scale
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def on_validation(self, improved: bool, step: int) -> None:
        if self.cfg.schedule == "plateau" and not improved:
            self.plateau_lr /= self.cfg.anneal
            self.set(step)

    def state_dict(self) -> Dict[str, Any]:
        return {"plateau_lr": self.plateau_lr, "total": self.total}

    def load_state_dict(self, st: Optional[Dict[str, Any]], step: int) -> None:
        if st:  # total is this run's own: a resumed run may extend epochs or max_steps
            self.plateau_lr = float(st["plateau_lr"])
        self.set(step)
