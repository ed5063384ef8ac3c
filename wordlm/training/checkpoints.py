"""The checkpoint manager: what a checkpoint holds, when it is written, and resuming from one.

``last.pt`` holds everything a resumed run needs to continue exactly (weights, optimizer, every
part's ``state_dict``, RNG states); ``best.pt`` the weights that validated best (the weights a
callback's ``eval_weights`` provides, e.g. averaged ones) with the same trainer state. Writes are
atomic (``wordlm.checkpoint.save``). A first SIGINT/SIGTERM asks the loop to stop after the current
step and write ``last.pt``; a second stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from .. import checkpoint, runtime
from ..compose import resume_conflicts
from ..config import UserError
from ..models import map_state
from .state import LoopState

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
    def write(self, which: str, trainer: "Trainer", weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """:meth:`save`, timed as checkpoint seconds and said in train.log (start, size, seconds)."""
        path = self.dir / f"{which}.pt"
        shown = path.relative_to(trainer.run_dir) if path.is_relative_to(trainer.run_dir) else path
        log.info("checkpoint: writing %s", shown)
        with trainer.state.timed("checkpoint"):
            self.save(which, trainer, weights)
        size = path.stat().st_size / 2 ** 20 if self.main and path.is_file() else float("nan")
        log.info("checkpoint: wrote %s (%.2f MB in %.2f s)", shown, size, trainer.state.last_phase_s)

    def save(self, which: str, trainer: "Trainer", weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``<which>.pt``: ``weights`` (default: the model's own) and the trainer's whole state.

        Collective under DDP: every rank gathers its part of the state, rank 0 writes.
        """
        self.last_time = time.monotonic()  # on every rank: they vote on timed checkpoints
        state = self.trainer_state(trainer)
        if weights is None and self.main:  # the model's weights; where a callback validates others (averages), those
            validated = _validated_weights(trainer)
            if validated is not None:
                state["validated_model"] = validated
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

    # ------------------------------------------------------------------ what a checkpoint holds
    def trainer_state(self, trainer: "Trainer") -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly: the loop state (one dataclass, whole), each part's
        state, the carried hidden state of every column, the RNG of every rank. Collective: every rank takes part."""
        tc = trainer.cfg.trainer
        st = {
            **trainer.state.state_dict(), "world": trainer.dist.world,
            "columns": tc.batch_size * tc.grad_accum, "bptt": tc.bptt,
            "state": _global_state(trainer),
            "meter": trainer.meter.state_dict(), "throughput": trainer.throughput.state_dict(),
            "step_fn": trainer.step_fn.state_dict(), "schedule": trainer.schedule.state_dict(),
            "windows": trainer.windows.state_dict(), "callbacks": [cb.state_dict() for cb in trainer.callbacks],
            "rng": trainer.dist.gather_objects(runtime.rng_state()),  # one entry per rank
        }
        return {"trainer": st, "optimizer": trainer.optimizer.state_dict()}

    def restore(self, trainer: "Trainer", ck: Dict[str, Any], best_weights: Optional[Dict[str, torch.Tensor]] = None,
                where: str = "checkpoint") -> None:
        """Continue from a checkpoint's trainer state (``ck`` as read by :func:`wordlm.checkpoint.load`)."""
        tc, st = trainer.cfg.trainer, ck["trainer"]
        columns = tc.batch_size * tc.grad_accum
        if int(st["columns"]) != columns or int(st["bptt"]) != tc.bptt:
            raise UserError(
                f"{where} was trained with {st['columns']} columns (batch_size x grad_accum) and bptt {st['bptt']}, "
                f"not {columns} and {tc.bptt}: resume with the same trainer.batch_size, grad_accum and bptt"
            )
        saved_cbs = st.get("callbacks") or []
        if len(saved_cbs) != len(trainer.callbacks):
            raise UserError(f"{where} was trained with {len(saved_cbs)} training callbacks, this run has "
                            f"{len(trainer.callbacks)}: resume with the same recipe settings")
        for cb, cst in zip(trainer.callbacks, saved_cbs, strict=True):
            cb.load_state_dict(cst, trainer)  # first: a phase may replace the optimizer
        _load_optimizer(trainer, ck["optimizer"], where)
        # (older checkpoints: tokens from the steps, exact at a fixed bptt; only scheduled validations set best_val)
        trainer.state = LoopState.from_state_dict(st, tokens_seen=int(st["step"]) * columns * tc.bptt,
                                                  scheduled_best=st.get("best_val"))
        if st["state"] is not None:
            block = trainer.micro * tc.grad_accum  # this rank's consecutive columns
            r, micro = trainer.dist.rank, trainer.micro
            mine = map_state(st["state"], lambda t: t[..., r * block:(r + 1) * block, :])
            trainer.states = [map_state(mine, lambda t, k=k: t[..., k * micro:(k + 1) * micro, :]
                                        .contiguous().to(trainer.device)) for k in range(tc.grad_accum)]
        trainer.meter.load_state_dict(st["meter"])
        trainer.throughput.load_state_dict(st["throughput"])
        trainer.step_fn.load_state_dict(st["step_fn"])
        trainer.schedule.load_state_dict(st["schedule"], trainer.state.step)
        trainer.windows.load_state_dict(st["windows"])
        if best_weights is not None:
            trainer.best_weights = best_weights
        elif trainer.state.best_val is not None:  # best.pt is this checkpoint itself (as validation saw it)
            with trainer.eval_weights():
                trainer.best_weights = trainer.weights_on_cpu()
        rngs = st.get("rng") or []
        if len(rngs) == trainer.dist.world:
            runtime.set_rng_state(rngs[trainer.dist.rank])
        else:  # another world size: fresh, distinct streams (dropout masks cannot match anyway)
            runtime.seed_all(tc.seed + 7919 * trainer.state.step + trainer.dist.rank)

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
        self.restore(trainer, ck, best_weights, str(path))
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


