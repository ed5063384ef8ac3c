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
from ..compose import resume_conflicts
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

    def clear_stale_temps(self) -> None:
        """Temp files of a write that a kill interrupted (the run lock is held: no write is in flight)."""
        for p in self.dir.glob(".*.tmp-*"):
            try:
                p.unlink()
                log.info("removed %s, left by an interrupted checkpoint write", p.name)
            except OSError:
                pass

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
        failure = ""
        if self.main:
            try:
                checkpoint.save(self.dir / f"{which}.pt", checkpoint.payload(
                    trainer.cfg, trainer.corpus.vocab, trainer.model.state_dict() if weights is None else weights,
                    state))
            except UserError as e:
                failure = str(e)
        if trainer.dist.enabled:  # every rank learns that rank 0's write failed, and stops with the same line
            failure = trainer.dist.broadcast_object(failure)
        if failure:
            raise UserError(failure)

    # ------------------------------------------------------------------ reading
    def resume(self, trainer: "Trainer", path: Path) -> None:
        ck = checkpoint.load(path, map_location=trainer.device)
        conflicts = resume_conflicts(ck["config"], trainer.cfg)
        if conflicts:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in conflicts)
            raise UserError(f"trainer.resume={path} continues a run defined otherwise ({shown}): resume with the "
                            f"checkpoint's values, or start a new run from its weights with trainer.init_from={path}")
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
        best = Path(path).parent / "best.pt"  # the resumed run's own best.pt, wherever this run writes
        if best.is_file() and best.resolve() != Path(path).resolve():
            best_weights = checkpoint.load(best)["model"]
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


class RunLock:
    """An exclusive lock on a run folder for the life of a run (``<run>/.wordlm.lock``, fcntl.flock).

    The kernel drops the lock when its process dies, so a run killed with SIGKILL leaves no stale
    lock behind: the next run in that folder takes it. The file names the holder (pid, host, start,
    command) for the one-line refusal a second run gets.
    """

    NAME = ".wordlm.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl
        import json
        import os
        import socket
        import sys

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.path.parent}: {e.strerror or e}; choose a writable "
                            f"hydra.run.dir") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write in the run folder {self.path.parent}: {e.strerror or e}; choose a "
                                f"writable hydra.run.dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise UserError(f"another wordlm run is using {self.path.parent} ({holder}): wait for it to end, "
                                f"or start this one in another hydra.run.dir") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file that its previous holder unlinked while we waited
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        import json
        import os

        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (OSError, ValueError, KeyError):
            return "a process that has not written its name yet"

    def release(self) -> None:
        import os

        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None
