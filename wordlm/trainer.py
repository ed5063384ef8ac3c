"""The training loop: truncated-BPTT steps, evaluation, schedules, checkpoints, interruption.

Built from objects (a Config and a Corpus), never from globals, so tests build it
without Hydra. Everything a resumed run needs to continue exactly is in
:meth:`Trainer.state_dict`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import checkpoint, runtime
from .config import Config, UserError, to_dict
from .data import Corpus, batchify, get_window, num_windows
from .distributed import Dist
from .models import build_model, count_params, detach_state, map_state, train_flops_per_token
from .optim import Schedule, build_optimizer
from .tracking import NullTracker, flatten

log = logging.getLogger("wordlm")

WARMUP_STEPS = 5  # steps left out of the steady-state tokens/s
DIST_SYNC_EVERY = 10  # steps between the ranks' agreement on signals and timed checkpoints


class Interrupted(Exception):
    """Raised after a clean stop on SIGINT/SIGTERM; last.pt holds the state to resume from."""

    def __init__(self, signum: int, path: Optional[Path], step: int):
        super().__init__(f"signal {signum}")
        self.signum, self.path, self.step = signum, path, step


class Trainer:
    def __init__(self, cfg: Config, corpus: Corpus, run_dir: Path, tracker=None, dist: Optional[Dist] = None):
        self.cfg, self.corpus, self.run_dir = cfg, corpus, Path(run_dir)
        self.dist = dist or Dist()
        self.tracker = tracker or NullTracker()
        tc = cfg.trainer
        W, K = self.dist.world, tc.grad_accum
        if tc.batch_size % W:
            raise UserError(f"trainer.batch_size={tc.batch_size} does not split over {W} ranks: use a multiple of {W}")
        if tc.eval_batch_size % W:
            raise UserError(
                f"trainer.eval_batch_size={tc.eval_batch_size} does not split over {W} ranks: use a multiple of {W}"
            )
        self.device = runtime.resolve_device(tc.device, self.dist.local_rank)
        self.precision = runtime.resolve_precision(tc.precision, self.device)
        self.eval_precision = runtime.resolve_precision(tc.eval_precision, self.device, key="trainer.eval_precision")
        runtime.setup(tc, self.device)
        self.ckpt_dir = self.run_dir / "checkpoints"

        # Ranks share the initial weights (same seed); each draws its own dropout masks after.
        runtime.seed_all(tc.seed)
        self.model = build_model(cfg.model, len(corpus.vocab)).to(self.device)
        self.params = count_params(self.model)
        runtime.seed_all(tc.seed + self.dist.rank)
        self.net = self._wrap(self.model)

        # Data: global columns = batch_size * grad_accum; this rank holds its share, split into
        # grad_accum micro-batches, each carrying its own hidden state.
        self.micro = tc.batch_size // W  # columns per micro-step on this rank
        self.train_data = self._shard(self._columns("train", tc.batch_size * K), self.micro * K)  # (T, micro*K)
        self.eval_data = {s: self._shard(self._columns(s, tc.eval_batch_size), tc.eval_batch_size // W)
                          for s in ("valid", "test")}
        self.steps_per_epoch = num_windows(self.train_data, tc.bptt)
        total = tc.epochs * self.steps_per_epoch
        if tc.max_steps:
            total = min(total, tc.max_steps)
        self.total_steps = total
        flops = train_flops_per_token(cfg.model, len(corpus.vocab), tc.bptt) * total * tc.bptt * tc.batch_size * K
        self.compiled = runtime.resolve_compile(tc.compile, self.device, flops)
        self._compiled_loss = torch.compile(forward_loss) if self.compiled else None
        self._compile_proven = False

        self.optimizer = build_optimizer(cfg.optim, self.model.parameters(), self.device)
        self.fused = any(g.get("fused") for g in self.optimizer.param_groups)
        self.schedule = Schedule(cfg.optim, self.optimizer, total)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        # Trainer state (all of it checkpointed).
        self.step = 0  # optimizer steps taken (good or skipped)
        self.epoch = 0  # epochs completed
        self.window = 0  # next BPTT window within the current epoch
        self.best_val: Optional[float] = None
        self.bad_total = 0
        self.states: List[Any] = self._fresh_states()
        self.train_seconds = 0.0
        self.timed_tokens = 0
        self.timed_seconds = 0.0
        self.best_state: Optional[Dict[str, torch.Tensor]] = None

        self._stop_signal: Optional[int] = None
        self._last_ckpt_time = time.monotonic()
        self._consec_bad = torch.zeros((), device=self.device)
        self._worst_bad = torch.zeros((), device=self.device)  # longest streak so far: checked without a sync
        self._reset_interval()

    # ------------------------------------------------------------------ setup helpers
    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        net = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DDP(model, device_ids=ids)
        return net

    def _columns(self, split: str, width: int) -> torch.Tensor:
        try:
            return batchify(self.corpus.split(split), width)
        except UserError as e:
            raise UserError(f"{split} split: {e}") from None

    def _cpu_weights(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _fresh_states(self) -> List[Any]:
        return [self.model.init_state(self.micro, self.device) for _ in range(self.cfg.trainer.grad_accum)]

    def _shard(self, cols: torch.Tensor, width: int) -> torch.Tensor:
        r = self.dist.rank
        return cols[:, r * width : (r + 1) * width].contiguous().to(self.device)

    def _reset_interval(self) -> None:
        self._iv_loss = torch.zeros((), device=self.device)
        self._iv_good = torch.zeros((), device=self.device)
        self._iv_gnorm = torch.zeros((), device=self.device)
        self._iv_steps = 0
        self._iv_tokens = 0
        self._iv_t0 = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step over grad_accum micro-batches; returns a 0-dim 'step was finite' tensor.

        No host synchronisation happens here: losses and counters stay on the device.
        """
        use_compiled = self._compiled_loss is not None and x.size(0) == self.cfg.trainer.bptt
        if not use_compiled or self._compile_proven:
            return self._train_step(x, y, use_compiled)
        saved = list(self.states)
        try:
            ok = self._train_step(x, y, True)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # no C++ compiler, an unsupported op...: train on, uncompiled
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile failed (%s): training continues without it (trainer.compile=false "
                        "silences this)", first)
            self._compiled_loss, self.compiled, self.states = None, False, saved
            return self._train_step(x, y, False)
        self._compile_proven = True
        return ok

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, use_compiled: bool) -> torch.Tensor:
        tc, K = self.cfg.trainer, self.cfg.trainer.grad_accum
        # Only full-length windows go through the compiled step: the short last window of an epoch
        # would otherwise cost a second compilation.
        loss_fn = self._compiled_loss if use_compiled else forward_loss
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        for k in range(K):
            xs, ys = x[:, k * self.micro : (k + 1) * self.micro], y[:, k * self.micro : (k + 1) * self.micro]
            sync = self.net.no_sync() if self.dist.enabled and k < K - 1 else nullcontext()
            with sync:
                loss, state = loss_fn(self.net, xs, ys, self.states[k], self.device, self.precision)
                if self._inject_nan():
                    loss = loss * float("nan")
                scaled = loss / K
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            self.states[k] = detach_state(state)
            step_loss += loss.detach() / K
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = tc.clip if tc.clip else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        ok = torch.isfinite(step_loss) & torch.isfinite(gnorm)
        self._apply(ok)
        # A non-finite step must not poison the carried state either.
        self.states = [map_state(s, lambda t: torch.where(ok, t, torch.zeros_like(t))) for s in self.states]
        okf = ok.float()
        self._consec_bad = (self._consec_bad + 1) * (1 - okf)
        self._worst_bad = torch.maximum(self._worst_bad, self._consec_bad)
        self._iv_loss += torch.where(ok, step_loss, torch.zeros_like(step_loss))
        self._iv_gnorm += torch.where(ok, gnorm.float(), torch.zeros_like(step_loss))
        self._iv_good += okf
        return ok

    def _apply(self, ok: torch.Tensor) -> None:
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan
            self.scaler.update()
        elif self.fused:
            # Fused kernels take a found_inf flag: a bad step is skipped on the device, no sync.
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
        elif bool(ok):
            self.optimizer.step()

    def _inject_nan(self) -> bool:
        tc = self.cfg.trainer
        return tc.debug_nan_at_step is not None and tc.debug_nan_at_step <= self.step < tc.debug_nan_at_step + max(
            1, tc.debug_nan_steps)

    # ------------------------------------------------------------------ loop
    def fit(self) -> Dict[str, Any]:
        tc = self.cfg.trainer
        t_start = time.perf_counter()
        seconds_before = self.train_seconds
        self._log_start()
        with self._signals():
            while self.epoch < tc.epochs and not self._done():
                self._train_epoch()
                stopped_early = self._done() and self.window < self.steps_per_epoch
                val = self.evaluate("valid")
                improved = math.isfinite(val) and (self.best_val is None or val < self.best_val)
                if improved:
                    self.best_val = val
                    self.best_state = self._cpu_weights()
                self.schedule.on_validation(improved, self.step)
                if not stopped_early:
                    self.epoch += 1
                    self.window = 0
                    self.states = self._fresh_states()
                self._log_epoch(val, improved)
                self.train_seconds = seconds_before + time.perf_counter() - t_start
                if improved:
                    self._save("best")
                self._save("last")
                self._log_sample()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = self.evaluate("test")
        self.train_seconds = seconds_before + time.perf_counter() - t_start
        return self._finish(test)

    def _done(self) -> bool:
        ms = self.cfg.trainer.max_steps
        return ms is not None and self.step >= ms

    def _train_epoch(self) -> None:
        from .tracking import progress

        tc = self.cfg.trainer
        bptt = tc.bptt
        self._reset_interval()
        t_timed: Optional[float] = None
        tokens_timed = 0
        windows = range(self.window, self.steps_per_epoch)
        bar = progress(windows, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}",
                       enabled=tc.progress and self.dist.main)
        if hasattr(bar, "update"):
            bar.update(self.window)
        for w in bar:
            if self._done():
                break
            x, y = get_window(self.train_data, w * bptt, bptt)
            if self.step == WARMUP_STEPS or (t_timed is None and self.step > WARMUP_STEPS):
                self._sync()
                t_timed = time.perf_counter()
            self.train_step(x, y)
            self.step += 1
            self.window = w + 1
            self.schedule.set(self.step)
            ntok = x.numel() * self.dist.world
            self._iv_tokens += ntok
            self._iv_steps += 1
            if t_timed is not None:
                tokens_timed += ntok
            if self.step % tc.log_interval == 0:
                self._log_interval()
            if self.device.type == "cpu" or self.step % tc.log_interval == 0:
                self._check_bad()
            self._maybe_checkpoint()
        if t_timed is not None and tokens_timed:
            self._sync()
            self.timed_tokens += tokens_timed
            self.timed_seconds += time.perf_counter() - t_timed
        if self._iv_steps:
            self._log_interval()

    def _check_bad(self) -> None:
        n = int(self._worst_bad.item())
        if n >= self.cfg.trainer.max_bad_steps:
            raise UserError(
                f"{n} non-finite steps in a row (loss or gradient is NaN/inf) at step {self.step}: "
                f"lower optim.lr or trainer.clip, or use trainer.precision=fp32; "
                f"the last good checkpoint is kept in {self.ckpt_dir}"
            )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """Token-weighted mean NLL over ``split`` (reduced across ranks)."""
        data = self.eval_data[split]
        return evaluate(self.model, data, self.cfg.trainer.bptt, self.device, self.eval_precision, self.dist,
                        progress_desc=f"{split}" if self.cfg.trainer.progress and self.dist.main else None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs to continue exactly. Collective: every rank takes part."""
        iv = self.dist.all_sum(torch.stack([self._iv_loss, self._iv_good, self._iv_gnorm]).float()) / self.dist.world
        worst = self.dist.all_max(torch.stack([self._consec_bad, self._worst_bad]).float())
        return {
            "step": self.step, "epoch": self.epoch, "window": self.window, "best_val": self.best_val,
            "bad_total": self.bad_total, "train_seconds": self.train_seconds,
            "timed_tokens": self.timed_tokens, "timed_seconds": self.timed_seconds,
            "world": self.dist.world, "columns": self.cfg.trainer.batch_size * self.cfg.trainer.grad_accum,
            "bptt": self.cfg.trainer.bptt, "state": self._global_state(),
            "interval": {"sums": iv.cpu(), "steps": self._iv_steps, "tokens": self._iv_tokens,
                         "bad": worst.cpu()},
            "schedule": self.schedule.state_dict(),
            "rng": self.dist.gather_objects(runtime.rng_state()),  # one entry per rank
        }

    def _global_state(self) -> Any:
        """The carried hidden state of every column of the stream, in global column order.

        This rank's K micro-batches are consecutive columns, and ranks hold consecutive blocks, so
        concatenating micro-batches, then ranks, restores the order: any world size can resume it.
        """
        if self.states[0] is None:
            return None
        local = _cat_states(self.states)
        return map_state(local, lambda t: self.dist.gather_cat(t, dim=-2).cpu())

    def _save(self, which: str) -> None:
        self._last_ckpt_time = time.monotonic()  # on every rank: they vote on timed checkpoints
        st = self.state_dict()  # collective: every rank takes part
        if not self.dist.main:
            return
        extra = {"trainer": st, "optimizer": self.optimizer.state_dict()}
        if self.scaler:
            extra["scaler"] = self.scaler.state_dict()
        checkpoint.save(self.ckpt_dir / f"{which}.pt",
                        checkpoint.payload(self.cfg, self.corpus.vocab, self.model.state_dict(), extra))

    def _maybe_checkpoint(self) -> None:
        tc = self.cfg.trainer
        due = bool(tc.checkpoint_every and self.step % tc.checkpoint_every == 0)  # the same on every rank
        timed = bool(tc.checkpoint_minutes and time.monotonic() - self._last_ckpt_time >= 60 * tc.checkpoint_minutes)
        stop = self._stop_signal is not None
        if self.dist.enabled:
            # Clocks and signals differ between ranks, and saving is collective: ranks agree on them
            # every DIST_SYNC_EVERY steps (one tiny all-reduce), not every step (a host sync each).
            if self.step % DIST_SYNC_EVERY:
                timed = stop = False
            else:
                flags = self.dist.all_max(torch.tensor([float(timed), float(stop)], device=self.device))
                timed, stop = bool(flags[0]), bool(flags[1])
        if due or timed or stop:
            self._save("last")
        if stop:
            raise Interrupted(self._stop_signal or signal.SIGTERM, self.ckpt_dir / "last.pt", self.step)

    def resume(self, path: Path) -> None:
        ck = checkpoint.load(path, map_location=self.device)
        vocab = ck["vocab"]
        if vocab != self.corpus.vocab.itos:
            raise UserError(
                f"{path} was trained with another vocabulary ({len(vocab)} words, this corpus gives "
                f"{len(self.corpus.vocab)}): resume with the same data settings"
            )
        checkpoint.load_weights(self.model, ck["model"], str(path))
        if "trainer" not in ck or "optimizer" not in ck:
            raise UserError(f"{path} holds weights only, no trainer state: it cannot be resumed")
        st = ck["trainer"]
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit optim={self.cfg.optim.name} ({e})") from None
        if self.scaler and "scaler" in ck:
            self.scaler.load_state_dict(ck["scaler"])
        tc = self.cfg.trainer
        columns = tc.batch_size * tc.grad_accum
        if int(st["columns"]) != columns or int(st["bptt"]) != tc.bptt:
            raise UserError(
                f"{path} was trained with {st['columns']} columns (batch_size x grad_accum) and bptt {st['bptt']}, "
                f"not {columns} and {tc.bptt}: resume with the same trainer.batch_size, grad_accum and bptt"
            )
        self.step, self.epoch, self.window = int(st["step"]), int(st["epoch"]), int(st["window"])
        self.best_val = st["best_val"]
        self.bad_total = int(st["bad_total"])
        self.train_seconds = float(st["train_seconds"])
        self.timed_tokens, self.timed_seconds = int(st["timed_tokens"]), float(st["timed_seconds"])
        if st["state"] is not None:
            block = self.micro * tc.grad_accum  # this rank's consecutive columns
            mine = map_state(st["state"], lambda t: t[..., self.dist.rank * block:(self.dist.rank + 1) * block, :])
            self.states = [map_state(mine, lambda t, k=k: t[..., k * self.micro:(k + 1) * self.micro, :]
                                     .contiguous().to(self.device)) for k in range(tc.grad_accum)]
        iv = st["interval"]
        sums = iv["sums"].to(self.device)
        self._iv_loss, self._iv_good, self._iv_gnorm = sums[0].clone(), sums[1].clone(), sums[2].clone()
        self._iv_steps, self._iv_tokens = int(iv["steps"]), int(iv["tokens"])
        bad = iv["bad"].to(self.device)
        self._consec_bad, self._worst_bad = bad[0].clone(), bad[1].clone()
        self.schedule.load_state_dict(st.get("schedule"), self.step)
        best = path.parent / "best.pt"
        if best.is_file() and best.resolve() != Path(path).resolve():
            self.best_state = checkpoint.load(best)["model"]
        elif self.best_val is not None:
            self.best_state = self._cpu_weights()
        rngs = st.get("rng") or []
        if len(rngs) == self.dist.world:
            runtime.set_rng_state(rngs[self.dist.rank])
        else:  # another world size: fresh, distinct streams (dropout masks cannot match anyway)
            runtime.seed_all(tc.seed + 7919 * self.step + self.dist.rank)
        log.info("resumed from %s at step %d (epoch %d, window %d)", path, self.step, self.epoch + 1, self.window)

    # ------------------------------------------------------------------ signals
    def _signals(self):
        trainer = self

        class _Ctx:
            def __enter__(self):
                self.old = {}
                try:
                    for s in (signal.SIGINT, signal.SIGTERM):
                        self.old[s] = signal.signal(s, self.handler)
                except ValueError:  # not the main thread: leave signals alone
                    pass

            def handler(self, signum, frame):
                if trainer._stop_signal is not None:
                    # Second signal: stop at once. Checkpoints are written atomically, so the
                    # last complete one survives whatever is in flight.
                    raise KeyboardInterrupt
                trainer._stop_signal = signum
                log.warning("signal %d: finishing the current step, then writing last.pt (again to stop at once)",
                            signum)

            def __exit__(self, *exc):
                for s, h in self.old.items():
                    signal.signal(s, h)

        return _Ctx()

    # ------------------------------------------------------------------ logging
    def _log_start(self) -> None:
        tc = self.cfg.trainer
        log.info("model %s: %s parameters | vocab %d | device %s | precision %s | compile %s | world %d",
                 self.cfg.model.name, f"{self.params:,}", len(self.corpus.vocab), self.device, self.precision,
                 self.compiled, self.dist.world)
        log.info("train %d tokens -> %d steps/epoch (batch %d x bptt %d, grad_accum %d)",
                 self.corpus.train.numel(), self.steps_per_epoch, tc.batch_size, tc.bptt, tc.grad_accum)
        self.tracker.text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in flatten(to_dict(self.cfg)).items())
                          + "\n```", self.step)

    def _log_interval(self) -> None:
        # One sync per interval; across ranks the logged loss is the mean over all of them.
        sums = self.dist.all_sum(torch.stack([self._iv_loss, self._iv_good, self._iv_gnorm]).float())
        loss_sum, good, gnorm_sum = (float(v) for v in sums.tolist())
        good /= self.dist.world
        elapsed = time.perf_counter() - self._iv_t0
        loss = loss_sum / self.dist.world / good if good else float("nan")
        gnorm = gnorm_sum / self.dist.world / good if good else float("nan")
        bad = self._iv_steps - round(good)
        self.bad_total += bad
        tps = self._iv_tokens / elapsed if elapsed > 0 else 0.0
        train_ppl = ppl(loss)
        lr = self.schedule.lr
        log.info("epoch %d | step %d | %d/%d | lr %.4g | loss %.4f | ppl %.2f | grad %.3f | %.0f tok/s | "
                 "%.1f ms/step%s", self.epoch + 1, self.step, self.window, self.steps_per_epoch, lr, loss, train_ppl,
                 gnorm, tps, 1000 * elapsed / max(1, self._iv_steps), f" | {bad} bad steps skipped" if bad else "")
        vals = {"train/loss": loss, "train/ppl": train_ppl, "train/lr": lr, "train/grad_norm": gnorm,
                "train/tokens_per_sec": tps, "train/bad_steps": float(self.bad_total)}
        self.tracker.scalars({k: v for k, v in vals.items() if math.isfinite(v)}, self.step)
        self._reset_interval()

    def _log_epoch(self, val: float, improved: bool) -> None:
        val_ppl = ppl(val)
        log.info("end of epoch %d | step %d | valid loss %.4f | valid ppl %.2f%s", self.epoch if self.window == 0
                 else self.epoch + 1, self.step, val, val_ppl, " | best" if improved else "")
        self.tracker.scalars({"valid/loss": val, "valid/ppl": val_ppl}, self.step)
        self.tracker.flush()

    def _log_sample(self) -> None:
        n = self.cfg.trainer.sample_words
        if n <= 0 or not self.dist.main:
            return
        from .sampling import sample_text

        text = sample_text(self.model, self.corpus.vocab, n, self.device, seed=self.cfg.trainer.seed,
                           context=self.cfg.trainer.bptt)
        self.tracker.text("sample", text.replace("\n", "  \n"), self.step)

    def _finish(self, test: float) -> Dict[str, Any]:
        best = self.best_val if self.best_val is not None else float("nan")
        metrics = {
            "best_valid_loss": best, "best_valid_ppl": ppl(best),
            "test_loss": test, "test_ppl": ppl(test),
            "train_tokens_per_sec": self.timed_tokens / self.timed_seconds if self.timed_seconds else None,
            "steps": self.step, "epochs": self.epoch if self.window == 0 else self.epoch + self.window /
            self.steps_per_epoch, "params": self.params, "seconds": round(self.train_seconds, 3),
            "bad_steps": self.bad_total, "world_size": self.dist.world,
        }
        log.info("test loss %.4f | test ppl %.2f | best valid ppl %.2f", test, metrics["test_ppl"],
                 metrics["best_valid_ppl"])
        self.tracker.scalars({"test/loss": test, "test/ppl": metrics["test_ppl"]}, self.step)
        hp = flatten(to_dict(self.cfg))
        self.tracker.hparams({k: v for k, v in hp.items() if v is not None},
                             {"best_valid_ppl": metrics["best_valid_ppl"], "test_ppl": metrics["test_ppl"]})
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


def ppl(loss: float) -> float:
    """Perplexity; NaN stays NaN, a huge loss gives inf instead of an OverflowError."""
    return math.exp(loss) if not loss >= 700 else float("inf")


def forward_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, state: Any, device: torch.device,
                 precision: str):
    """Mean NLL of targets ``y`` (T, B) given inputs ``x`` (T, B); one function, so torch.compile can fuse
    log_softmax, the loss and their backward into a few passes over the (T, B, V) log-probs."""
    with runtime.autocast(device, precision):
        logp, state = net(x, state)  # (T, B, V)
    return F.nll_loss(logp.reshape(-1, logp.size(-1)), y.reshape(-1)), state


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: torch.Tensor, bptt: int, device: torch.device, precision: str = "fp32",
             dist: Optional[Dist] = None, progress_desc: Optional[str] = None) -> float:
    """Token-weighted mean negative log-likelihood of ``data`` (T, B) under ``model``."""
    from .tracking import progress

    dist = dist or Dist()
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    starts = range(0, data.size(0) - 1, bptt)
    for i in progress(starts, total=len(starts), desc=progress_desc or "", enabled=progress_desc is not None):
        x, y = get_window(data, i, bptt)
        with runtime.autocast(device, precision):
            logp, state = model(x, state)
        total += F.nll_loss(logp.reshape(-1, logp.size(-1)).float(), y.reshape(-1), reduction="sum").double()
        count += y.numel()
    dist.all_sum(total)
    dist.all_sum(count)
    model.train(was_training)
    return float(total.item() / count.item())
