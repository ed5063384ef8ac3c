"""The training loop: truncated-BPTT steps, validation, schedules, checkpoints, stopping.

``Trainer.fit`` reads top to bottom; the work is done by named parts, each with its own state:

- :class:`~wordlm.training.step.TrainStep` — one optimizer step (autocast, grad accumulation,
  extra loss terms, clipping, non-finite skip, torch.compile and its fallback);
- :class:`~wordlm.training.checkpoints.CheckpointManager` — what is saved, resume, timed and
  signal-driven saves;
- :class:`~wordlm.training.meters.IntervalMeter` / ``Throughput`` — the log line and tokens/s;
- :class:`~wordlm.optim.Schedule` — the learning rate;
- :class:`~wordlm.training.callbacks.Callback` and ``WindowLength`` — what a recipe plugs in
  (optimizer phases, weight averaging, per-step BPTT length) without editing the loop.

Built from objects (a Config and a Corpus), never from globals, so tests build it without Hydra.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import checkpoint, record, runtime
from .config import Config, UserError
from .data import Corpus, batchify, get_window, num_windows
from .data.corpus import check_trainable
from .distributed import Dist
from .evaluation.scoring import eval_context, nll, ppl
from .models import build_model, count_params, map_state, model_class, train_flops_per_token
from .optim import Schedule, build_optimizer
from .sampling import sample_text
from .tracking import NullTracker
from .training import recipe
from .training.callbacks import Callback, WindowLength
from .training.checkpoints import CheckpointManager, Interrupted
from .training.meters import IntervalMeter, Throughput
from .training.step import LossTerm, TrainStep

log = logging.getLogger("wordlm")

WARMUP_STEPS = 5  # steps left out of the steady-state tokens/s
DIST_SYNC_EVERY = 10  # steps between the ranks' agreement on signals, timed checkpoints and the time budget

__all__ = ["Interrupted", "Trainer", "ppl"]


class Trainer:
    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, tracker=None, dist: Optional[Dist] = None, *,
                 callbacks: Sequence[Callback] = (), loss_terms: Sequence[LossTerm] = (),
                 window_length: Optional[WindowLength] = None):
        self.cfg, self.corpus, self.run_dir = cfg, corpus, Path(run_dir)
        self.dist = dist or Dist()
        self.tracker = tracker or NullTracker()
        tc = cfg.trainer
        W, K = self.dist.world, tc.grad_accum
        for key in ("batch_size", "eval_batch_size"):
            if getattr(tc, key) % W:
                raise UserError(f"trainer.{key}={getattr(tc, key)} does not split over {W} ranks: "
                                f"use a multiple of {W}")
        self.device = runtime.resolve_device(tc.device, self.dist.local_rank)
        self.precision = runtime.resolve_precision(tc.precision, self.device)
        self.eval_precision = runtime.resolve_precision(tc.eval_precision, self.device, key="trainer.eval_precision")
        runtime.setup(tc, self.device)

        # Data: global columns = batch_size * grad_accum; this rank holds its share (consecutive
        # columns), split into grad_accum micro-batches, each carrying its own hidden state.
        self.micro = tc.batch_size // W
        self.train_data = self._shard("train", tc.batch_size * K, self.micro * K)  # (T, micro*K)
        self.eval_data = {s: self._shard(s, tc.eval_batch_size, tc.eval_batch_size // W) for s in ("valid", "test")}
        check_trainable(corpus, cfg.data.min_freq, cfg.data.max_vocab)

        # Ranks share the initial weights (same seed); each draws its own dropout masks after.
        runtime.check_memory(lambda: build_model(cfg.model, len(corpus.vocab)), self.device, cfg.optim.name,
                             tc.batch_size // W * tc.bptt, len(corpus.vocab))
        runtime.seed_all(tc.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(self.device)
        if tc.init_from:
            checkpoint.init_from(self.model, corpus.vocab, tc.init_from)
        self.params = count_params(self.model)
        self.eval_context = eval_context(self.model, tc.eval_context, tc.bptt)
        runtime.seed_all(tc.seed + self.dist.rank)
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.steps_per_epoch = num_windows(self.train_data, tc.bptt)  # at the base bptt
        self.total_steps = min(tc.epochs * self.steps_per_epoch, tc.max_steps or math.inf)
        self.flops_per_token = train_flops_per_token(cfg.model, len(corpus.vocab), tc.bptt)  # training FLOPs
        flops = self.flops_per_token * self.total_steps * tc.bptt * tc.batch_size * K
        # The recipe's parts the config turns on (AR/TAR, NT-ASGD, variable BPTT), then the caller's.
        recipe_cbs, recipe_terms, recipe_window = recipe.from_config(cfg)
        # Auto-compile leaves out models that compile badly, and variable-length windows (they rarely have
        # the compiled length: compiling would pay for nothing).
        window = window_length or recipe_window or WindowLength(tc.bptt)
        compiled = runtime.resolve_compile(tc.compile, self.device, flops) and not (tc.compile is None and (
            not model_class(cfg.model.name).compiles_well(cfg.model) or type(window) is not WindowLength))

        # The parts.
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), self.device)
        self.schedule = Schedule(cfg.optim, self.optimizer, self.total_steps)
        self.step_fn = TrainStep(self.net, self.model, self.optimizer, device=self.device, precision=self.precision,
                                 accum=K, micro=self.micro, clip=tc.clip, dist=self.dist,
                                 compiled=compiled, full_length=tc.bptt,
                                 loss_terms=[*recipe_terms, *loss_terms])
        self.ckpt = CheckpointManager(self.run_dir, tc.checkpoint_every, tc.checkpoint_minutes, self.dist.main)
        self.meter = IntervalMeter(self.device, self.dist)
        self.throughput = Throughput(self.device, WARMUP_STEPS)
        self.callbacks: List[Callback] = [*recipe_cbs, *callbacks]
        self.windows = window

        # Loop state (all of it checkpointed).
        self.step = 0  # optimizer steps taken (good or skipped)
        self.epoch = 0  # epochs completed
        self.pos = 0  # next input token of the current epoch (row of train_data)
        self.states: List[Any] = self._fresh_states()
        self.best_val: Optional[float] = None
        self.best_weights: Optional[Dict[str, torch.Tensor]] = None  # on the CPU
        self.validated_at = -1  # step of the last scheduled validation
        self.bad_total = 0
        self.tokens_seen = 0  # training tokens, all ranks
        self.seconds = 0.0  # wall-clock seconds of fit(), summed over resumes
        self.eval_seconds = 0.0  # of which: validation, test, samples
        self.checkpoint_seconds = 0.0  # of which: checkpoint writes
        self.stop_reason: Optional[str] = None
        self.curve: List[Dict[str, float]] = []  # every validation: step, epochs, valid ppl, seconds of fit()
        self._t_start, self._seconds_before = time.perf_counter(), 0.0
        self._last_phase_s = 0.0  # seconds of the last evaluation or checkpoint write (for its log line)
        self._peak_flops: Optional[float] = None  # measured matmul FLOP/s (MFU's denominator), at the first log
        self._provenance: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Any]:
        tc = self.cfg.trainer
        self._t_start, self._seconds_before = time.perf_counter(), self.seconds
        if tc.max_minutes:  # (a resumed run: the budget already spent, the same on every rank)
            self.schedule.time_frac = self._seconds_before / (60 * tc.max_minutes)
        self._log_start()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        with self.ckpt.signals():
            while True:
                if self.pos >= self.train_data.size(0) - 1:  # an epoch end whose validation is still due
                    self._scheduled_validation(epoch_end=True)  # (a format-1 checkpoint saved just before it)
                self.stop_reason = self.stop_reason or self._limit_reached()
                if self.stop_reason:
                    break
                seq_len, lr_scale = self.windows.next(self.step)
                x, y = get_window(self.train_data, self.pos, seq_len)
                self.schedule.set(self.step, lr_scale)
                self.throughput.before_step(self.step)
                ok, loss, gnorm = self.train_step(x, y)
                self.step += 1
                self.pos += x.size(0)
                tokens = x.numel() * self.dist.world
                self.tokens_seen += tokens
                self.meter.add(ok, loss, gnorm, tokens)
                self.throughput.after_step(tokens)
                for cb in self.callbacks:
                    cb.on_step_end(self)

                epoch_end = self.pos >= self.train_data.size(0) - 1
                if self.step % tc.log_interval == 0 or epoch_end:
                    self._log_interval()
                if self.device.type == "cpu" or self.step % tc.log_interval == 0:
                    self._check_bad_streak()  # a host sync: once an interval on GPUs
                if epoch_end or (tc.eval_every and self.step % tc.eval_every == 0):
                    self._scheduled_validation(epoch_end)
                self._between_steps()  # timed/signal checkpoints and the time budget
        self._log_stop()
        if self.validated_at != self.step:
            self._stop_validation()
        test = self._test()
        return self._finish(test)

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One optimizer step on the carried hidden states: (ok, loss, grad_norm) as device tensors."""
        ok, loss, gnorm, self.states = self.step_fn(x, y, self.states, inject_nan=self._inject_nan())
        return ok, loss, gnorm

    def _limit_reached(self) -> Optional[str]:
        tc = self.cfg.trainer
        if tc.max_steps is not None and self.step >= tc.max_steps:
            return "max_steps"
        if self.epoch >= tc.epochs:
            return "epochs"
        return None

    def _scheduled_validation(self, epoch_end: bool) -> None:
        """Validate; keep the best weights; tell the schedule and callbacks; write best.pt and last.pt."""
        self.throughput.pause()
        self.meter.pause()
        val, improved = self._validate(update_best=True)
        self.schedule.on_validation(improved, self.step)
        for cb in self.callbacks:
            cb.on_validation_end(self, val, improved)
        if epoch_end:
            self.epoch += 1
            self.pos = 0
            self.states = self._fresh_states()
        self.validated_at = self.step
        self._log_validation(val, improved)
        self._tick()
        self._record_validation(val)
        target = self.cfg.trainer.target_ppl
        if target is not None and ppl(val) <= target and self.stop_reason is None:
            self.stop_reason = "target"
        if improved:
            self.save_checkpoint("best", self.best_weights)
        self.save_checkpoint("last")
        if epoch_end:
            self._log_sample()

    def _stop_validation(self) -> None:
        """A stop between scheduled validations (max_steps, max_minutes): last.pt keeps the state as if
        it had not happened, so a resumed run continues exactly; it is validated for the record, and its
        weights become best.pt only when no validation had happened yet. The schedule never sees it."""
        self.throughput.pause()
        self.meter.pause()
        self._tick()
        self.save_checkpoint("last")
        first = self.best_val is None
        val, improved = self._validate(update_best=first)
        self._log_validation(val, improved)
        self._tick()
        self._record_validation(val)
        if improved:
            self.save_checkpoint("best", self.best_weights)
        self._log_sample()

    def _validate(self, update_best: bool):
        log.info("validation at step %d: scoring the valid split (%s tokens)", self.step,
                 f"{self.corpus.split('valid').numel():,}")
        with self._timed("eval"), self._eval_weights():
            val = self.evaluate("valid")
            improved = update_best and math.isfinite(val) and (self.best_val is None or val < self.best_val)
            if improved:
                self.best_val = val
                self.best_weights = self.weights_on_cpu()
        return val, improved

    def _record_validation(self, val: float) -> None:
        self.curve.append({"step": self.step, "epochs": round(self.epochs_done, 4), "valid_ppl": round(ppl(val), 3),
                           "seconds": round(self.seconds, 2)})

    @property
    def seconds_to_target(self) -> Optional[float]:
        """Seconds of fit() (training, evaluation and checkpoints) until the first validation at or below
        ``trainer.target_ppl``; None without a target or before it is reached."""
        target = self.cfg.trainer.target_ppl
        hit = [c["seconds"] for c in self.curve if target is not None and c["valid_ppl"] <= target]
        return hit[0] if hit else None

    def _test(self) -> float:
        which = "the best validated weights" if self.best_weights is not None else "the final weights"
        log.info("test: scoring the test split (%s tokens) with %s", f"{self.corpus.split('test').numel():,}", which)
        with self._timed("eval"):
            if self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
                return self.evaluate("test")
            with self._eval_weights():
                return self.evaluate("test")

    def _between_steps(self) -> None:
        """Checkpoints on a step count, a timer or a signal; the wall-clock budget. Ranks agree first."""
        tc = self.cfg.trainer
        timed, stop = self.ckpt.timed(), self.ckpt.stop_signal is not None
        spent = self._elapsed() / (60 * tc.max_minutes) if tc.max_minutes else 0.0  # share of the time budget
        budget = spent >= 1.0
        if self.dist.enabled:
            # Clocks and signals differ between ranks, and saving is collective: ranks agree on them
            # every DIST_SYNC_EVERY steps (one tiny all-reduce), not every step (a host sync each).
            if self.step % DIST_SYNC_EVERY:
                timed = stop = budget = False
                spent = self.schedule.time_frac  # (the lr follows the budget only as the ranks agree on it)
            else:
                flags = self.dist.all_max(torch.tensor([float(timed), float(stop), float(budget), spent],
                                                       device=self.device, dtype=torch.float64))
                timed, stop, budget = (bool(f) for f in flags[:3])
                spent = float(flags[3])
        self.schedule.time_frac = spent
        if (self.ckpt.due(self.step) or timed or stop) and self.validated_at != self.step:
            self.throughput.pause()
            self.meter.pause()
            self._tick()
            self.save_checkpoint("last")
        if stop:
            self.stop_reason = "signal"
            self._write_partial_metrics("interrupted")
            raise Interrupted(self.ckpt.stop_signal or 15, self.ckpt.last, self.step)
        if budget:
            self.stop_reason = self.stop_reason or "max_minutes"

    def _check_bad_streak(self) -> None:
        n = self.step_fn.worst_bad_streak()
        if n >= self.cfg.trainer.max_bad_steps:
            self.stop_reason = "bad_steps"
            raise UserError(
                f"{n} non-finite steps in a row (loss or gradient is NaN/inf) at step {self.step}: "
                f"lower optim.lr or trainer.clip, or use trainer.precision=fp32; "
                f"the last good checkpoint is kept in {self.ckpt.dir}"
            )

    def _inject_nan(self) -> bool:
        tc = self.cfg.trainer
        return tc.debug_nan_at_step is not None and tc.debug_nan_at_step <= self.step < tc.debug_nan_at_step + max(
            1, tc.debug_nan_steps)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str) -> float:
        """Token-weighted mean NLL of ``split`` under the model as it is now (reduced across ranks)."""
        return nll(self.model, self.eval_data[split], self.cfg.trainer.bptt, self.device, self.eval_precision,
                   self.dist, progress_desc=split if self.cfg.trainer.progress and self.dist.main else None,
                   context=self.eval_context)

    def _eval_weights(self):
        stack = contextlib.ExitStack()
        for cb in self.callbacks:
            stack.enter_context(cb.eval_weights(self))
        return stack

    @contextlib.contextmanager
    def _timed(self, kind: str):
        """Seconds spent in evaluation ("eval") or checkpoint writes ("checkpoint"), apart from training."""
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self._last_phase_s = dt
            if kind == "eval":
                self.eval_seconds += dt
            else:
                self.checkpoint_seconds += dt

    # ------------------------------------------------------------------ handles for callbacks
    def save_checkpoint(self, which: str, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``checkpoints/<which>.pt`` (``weights``: default the model's own), saying so in train.log.
        Collective under DDP."""
        path = self.ckpt.dir / f"{which}.pt"
        shown = path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path
        log.info("checkpoint: writing %s", shown)
        with self._timed("checkpoint"):
            self.ckpt.save(which, self, weights)
        size = path.stat().st_size / 2 ** 20 if self.dist.main and path.is_file() else float("nan")
        log.info("checkpoint: wrote %s (%.2f MB in %.2f s)", shown, size, self._last_phase_s)

    def weights_on_cpu(self) -> Dict[str, torch.Tensor]:
        """A CPU copy of the model's weights as they are now (what ``best_weights`` holds)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace the optimizer (an optimizer phase): the step and the schedule use it from the next step."""
        lr = self.schedule.lr
        self.optimizer = optimizer
        self.step_fn.set_optimizer(optimizer)
        self.schedule.opt = optimizer
        for g in optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly. Collective: every rank takes part."""
        tc = self.cfg.trainer
        st = {
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "best_val": self.best_val,
            "validated_at": self.validated_at, "bad_total": self.bad_total, "seconds": self.seconds,
            "tokens_seen": self.tokens_seen, "eval_seconds": self.eval_seconds, "curve": self.curve,
            "checkpoint_seconds": self.checkpoint_seconds, "world": self.dist.world,
            "columns": tc.batch_size * tc.grad_accum, "bptt": tc.bptt,
            "state": self._global_state(),
            "meter": self.meter.state_dict(), "throughput": self.throughput.state_dict(),
            "step_fn": self.step_fn.state_dict(), "schedule": self.schedule.state_dict(),
            "windows": self.windows.state_dict(), "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": self.dist.gather_objects(runtime.rng_state()),  # one entry per rank
        }
        return {"trainer": st, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, ck: Dict[str, Any], best_weights: Optional[Dict[str, torch.Tensor]] = None,
                        where: str = "checkpoint") -> None:
        """Continue from a checkpoint's trainer state (``ck`` as read by :func:`wordlm.checkpoint.load`)."""
        tc, st = self.cfg.trainer, ck["trainer"]
        columns = tc.batch_size * tc.grad_accum
        if int(st["columns"]) != columns or int(st["bptt"]) != tc.bptt:
            raise UserError(
                f"{where} was trained with {st['columns']} columns (batch_size x grad_accum) and bptt {st['bptt']}, "
                f"not {columns} and {tc.bptt}: resume with the same trainer.batch_size, grad_accum and bptt"
            )
        saved_cbs = st.get("callbacks") or []
        if len(saved_cbs) != len(self.callbacks):
            raise UserError(f"{where} was trained with {len(saved_cbs)} training callbacks, this run has "
                            f"{len(self.callbacks)}: resume with the same recipe settings")
        for cb, cst in zip(self.callbacks, saved_cbs, strict=True):
            cb.load_state_dict(cst, self)  # first: a phase may replace the optimizer
        # fused/foreach are how this device runs the optimizer, not part of its state: keep this run's.
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{where}: optimizer state does not fit optim={self.cfg.optim.name} ({e})") from None
        for g, kept in zip(self.optimizer.param_groups, impl, strict=True):
            g.update(kept)
            if not (g.get("fused") or g.get("capturable")):  # a step counter on a GPU would sync every step
                for p in g["params"]:
                    pst = self.optimizer.state.get(p, {})
                    if isinstance(pst.get("step"), torch.Tensor):
                        pst["step"] = pst["step"].cpu()
        self.step_fn.set_optimizer(self.optimizer)
        self.step, self.epoch, self.pos = int(st["step"]), int(st["epoch"]), int(st["pos"])
        self.best_val, self.validated_at = st["best_val"], int(st["validated_at"])
        self.bad_total, self.seconds = int(st["bad_total"]), float(st["seconds"])
        # Checkpoints from before these were counted: tokens from the steps (exact at a fixed bptt).
        self.tokens_seen = int(st.get("tokens_seen", self.step * columns * tc.bptt))
        self.eval_seconds = float(st.get("eval_seconds", 0.0))
        self.checkpoint_seconds = float(st.get("checkpoint_seconds", 0.0))
        self.curve = list(st.get("curve", []))
        if st["state"] is not None:
            block = self.micro * tc.grad_accum  # this rank's consecutive columns
            mine = map_state(st["state"], lambda t: t[..., self.dist.rank * block:(self.dist.rank + 1) * block, :])
            self.states = [map_state(mine, lambda t, k=k: t[..., k * self.micro:(k + 1) * self.micro, :]
                                     .contiguous().to(self.device)) for k in range(tc.grad_accum)]
        self.meter.load_state_dict(st["meter"])
        self.throughput.load_state_dict(st["throughput"])
        self.step_fn.load_state_dict(st["step_fn"])
        self.schedule.load_state_dict(st["schedule"], self.step)
        self.windows.load_state_dict(st["windows"])
        if best_weights is not None:
            self.best_weights = best_weights
        elif self.best_val is not None:  # best.pt is this checkpoint itself (as validation saw it: averages...)
            with self._eval_weights():
                self.best_weights = self.weights_on_cpu()
        rngs = st.get("rng") or []
        if len(rngs) == self.dist.world:
            runtime.set_rng_state(rngs[self.dist.rank])
        else:  # another world size: fresh, distinct streams (dropout masks cannot match anyway)
            runtime.seed_all(tc.seed + 7919 * self.step + self.dist.rank)

    def resume(self, path: Path) -> None:
        self.ckpt.resume(self, Path(path))

    def _global_state(self) -> Any:
        """The carried hidden state of every column of the stream, in global column order.

        This rank's K micro-batches are consecutive columns, and ranks hold consecutive blocks, so
        concatenating micro-batches, then ranks, restores the order: any world size can resume it.
        """
        if self.states[0] is None:
            return None
        local = _cat_states(self.states)
        return map_state(local, lambda t: self.dist.gather_cat(t, dim=-2).cpu())

    # ------------------------------------------------------------------ helpers
    def _columns(self, split: str, width: int) -> torch.Tensor:
        try:
            return batchify(self.corpus.split(split), width)
        except UserError as e:
            key = "trainer.batch_size (x trainer.grad_accum)" if split == "train" else "trainer.eval_batch_size"
            raise UserError(f"{split} split: {e} (here {key}={width})") from None

    def _shard(self, split: str, width: int, share: int) -> torch.Tensor:
        cols = self._columns(split, width)
        r = self.dist.rank
        return cols[:, r * share : (r + 1) * share].contiguous().to(self.device)

    def _fresh_states(self) -> List[Any]:
        return [self.model.init_state(self.micro, self.device) for _ in range(self.cfg.trainer.grad_accum)]

    def _elapsed(self) -> float:
        return self._seconds_before + time.perf_counter() - self._t_start

    def _tick(self) -> None:
        self.seconds = self._elapsed()

    # ------------------------------------------------------------------ logging
    def settings(self) -> Dict[str, Any]:
        """The config as it ran (resolved device, precision, compile, threads; keys that act; vocabulary size,
        parameters): TensorBoard's config text and HPARAMS, and metrics.json's ``config``."""
        return record.settings(self.cfg, {
            "trainer.device": str(self.device), "trainer.precision": self.precision,
            "trainer.eval_precision": self.eval_precision, "trainer.compile": self.step_fn.compiled,
            "trainer.threads": torch.get_num_threads(), "trainer.world_size": self.dist.world,
            "trainer.eval_context": self.eval_context,
            "data.vocab_size": len(self.corpus.vocab), "model.params": self.params,
        })

    def _log_start(self) -> None:
        tc = self.cfg.trainer
        log.info("run %s | model %s: %s parameters | vocab %d | device %s | precision %s | compile %s | world %d",
                 self.cfg.run_name or "-", self.cfg.model.name, f"{self.params:,}", len(self.corpus.vocab),
                 self.device, self.precision, self.step_fn.compiled, self.dist.world)
        log.info("train %d tokens -> %d steps/epoch (batch %d x bptt %d, grad_accum %d)",
                 self.corpus.train.numel(), self.steps_per_epoch, tc.batch_size, tc.bptt, tc.grad_accum)
        parts = recipe.describe(self.cfg)
        if parts:
            log.info("recipe: %s", parts)
        settings = self.settings()
        self.tracker.text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in settings.items()) + "\n```",
                          self.step)
        self.tracker.hparams_start({k: record.hparam_value(v) for k, v in settings.items()})

    def _log_interval(self) -> None:
        m = self.meter.read()  # one sync per interval
        self.bad_total += int(m["bad"])
        lr, loss = self.schedule.lr, m["loss"]
        bad = int(m["bad"])
        log.info("epoch %d | step %d | %d/%d | lr %.4g | loss %.4f | ppl %.2f | grad %.3f | %.0f tok/s | "
                 "%.1f ms/step%s", self.epoch + 1, self.step, math.ceil(self.pos / self.cfg.trainer.bptt),
                 self.steps_per_epoch, lr, loss, ppl(loss), m["grad_norm"], m["tokens_per_sec"], m["ms_per_step"],
                 f" | {bad} bad steps skipped" if bad else "")
        vals = {"train/loss": loss, "train/ppl": ppl(loss), "train/lr": lr, "train/grad_norm": m["grad_norm"],
                "train/tokens_per_sec": m["tokens_per_sec"], "train/ms_per_step": m["ms_per_step"],
                "train/bad_steps": float(self.bad_total), "train/epoch": self.epochs_done,
                "train/tokens": float(self.tokens_seen), "train/mfu": self._mfu(m["tokens_per_sec"]),
                "train/peak_mem_mb": runtime.peak_memory_mb(self.device)}
        if self.step_fn.scaler is not None:  # fp16
            vals["train/loss_scale"] = float(self.step_fn.scaler.get_scale())
        self.tracker.scalars({k: v for k, v in vals.items() if math.isfinite(v)}, self.step)

    @property
    def epochs_done(self) -> float:
        """Epochs trained, fractional: 1.5 is half-way through the second."""
        return self.epoch + self.pos / max(1, self.train_data.size(0) - 1)

    def _mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilisation of one device: training FLOP/s over the matmul FLOP/s measured here once
        (in the training dtype; on a CPU a 512-wide matmul, so a share of what this CPU does, not a datasheet)."""
        if not self.dist.main:
            return float("nan")
        if self._peak_flops is None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
            cpu = self.device.type == "cpu"
            self._peak_flops = runtime.matmul_peak(self.device, dtype, n=512 if cpu else None, reps=8 if cpu else None,
                                                   tries=3)
            self.meter.pause()  # (leave the measurement out of the next interval)
        return self.flops_per_token * tokens_per_sec / self.dist.world / self._peak_flops

    def _log_validation(self, val: float, improved: bool) -> None:
        where = f"end of epoch {self.epoch}" if self.pos == 0 else f"epoch {self.epoch + 1}"
        log.info("%s | step %d | valid loss %.4f | valid ppl %.2f%s | %.1f s", where, self.step, val, ppl(val),
                 " | best" if improved else "", self._last_phase_s)
        vals = {"valid/loss": val, "valid/ppl": ppl(val)}
        if self.best_val is not None:
            vals["valid/best_ppl"] = ppl(self.best_val)
        self.tracker.scalars(vals, self.step)
        self.tracker.flush()

    def _log_sample(self) -> None:
        n = self.cfg.trainer.sample_words
        if n <= 0 or not self.dist.main:
            return
        tc, temperature = self.cfg.trainer, 1.0
        with self._timed("eval"), self._eval_weights():
            text = sample_text(self.model, self.corpus.vocab, n, self.device, seed=tc.seed, context=tc.bptt,
                               temperature=temperature)
        caption = (f"*{n} words sampled at step {self.step} (epoch {self.epochs_done:.2f}), seed {tc.seed}, "
                   f"temperature {temperature:g}, all words (no top-k/top-p), context {tc.bptt}*")
        self.tracker.text("sample", caption + "\n\n" + text.replace("\n", "  \n"), self.step)

    def _log_stop(self) -> None:
        tc, why = self.cfg.trainer, self.stop_reason
        text = {
            "epochs": f"trainer.epochs={tc.epochs} completed",
            "max_steps": f"trainer.max_steps={tc.max_steps} reached",
            "max_minutes": f"the trainer.max_minutes={tc.max_minutes:g} budget is spent "
                           f"({self._elapsed() / 60:.1f} min)" if tc.max_minutes else "the time budget is spent",
            "target": f"the validation perplexity reached trainer.target_ppl={tc.target_ppl:g} "
                      f"({self._elapsed():.1f} s)" if tc.target_ppl else "the target is reached",
            "nonmono": f"finetuning ended: the valid loss failed the non-monotone test (optim.nonmono="
                       f"{self.cfg.optim.nonmono})",
        }.get(why or "", str(why))
        log.info("stopping at step %d (epoch %.2f): %s", self.step, self.epochs_done, text)

    def provenance(self) -> Dict[str, Any]:
        if self._provenance is None:
            self._provenance = {"versions": record.versions(), "git": record.git_commit()}
        return self._provenance

    def _metrics(self, status: str, error: Optional[str] = None) -> Dict[str, Any]:
        """metrics.json: how the run ended and why, its figures, where its seconds went, what ran."""
        best = self.best_val if self.best_val is not None else float("nan")
        train_s = self.seconds - self.eval_seconds - self.checkpoint_seconds
        return {
            "status": status, "stop_reason": self.stop_reason, "error": error, "run_name": self.cfg.run_name,
            "best_valid_loss": best, "best_valid_ppl": ppl(best), "test_loss": None, "test_ppl": None,
            "steps": self.step, "epochs": self.epochs_done, "epochs_completed": self.epoch,
            "tokens": self.tokens_seen, "train_tokens_per_sec": self.throughput.tokens_per_sec,
            "params": self.params, "vocab_size": len(self.corpus.vocab),
            "seconds": round(self.seconds, 3), "train_seconds": round(max(0.0, train_s), 3),
            "eval_seconds": round(self.eval_seconds, 3), "checkpoint_seconds": round(self.checkpoint_seconds, 3),
            "target_ppl": self.cfg.trainer.target_ppl, "seconds_to_target": self.seconds_to_target,
            "curve": self.curve, "bad_steps": self.bad_total, "world_size": self.dist.world,
            "device": str(self.device), "precision": self.precision, "compile": self.step_fn.compiled,
            "config": self.settings(), **self.provenance(),
        }

    def _write_partial_metrics(self, status: str = "interrupted", error: Optional[str] = None) -> None:
        """A run that stops without a test (signal, non-finite steps, an error) still says how far it got
        and why."""
        self._tick()
        try:
            self.tracker.metrics(self._metrics(status, error))
            self.tracker.hparams_end(status)
        except (OSError, UserError):
            pass  # the one-line error or the resume hint that follows matters more

    def record_failure(self, error: str) -> None:
        """The run failed (``error``: the line the user sees): metrics.json and TensorBoard say so."""
        if self.stop_reason is None:
            self.stop_reason = "error"
        self._write_partial_metrics("failed", error)

    def _finish(self, test: float) -> Dict[str, Any]:
        self._tick()
        metrics = self._metrics("completed")
        metrics.update(test_loss=test, test_ppl=ppl(test))
        log.info("test loss %.4f | test ppl %.2f | best valid ppl %.2f | %.1f s", test, metrics["test_ppl"],
                 metrics["best_valid_ppl"], self._last_phase_s)
        log.info("done: %d steps, %.2f epochs in %.1f min (training %.1f, evaluation %.1f, checkpoints %.1f); "
                 "stopped by %s", self.step, self.epochs_done, self.seconds / 60, metrics["train_seconds"] / 60,
                 self.eval_seconds / 60, self.checkpoint_seconds / 60, self.stop_reason)
        self.tracker.scalars({"test/loss": test, "test/ppl": metrics["test_ppl"]}, self.step)
        self.tracker.hparams_end("completed")
        try:
            self.tracker.metrics(metrics)
        except OSError as e:
            raise UserError(f"cannot write metrics.json in {self.run_dir}: {e.strerror or e}; the checkpoints are "
                            f"complete. Free space or make the folder writable") from None
        self.tracker.flush()
        return metrics


def _cat_states(states: List[Any]) -> Any:
    """Concatenate micro-batch states along the batch (column) dimension."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=-2)
    return tuple(torch.cat([st[i] for st in states], dim=-2) for i in range(len(first)))
