"""The checkpoint manager: what a checkpoint holds, when it is written, and resuming from one.

``last.pt`` holds everything a resumed run needs to continue exactly (weights, optimizer, every
part's ``state_dict``, RNG states); ``best.pt`` the weights that validated best (the weights a
callback's ``eval_weights`` provides, e.g. averaged ones) with the same trainer state. Writes are
atomic (``wordlm.checkpoint.save``). A first SIGINT/SIGTERM asks the loop to stop after the current
step and write ``last.pt``; a second stops at once.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from .. import checkpoint
from ..config import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import Trainer

log = logging.getLogger("wordlm")


class Interrupted(Exception):
    """Raised after a clean stop on SIGINT/SIGTERM; last.pt holds the state to resume from."""

    def __init__(self, signum: int, path: Optional[Path], step: int):
        super().__init__(f"signal {signum}")
        self.signum, self.path, self.step = signum, path, step


class CheckpointManager:
    def __init__(self, run_dir: Path, every: Optional[int], minutes: Optional[float], main: bool):
        self.dir = Path(run_dir) / "checkpoints"
        self.every, self.minutes, self.main = every, minutes, main
        self.stop_signal: Optional[int] = None
        self.last_time = time.monotonic()

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    # ------------------------------------------------------------------ when
    def due(self, step: int) -> bool:
        return bool(self.every and step % self.every == 0)  # the same on every rank

    def timed(self) -> bool:
        return bool(self.minutes and time.monotonic() - self.last_time >= 60 * self.minutes)

    # ------------------------------------------------------------------ writing
    def save(self, which: str, trainer: "Trainer", weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``<which>.pt``: ``weights`` (default: the model's own) and the trainer's whole state.

        Collective under DDP: every rank gathers its part of the state, rank 0 writes.
        """
        self.last_time = time.monotonic()  # on every rank: they vote on timed checkpoints
        state = trainer.state_dict()
        if not self.main:
            return
        if weights is None:
            weights = trainer.model.state_dict()
        checkpoint.save(self.dir / f"{which}.pt",
                        checkpoint.payload(trainer.cfg, trainer.corpus.vocab, weights, state))

    # ------------------------------------------------------------------ reading
    def resume(self, trainer: "Trainer", path: Path) -> None:
        ck = checkpoint.load(path, map_location=trainer.device)
        vocab = ck["vocab"]
        if vocab != trainer.corpus.vocab.itos:
            raise UserError(
                f"{path} was trained with another vocabulary ({len(vocab)} words, this corpus gives "
                f"{len(trainer.corpus.vocab)}): resume with the same data settings"
            )
        checkpoint.load_weights(trainer.model, ck["model"], str(path))
        if "trainer" not in ck or "optimizer" not in ck:
            raise UserError(f"{path} holds weights only, no trainer state: it cannot be resumed "
                            f"(start a new run from its weights with trainer.init_from={path})")
        best_weights = None
        if self.best.is_file() and self.best.resolve() != Path(path).resolve():
            best_weights = checkpoint.load(self.best)["model"]
        trainer.load_state_dict(ck, best_weights, str(path))
        log.info("resumed from %s at step %d (epoch %d, token %d of the epoch)", path, trainer.step,
                 trainer.epoch + 1, trainer.pos)

    # ------------------------------------------------------------------ signals
    def signals(self):
        """While training: the first SIGINT/SIGTERM sets ``stop_signal``, a second stops at once."""
        manager = self

        class _Ctx:
            def __enter__(self):
                self.old: Dict[int, Any] = {}
                try:
                    for s in (signal.SIGINT, signal.SIGTERM):
                        self.old[s] = signal.signal(s, self.handler)
                except ValueError:  # not the main thread: leave signals alone
                    pass

            def handler(self, signum, frame):
                if manager.stop_signal is not None:
                    # Second signal: stop at once. Checkpoints are written atomically, so the
                    # last complete one survives whatever is in flight.
                    raise KeyboardInterrupt
                manager.stop_signal = signum
                log.warning("signal %d: finishing the current step, then writing last.pt (again to stop at once)",
                            signum)

            def __exit__(self, *exc):
                for s, h in self.old.items():
                    signal.signal(s, h)

        return _Ctx()
