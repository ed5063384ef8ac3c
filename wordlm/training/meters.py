"""What the loop measures: interval means for the log line, and steady-state throughput."""

from __future__ import annotations

import math
import time
from typing import Any, Dict

import torch

from ..distributed import Dist


class IntervalMeter:
    """Sums over the optimizer steps since the last log line, kept on the device (no per-step sync).

    Its state is checkpointed, so a resumed run's first log line covers the same steps, with the
    same mean loss, as the uninterrupted run's.
    """

    def __init__(self, device: torch.device, dist: Dist):
        self.device, self.dist = device, dist
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, device=self.device)  # loss of good steps, good steps, grad norm of good steps
        self.steps = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._paused: float | None = None

    def pause(self) -> None:
        """Leave what follows (validation, checkpoint writes) out of the interval's tokens/s and ms/step."""
        if self._paused is None:
            self._paused = time.perf_counter()

    def add(self, ok: torch.Tensor, loss: torch.Tensor, gnorm: torch.Tensor, tokens: int) -> None:
        if self._paused is not None:
            self.t0 += time.perf_counter() - self._paused
            self._paused = None
        okf = ok.float()
        self.sums += torch.stack([loss * okf, okf, gnorm * okf]).nan_to_num(0.0) * 1.0
        self.steps += 1
        self.tokens += tokens

    def read(self) -> Dict[str, float]:
        """The interval's means (one host sync; across ranks the mean over all of them), then reset."""
        sums = self.dist.all_sum(self.sums.clone().float())
        loss_sum, good, gnorm_sum = (float(v) for v in sums.tolist())
        good /= self.dist.world
        elapsed = (self._paused if self._paused is not None else time.perf_counter()) - self.t0
        out = {
            "loss": loss_sum / self.dist.world / good if good else float("nan"),
            "grad_norm": gnorm_sum / self.dist.world / good if good else float("nan"),
            "bad": float(self.steps - round(good)),
            "steps": float(self.steps),
            "tokens_per_sec": self.tokens / elapsed if elapsed > 0 else 0.0,
            "ms_per_step": 1000 * elapsed / max(1, self.steps),
        }
        self.reset()
        return out

    def state_dict(self) -> Dict[str, Any]:
        """Collective under DDP: the sums are averaged over ranks (any world size can resume them)."""
        sums = self.dist.all_sum(self.sums.clone().float()) / self.dist.world
        return {"sums": sums.cpu(), "steps": self.steps, "tokens": self.tokens}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.sums = st["sums"].to(self.device).float().clone()
        self.steps, self.tokens = int(st["steps"]), int(st["tokens"])
        self.t0 = time.perf_counter()


class Throughput:
    """Training tokens/s over the steady state: steps after the first ``warmup`` (compilation,
    allocator warm-up) and only while training (validation and checkpoint writes are paused out)."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.tokens, self.seconds = 0, 0.0
        self._t: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self, step: int) -> None:
        if self._t is None and step >= self.warmup:
            self._sync()
            self._t = time.perf_counter()

    def after_step(self, tokens: int) -> None:
        if self._t is not None:
            self.tokens += tokens

    def pause(self) -> None:
        if self._t is not None:
            self._sync()
            self.seconds += time.perf_counter() - self._t
            self._t = None

    @property
    def tokens_per_sec(self) -> float | None:
        return self.tokens / self.seconds if self.seconds and math.isfinite(self.seconds) else None

    def state_dict(self) -> Dict[str, Any]:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        self.tokens, self.seconds = int(st["tokens"]), float(st["seconds"])
