"""The loop's own state, one dataclass saved and restored as a whole: a field added here is checkpointed and
resumed without another line (a checkpoint written before the field existed gets its default)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional


@dataclass
class LoopState:
    step: int = 0  # optimizer steps taken (good or skipped)
    epoch: int = 0  # epochs completed
    pos: int = 0  # next input token of the current epoch (row of the training columns)
    best_val: Optional[float] = None  # lowest validation loss so far (the weights behind it are best.pt)
    scheduled_best: Optional[float] = None  # lowest of the scheduled validations (what the schedule judges by)
    validated_at: int = -1  # step of the last scheduled validation
    bad_total: int = 0  # non-finite steps skipped
    tokens_seen: int = 0  # training tokens, all ranks
    seconds: float = 0.0  # wall-clock seconds of fit(), summed over resumes
    eval_seconds: float = 0.0  # of which: validation, test, samples
    checkpoint_seconds: float = 0.0  # of which: checkpoint writes
    curve: List[Dict[str, float]] = field(default_factory=list)  # every validation: step, epochs, valid ppl, seconds

    def __post_init__(self) -> None:
        self.last_phase_s = 0.0  # seconds of the last evaluation or checkpoint write, for its log line (not saved)

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Count the block's seconds as evaluation (``"eval"``) or checkpoint writing, apart from training."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.last_phase_s = dt = time.perf_counter() - t
            if kind == "eval":
                self.eval_seconds += dt
            else:
                self.checkpoint_seconds += dt

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, st: Dict[str, Any], **defaults: Any) -> "LoopState":
        """From a checkpoint's trainer state; ``defaults`` for fields an older checkpoint lacks (else the
        dataclass's own)."""
        out = cls()
        for f in dataclasses.fields(cls):
            if f.name in st:
                value = st[f.name]
            elif f.name in defaults:
                value = defaults[f.name]
            else:
                continue
            kind = {"int": int, "float": float}.get(str(f.type))
            setattr(out, f.name, kind(value) if kind and value is not None else value)
        out.curve = list(out.curve)
        return out
