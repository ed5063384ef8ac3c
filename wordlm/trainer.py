"""The training loop: truncated-BPTT steps, validation, schedules, checkpoints, stopping.

``Trainer.fit`` reads top to bottom; the work is done by named parts, each with its own state:

- :class:`~wordlm.training.state.LoopState` — the loop's own counters (step, epoch, position, best, tokens,
  seconds, curve), checkpointed as a whole;
- :class:`~wordlm.training.step.TrainStep` — one optimizer step (autocast, grad accumulation,
  extra loss terms, clipping, non-finite skip, torch.compile and its fallback);
- :class:`~wordlm.training.checkpoints.CheckpointManager` — what is saved, resume, timed and
  signal-driven saves;
- :class:`~wordlm.training.report.RunReport` — everything the run tells: train.log, TensorBoard,
  metrics.json, samples, called at the loop's events (start, interval, validation, stop, failure, finish);
- :class:`~wordlm.training.meters.IntervalMeter` / ``Throughput`` — the log line's means and tokens/s;
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

from . import checkpoint, runtime
from .config import Config, UserError
from .data import Corpus, get_window, num_windows, shard
from .data.corpus import check_trainable
from .distributed import Dist
from .evaluation import dynamic as dynamics
from .evaluation import stream
from .evaluation.scoring import eval_context, nll, ppl
from .models import build_model, count_params, model_class, train_flops_per_token
from .optim import Schedule, build_optimizer
from .tracking import NullTracker
from .training import recipe
from .training.callbacks import Callback, WindowLength
from .training.checkpoints import CheckpointManager, Interrupted
from .training.meters import IntervalMeter, Throughput
from .training.report import RunReport
from .training.state import LoopState
from .training.step import LossTerm, TrainStep, compile_plan

log = logging.getLogger("wordlm")

WARMUP_STEPS = 5  # steps left out of the steady-state tokens/s
DIST_SYNC_EVERY = 10  # steps between the ranks' agreement on signals, timed checkpoints and the time budget

__all__ = ["Interrupted", "Trainer", "ppl"]


def _loop_field(name: str) -> property:
    """``trainer.step`` is ``trainer.state.step``: plug-ins read (and a recipe may set) the loop state here."""
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v))


class Trainer:
    step, epoch, pos, best_val = (_loop_field(n) for n in ("step", "epoch", "pos", "best_val"))

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
        rank = self.dist.rank
        self.train_data = shard(corpus, "train", tc.batch_size * K, self.micro * K, rank, self.device)  # (T, micro*K)
        self.eval_data = {s: shard(corpus, s, tc.eval_batch_size, tc.eval_batch_size // W, rank, self.device)
                          for s in ("valid", "test")}
        check_trainable(corpus, cfg.data.min_freq, cfg.data.max_vocab)

        # Ranks share the initial weights (same seed); each draws its own dropout masks after.
        runtime.check_memory(lambda: build_model(cfg.model, len(corpus.vocab)), self.device, cfg.optim.name,
                             tc.batch_size // W * tc.bptt, len(corpus.vocab), _final_eval_tokens(cfg))
        runtime.seed_all(tc.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(self.device)
        if tc.init_from:
            checkpoint.init_from(self.model, corpus.vocab, tc.init_from)
        self.params = count_params(self.model)
        self.eval_context = eval_context(self.model, tc.eval_context, tc.bptt)
        runtime.seed_all(tc.seed + self.dist.rank)
        self.net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP  # (only a distributed run needs DDP)

            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

        self.steps_per_epoch = num_windows(self.train_data, tc.bptt)  # at the base bptt
        self.total_steps = min(tc.epochs * self.steps_per_epoch, tc.max_steps or math.inf)
        self.flops_per_token = train_flops_per_token(cfg.model, len(corpus.vocab), tc.bptt)  # training FLOPs
        flops = self.flops_per_token * self.total_steps * tc.bptt * tc.batch_size * K
        # The recipe's parts the config turns on (AR/TAR, NT-ASGD, variable BPTT), then the caller's.
        recipe_cbs, recipe_terms, recipe_window = recipe.from_config(cfg)
        window = window_length or recipe_window or WindowLength(tc.bptt)
        compiled, head = compile_plan(tc.compile, self.device, flops, self.model, type(window) is WindowLength,
                                      compiles_well=model_class(cfg.model.name).compiles_well(cfg.model))

        # The parts.
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), self.device)
        self.schedule = Schedule(cfg.optim, self.optimizer, self.total_steps)
        self.step_fn = TrainStep(self.net, self.model, self.optimizer, device=self.device, precision=self.precision,
                                 accum=K, micro=self.micro, clip=tc.clip, dist=self.dist,
                                 compiled=compiled, full_length=tc.bptt, head=head,
                                 loss_terms=[*recipe_terms, *loss_terms])
        self.ckpt = CheckpointManager(self.run_dir, tc.checkpoint_every, tc.checkpoint_minutes, self.dist.main)
        self.meter = IntervalMeter(self.device, self.dist)
        self.throughput = Throughput(self.device, WARMUP_STEPS)
        self.callbacks: List[Callback] = [*recipe_cbs, *callbacks]
        self.windows = window
        self.report = RunReport(self)

        # Loop state: the counters (checkpointed as a whole), the carried hidden states, the best weights.
        self.state = LoopState()
        self.states: List[Any] = self.fresh_states()
        self.best_weights: Optional[Dict[str, torch.Tensor]] = None  # on the CPU
        self.stop_reason: Optional[str] = None
        self._t_start, self._seconds_before = time.perf_counter(), 0.0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Dict[str, Any]:
        tc, st = self.cfg.trainer, self.state
        self._t_start, self._seconds_before = time.perf_counter(), st.seconds
        if tc.max_minutes:  # (a resumed run: the budget already spent, the same on every rank)
            self.schedule.time_frac = self._seconds_before / (60 * tc.max_minutes)
            if self._seconds_before >= 60 * tc.max_minutes:  # a resumed run whose budget is spent: no more steps
                self.stop_reason = "max_minutes"
        self.report.start()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        with self.ckpt.signals():
            while True:
                if st.pos >= self.train_data.size(0) - 1:  # an epoch end whose validation is still due
                    self._validation(epoch_end=True)  # (a format-1 checkpoint saved just before it)
                self.stop_reason = self.stop_reason or self._limit_reached()
                if self.stop_reason:
                    break
                seq_len, lr_scale = self.windows.next(st.step)
                x, y = get_window(self.train_data, st.pos, seq_len)
                self.schedule.set(st.step, lr_scale)
                self.throughput.before_step(st.step)
                ok, loss, gnorm = self.train_step(x, y)
                st.step += 1
                st.pos += x.size(0)
                tokens = x.numel() * self.dist.world
                st.tokens_seen += tokens
                self.meter.add(ok, loss, gnorm, tokens)
                self.throughput.after_step(tokens)
                for cb in self.callbacks:
                    cb.on_step_end(self)

                epoch_end = st.pos >= self.train_data.size(0) - 1
                if st.step % tc.log_interval == 0 or epoch_end:
                    self.report.interval()
                if self.device.type == "cpu" or st.step % tc.log_interval == 0:
                    self._check_bad_streak()  # a host sync: once an interval on GPUs
                if epoch_end or (tc.eval_every and st.step % tc.eval_every == 0):
                    self._validation(epoch_end)
                self._between_steps()  # timed/signal checkpoints and the time budget
        self.report.stop()
        if st.validated_at != st.step:
            self._validation(scheduled=False)
        test = self._test()
        seconds = self.state.last_phase_s
        adapted = _final_eval(self) if tc.final_eval != "static" and self.dist.main else {}
        return self.report.finish(test, seconds, adapted)

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """One optimizer step on the carried hidden states: (ok, loss, grad_norm) as device tensors."""
        nan = _nan_injected(self.cfg.trainer, self.state.step)
        ok, loss, gnorm, self.states = self.step_fn(x, y, self.states, inject_nan=nan)
        return ok, loss, gnorm

    def _limit_reached(self) -> Optional[str]:
        tc = self.cfg.trainer
        if tc.max_steps is not None and self.state.step >= tc.max_steps:
            return "max_steps"
        if self.state.epoch >= tc.epochs:
            return "epochs"
        return None

    def _validation(self, epoch_end: bool = False, scheduled: bool = True) -> None:
        """Validate, keep the best weights, write best.pt and last.pt. A scheduled one (epoch ends, eval_every) also
        informs the schedule and callbacks and checks target_ppl; a stop's does not, so its last.pt resumes as if it
        had not happened. Before trainer.eval_from of the budget an epoch end only moves on and writes last.pt."""
        st, skip = self.state, scheduled and self.budget_spent() < self.cfg.trainer.eval_from
        if skip and not epoch_end:  # (nothing to do: no pause, which syncs the device)
            return
        self.throughput.pause()
        self.meter.pause()
        if skip:
            self._next_epoch()
            self.tick()
            self.save_checkpoint("last")
            return
        val, improved = self._validate()
        if scheduled:
            # judged against scheduled validations only (a stop's may have set best_val): resumes decide alike
            progress = st.scheduled_best is None or val < st.scheduled_best
            st.scheduled_best = val if progress else st.scheduled_best
            self.schedule.on_validation(progress, st.step)
            for cb in self.callbacks:
                cb.on_validation_end(self, val, progress)
            target = self.cfg.trainer.target_ppl
            if target is not None and ppl(val) <= target and self.stop_reason is None:
                self.stop_reason = "target"
        if epoch_end:
            self._next_epoch()
        st.validated_at = st.step
        self.report.validation(val, improved, st.last_phase_s)
        self._record_validation(val)
        if improved:
            self.save_checkpoint("best", self.best_weights)
        self.save_checkpoint("last")
        if epoch_end or not scheduled:
            self.report.sample()

    def _next_epoch(self) -> None:
        self.state.epoch += 1
        self.state.pos = 0
        self.states = self.fresh_states()

    def _validate(self):
        """The valid loss of the weights validation uses; whether it beats the best (then kept, on the CPU).
        A non-finite loss ends the run: the model diverged, and no later step can make it a result."""
        st = self.state
        log.info("validation at step %d: scoring the valid split (%s tokens)", st.step,
                 f"{self.corpus.split('valid').numel():,}")
        with self.state.timed("eval"), self.eval_weights():
            val = self.evaluate("valid")
            if not math.isfinite(ppl(val)):  # NaN, inf, or a loss whose perplexity overflows (>= 700 nats)
                self.stop_reason = "diverged"
                raise UserError(f"the validation loss is {val:.4g} at step {st.step}: training diverged; lower "
                                f"optim.lr (now {self.cfg.optim.lr:g}) or trainer.clip, or use trainer.precision=fp32"
                                + (f"; the best weights so far are in {self.ckpt.best}" if st.best_val is not None
                                   else ""))
            improved = st.best_val is None or val < st.best_val
            if improved:
                st.best_val = val
                self.best_weights = self.weights_on_cpu()
        self.tick()
        return val, improved

    def _record_validation(self, val: float) -> None:
        self.state.curve.append({"step": self.state.step, "epochs": round(self.epochs_done, 4),
                                 "valid_ppl": round(ppl(val), 3), "seconds": round(self.state.seconds, 2)})

    def _test(self) -> float:
        which = "the best validated weights" if self.best_weights is not None else "the final weights"
        log.info("test: scoring the test split (%s tokens) with %s", f"{self.corpus.split('test').numel():,}", which)
        with self.state.timed("eval"):
            if self.best_weights is not None:
                self.model.load_state_dict(self.best_weights)
                return self.evaluate("test")
            with self.eval_weights():
                return self.evaluate("test")

    def _between_steps(self) -> None:
        """Checkpoints on a step count, a timer or a signal; the wall-clock budget. Ranks agree first."""
        tc, st = self.cfg.trainer, self.state
        timed, stop = self.ckpt.timed(), self.ckpt.stop_signal is not None
        spent = self.elapsed() / (60 * tc.max_minutes) if tc.max_minutes else 0.0  # share of the time budget
        budget = spent >= 1.0
        if self.dist.enabled:
            timed, stop, budget, spent = _agree(self.dist, st.step, self.device, timed, stop, budget, spent,
                                                self.schedule.time_frac)
        self.schedule.time_frac = spent
        if (self.ckpt.due(st.step) or timed or stop) and st.validated_at != st.step:
            self.throughput.pause()
            self.meter.pause()
            self.tick()
            self.save_checkpoint("last")
        if stop:
            self.stop_reason = "signal"
            self.report.partial("interrupted")
            raise Interrupted(self.ckpt.stop_signal or 15, self.ckpt.last, st.step)
        if budget:
            self.stop_reason = self.stop_reason or "max_minutes"

    def _check_bad_streak(self) -> None:
        n = self.step_fn.worst_bad_streak()
        if n >= self.cfg.trainer.max_bad_steps:
            self.stop_reason = "bad_steps"
            last = self.ckpt.last if self.ckpt.last.is_file() else None
            raise UserError(
                f"{n} non-finite steps in a row (loss or gradient is NaN/inf) at step {self.state.step}: "
                f"lower optim.lr or trainer.clip, or use trainer.precision=fp32"
                + (f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet")
            )

    # ------------------------------------------------------------------ handles for the parts and callbacks
    def evaluate(self, split: str) -> float:
        """Token-weighted mean NLL of ``split`` under the model as it is now (reduced across ranks)."""
        return nll(self.model, self.eval_data[split], self.cfg.trainer.bptt, self.device, self.eval_precision,
                   self.dist, progress_desc=split if self.cfg.trainer.progress and self.dist.main else None,
                   context=self.eval_context)

    def eval_weights(self):
        """A context in which the model holds the weights validation, best.pt and the test use (callbacks' averages)."""
        stack = contextlib.ExitStack()
        for cb in self.callbacks:
            stack.enter_context(cb.eval_weights(self))
        return stack

    def save_checkpoint(self, which: str, weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``checkpoints/<which>.pt`` (``weights``: default the model's own). Collective under DDP."""
        self.ckpt.write(which, self, weights)

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

    def resume(self, path: Path) -> None:
        self.ckpt.resume(self, Path(path))

    def fresh_states(self) -> List[Any]:
        return [self.model.init_state(self.micro, self.device) for _ in range(self.cfg.trainer.grad_accum)]

    @property
    def epochs_done(self) -> float:
        """Epochs trained, fractional: 1.5 is half-way through the second."""
        return self.state.epoch + self.state.pos / max(1, self.train_data.size(0) - 1)

    def budget_spent(self) -> float:
        """The share of the budget spent: steps, or time as the ranks last agreed on it (whichever is further)."""
        return max(self.state.step / max(1, self.total_steps), self.schedule.time_frac)

    def elapsed(self) -> float:
        return self._seconds_before + time.perf_counter() - self._t_start

    def tick(self) -> None:
        self.state.seconds = self.elapsed()


def _agree(dist: Dist, step: int, device: torch.device, timed: bool, stop: bool, budget: bool, spent: float,
           agreed_spent: float):
    """Clocks and signals differ between ranks, and saving is collective: ranks agree on them every
    DIST_SYNC_EVERY steps (one tiny all-reduce), not every step (a host sync each). Between agreements nothing is
    due and the lr follows the budget share last agreed on."""
    if step % DIST_SYNC_EVERY:
        return False, False, False, agreed_spent
    flags = dist.all_max(torch.tensor([float(timed), float(stop), float(budget), spent], device=device,
                                      dtype=torch.float64))
    return bool(flags[0]), bool(flags[1]), bool(flags[2]), float(flags[3])


def _nan_injected(tc, step: int) -> bool:
    """Fault injection (trainer.debug_nan_at_step): is this step's loss made NaN?"""
    return tc.debug_nan_at_step is not None and tc.debug_nan_at_step <= step < tc.debug_nan_at_step + max(
        1, tc.debug_nan_steps)


def _final_eval_tokens(cfg: Config) -> int:
    """Tokens in a batch of trainer.final_eval's gradient statistics (100 columns of its dynamic.segment-token
    segments; of whole windows for a stateless model, whose segments carry their history), for the memory check
    before training; 0 without dynamic evaluation. A dynamic.segment longer than a window is refused here, before
    training, not at the end of it."""
    tc = cfg.trainer
    if tc.final_eval not in ("dynamic", "both"):
        return 0
    stateless = model_class(cfg.model.name).stateless
    context = (tc.bptt // 2 if tc.eval_context is None else tc.eval_context) if stateless else 0
    segment = dynamics.segment_for(cfg.dynamic.segment, tc.bptt, context)
    return 100 * (tc.bptt if stateless else segment)


def _final_eval(t: Trainer) -> Dict[str, Any]:
    """trainer.final_eval: the test split scored again with the cache and/or dynamic evaluation (the best weights
    are in the model now), timed as evaluation. A failure leaves the completed run and its static test."""
    tc = t.cfg.trainer
    try:
        with t.state.timed("eval"):
            valid = t.corpus.split("valid")
            return stream.adapted_scores(t.model, t.corpus.train, t.corpus.split("test"), tc.bptt, t.device,
                                         tc.final_eval, t.eval_precision, t.cfg.data.name, t.eval_context,
                                         cache=t.cfg.cache, dynamic=t.cfg.dynamic,
                                         tune_ids=(valid[:t.cfg.tune_tokens + 1] if t.cfg.tune_tokens else valid)
                                         if t.cfg.tune else None)
    except (UserError, MemoryError, torch.OutOfMemoryError) as e:
        log.warning("trainer.final_eval=%s: %s", tc.final_eval, e)
        return {"error": str(e) or type(e).__name__}