def _validated_weights(trainer: "Trainer") -> Optional[Dict[str, torch.Tensor]]:
    """The weights validation would use now, where a callback swaps in others (NT-ASGD's averages): what
    evaluate, generate and export score from last.pt. None where they are the model's own."""
    contexts = [cb.eval_weights(trainer) for cb in trainer.callbacks]
    if all(isinstance(c, contextlib.nullcontext) for c in contexts):
        return None
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        return trainer.weights_on_cpu()


def _load_optimizer(trainer: "Trainer", state: Dict[str, Any], where: str) -> None:
    """The optimizer's state; fused/foreach are how this device runs it, not part of its state: keep this run's."""
    opt = trainer.optimizer
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise UserError(f"{where}: optimizer state does not fit optim={trainer.cfg.optim.name} ({e})") from None
    for g, kept in zip(opt.param_groups, impl, strict=True):
        g.update(kept)
        if not (g.get("fused") or g.get("capturable")):  # a step counter on a GPU would sync every step
            for p in g["params"]:
                pst = opt.state.get(p, {})
                if isinstance(pst.get("step"), torch.Tensor):
                    pst["step"] = pst["step"].cpu()
    trainer.step_fn.set_optimizer(opt)


def _global_state(trainer: "Trainer") -> Any:
    """The carried hidden state of every column of the stream, in global column order.

    This rank's K micro-batches are consecutive columns, and ranks hold consecutive blocks, so
    concatenating micro-batches, then ranks, restores the order: any world size can resume it.
    """
    states = trainer.states
    if states[0] is None:
        return None
    first = states[0]
    if isinstance(first, torch.Tensor):
        local = torch.cat(states, dim=-2)
    else:
        local = tuple(torch.cat([s[i] for s in states], dim=-2) for i in range(len(first)))
    return map_state(local, lambda t: trainer.dist.gather_cat(t, dim=-2).cpu())


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
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except OSError as e:  # a full disk: the lock is held, its note about the holder is what cannot be written
            os.close(fd)
            raise UserError(f"cannot write in the run folder {self.path.parent}: {e.strerror or e}; free space or "
                            f"choose another hydra.run.dir") from None
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
