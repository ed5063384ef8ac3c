"""Everything a run tells about itself, as one part the loop calls at named events.

:class:`RunReport` writes train.log's lines, TensorBoard's scalars, text and HPARAMS (through the trainer's
tracker), metrics.json, the MFU figure, the sample text and the provenance (versions, git commit). The loop
(:class:`wordlm.trainer.Trainer`) calls it at ``start``, ``interval``, ``validation``, ``sample``, ``stop``,
``failure``/``partial`` and ``finish``; it reads the loop's state and parts, and never changes how training
goes (it keeps one count of its own: the skipped steps it reads from the meter).
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Dict, Optional

import torch

from .. import record, runtime
from ..config import UserError
from ..evaluation.scoring import ppl
from ..sampling import sample_text
from . import recipe

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import Trainer

log = logging.getLogger("wordlm")


class RunReport:
    def __init__(self, trainer: "Trainer"):
        self.t = trainer
        self._peak_flops: Optional[float] = None  # measured matmul FLOP/s (MFU's denominator), at the first log
        self._provenance: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ what ran
    def settings(self) -> Dict[str, Any]:
        """The config as it ran (resolved device, precision, compile, threads; keys that act; vocabulary size,
        parameters): TensorBoard's config text and HPARAMS, and metrics.json's ``config``."""
        t = self.t
        return record.settings(t.cfg, {
            "trainer.device": str(t.device), "trainer.precision": t.precision,
            "trainer.eval_precision": t.eval_precision, "trainer.compile": t.step_fn.compiled,
            "trainer.compile_scope": t.step_fn.scope, "trainer.threads": torch.get_num_threads(),
            "trainer.world_size": t.dist.world,
            "trainer.eval_context": t.eval_context,
            "data.vocab_size": len(t.corpus.vocab), "model.params": t.params,
        })

    def provenance(self) -> Dict[str, Any]:
        if self._provenance is None:
            self._provenance = {"versions": record.versions(), "git": record.git_commit()}
        return self._provenance

    # ------------------------------------------------------------------ events
    def start(self) -> None:
        t, tc = self.t, self.t.cfg.trainer
        log.info("run %s | model %s: %s parameters | vocab %d | device %s | precision %s | compile %s | world %d",
                 t.cfg.run_name or "-", t.cfg.model.name, f"{t.params:,}", len(t.corpus.vocab),
                 t.device, t.precision, t.step_fn.scope or "off", t.dist.world)
        log.info("train %d tokens -> %d steps/epoch (batch %d x bptt %d, grad_accum %d)",
                 t.corpus.train.numel(), t.steps_per_epoch, tc.batch_size, tc.bptt, tc.grad_accum)
        parts = recipe.describe(t.cfg)
        if parts:
            log.info("recipe: %s", parts)
        if tc.eval_from:
            log.info("validation from %.0f%% of the budget on (trainer.eval_from=%g); the final weights are validated "
                     "whenever the run stops", 100 * tc.eval_from, tc.eval_from)
        settings = self.settings()
        t.tracker.text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in settings.items()) + "\n```", t.step)
        t.tracker.hparams_start({k: record.hparam_value(v) for k, v in settings.items()})

    def interval(self) -> None:
        """The log line and TensorBoard points of the steps since the last one (one host sync)."""
        t, st = self.t, self.t.state
        m = t.meter.read()
        bad = int(m["bad"])
        st.bad_total += bad
        lr, loss = t.schedule.lr, m["loss"]
        log.info("epoch %d | step %d | %d/%d | lr %.4g | loss %.4f | ppl %.2f | grad %.3f | %.0f tok/s | "
                 "%.1f ms/step%s", st.epoch + 1, st.step, math.ceil(st.pos / t.cfg.trainer.bptt),
                 t.steps_per_epoch, lr, loss, ppl(loss), m["grad_norm"], m["tokens_per_sec"], m["ms_per_step"],
                 f" | {bad} bad steps skipped" if bad else "")
        vals = {"train/loss": loss, "train/ppl": ppl(loss), "train/lr": lr, "train/grad_norm": m["grad_norm"],
                "train/tokens_per_sec": m["tokens_per_sec"], "train/ms_per_step": m["ms_per_step"],
                "train/bad_steps": float(st.bad_total), "train/epoch": t.epochs_done,
                "train/tokens": float(st.tokens_seen), "train/mfu": self.mfu(m["tokens_per_sec"]),
                "train/peak_mem_mb": runtime.peak_memory_mb(t.device)}
        if t.step_fn.scaler is not None:  # fp16
            vals["train/loss_scale"] = float(t.step_fn.scaler.get_scale())
        t.tracker.scalars({k: v for k, v in vals.items() if math.isfinite(v)}, st.step)

    def mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilisation of one device: training FLOP/s over the matmul FLOP/s measured here once
        (in the training dtype; on a CPU a 512-wide matmul, so a share of what this CPU does, not a datasheet)."""
        t = self.t
        if not t.dist.main:
            return float("nan")
        if self._peak_flops is None:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
            cpu = t.device.type == "cpu"
            self._peak_flops = runtime.matmul_peak(t.device, dtype, n=512 if cpu else None, reps=8 if cpu else None,
                                                   tries=3)
            t.meter.pause()  # (leave the measurement out of the next interval)
        return t.flops_per_token * tokens_per_sec / t.dist.world / self._peak_flops

    def validation(self, val: float, improved: bool, seconds: float) -> None:
        t, st = self.t, self.t.state
        where = f"end of epoch {st.epoch}" if st.pos == 0 else f"epoch {st.epoch + 1}"
        log.info("%s | step %d | valid loss %.4f | valid ppl %.2f%s | %.1f s", where, st.step, val, ppl(val),
                 " | best" if improved else "", seconds)
        vals = {"valid/loss": val, "valid/ppl": ppl(val)}
        if st.best_val is not None:
            vals["valid/best_ppl"] = ppl(st.best_val)
        t.tracker.scalars(vals, st.step)
        t.tracker.flush()

    def sample(self) -> None:
        """A few sampled words in TensorBoard (with the weights validation uses)."""
        t, tc = self.t, self.t.cfg.trainer
        n = tc.sample_words
        if n <= 0 or not t.dist.main:
            return
        temperature = 1.0
        with t.state.timed("eval"), t.eval_weights():
            text = sample_text(t.model, t.corpus.vocab, n, t.device, seed=tc.seed, context=tc.bptt,
                               temperature=temperature)
        caption = (f"*{n} words sampled at step {t.step} (epoch {t.epochs_done:.2f}), seed {tc.seed}, "
                   f"temperature {temperature:g}, all words (no top-k/top-p), context {tc.bptt}*")
        t.tracker.text("sample", caption + "\n\n" + text.replace("\n", "  \n"), t.step)

    def stop(self) -> None:
        t, tc, why = self.t, self.t.cfg.trainer, self.t.stop_reason
        text = {
            "epochs": f"trainer.epochs={tc.epochs} completed",
            "max_steps": f"trainer.max_steps={tc.max_steps} reached",
            "max_minutes": f"the trainer.max_minutes={tc.max_minutes:g} budget is spent "
                           f"({t.elapsed() / 60:.1f} min)" if tc.max_minutes else "the time budget is spent",
            "target": f"the validation perplexity reached trainer.target_ppl={tc.target_ppl:g} "
                      f"({t.elapsed():.1f} s)" if tc.target_ppl else "the target is reached",
            "nonmono": f"finetuning ended: the valid loss failed the non-monotone test (optim.nonmono="
                       f"{t.cfg.optim.nonmono})",
        }.get(why or "", str(why))
        log.info("stopping at step %d (epoch %.2f): %s", t.step, t.epochs_done, text)

    def partial(self, status: str = "interrupted", error: Optional[str] = None) -> None:
        """A run that stops without a test (signal, non-finite steps, an error) still says how far it got
        and why."""
        self.t.tick()
        try:
            self.t.tracker.metrics(self.metrics(status, error))
            self.t.tracker.hparams_end(status)
        except (OSError, UserError):
            pass  # the one-line error or the resume hint that follows matters more

    def failure(self, error: str) -> None:
        """The run failed (``error``: the line the user sees): metrics.json and TensorBoard say so."""
        if self.t.stop_reason is None:
            self.t.stop_reason = "error"
        self.partial("failed", error)

    def finish(self, test: float, seconds: float, adapted: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        """The run's end: the test figures (and ``adapted``: trainer.final_eval's losses and seconds, apart from
        the training budget), metrics.json, TensorBoard's test scalars and HPARAMS."""
        t, st = self.t, self.t.state
        t.tick()
        metrics = self.metrics("completed")
        metrics.update(test_loss=test, test_ppl=ppl(test))
        log.info("test loss %.4f | test ppl %.2f | best valid ppl %.2f | %.1f s", test, metrics["test_ppl"],
                 metrics["best_valid_ppl"], seconds)
        scalars = {"test/loss": test, "test/ppl": metrics["test_ppl"]}
        adapted = dict(adapted or {})
        if "error" in adapted:
            metrics["final_eval_error"] = adapted.pop("error")
        settings, tried = adapted.pop("settings", None), adapted.pop("tried", 0)
        if settings:
            metrics["final_eval_settings"] = settings  # what each method used (tuned on valid with tune=true)
            if tried:
                metrics["final_eval_tried"] = tried
                log.info("trainer.final_eval tuned on valid (%d settings tried): %s", tried, json.dumps(settings))
        for method, loss in adapted.items():
            if method != "seconds":
                metrics[f"test_ppl_{method}"] = scalars[f"test/ppl_{method}"] = ppl(loss)
                log.info("test ppl with %s: %.2f", {"both": "the cache and dynamic evaluation"}.get(
                    method, "the cache" if method == "cache" else "dynamic evaluation"), ppl(loss))
        if "seconds" in adapted:
            metrics["final_eval_seconds"] = round(adapted["seconds"], 3)
            log.info("final evaluation (trainer.final_eval=%s): %.1f s, apart from the training budget",
                     t.cfg.trainer.final_eval, adapted["seconds"])
        log.info("done: %d steps, %.2f epochs in %.1f min (training %.1f, evaluation %.1f, checkpoints %.1f); "
                 "stopped by %s", st.step, t.epochs_done, st.seconds / 60, metrics["train_seconds"] / 60,
                 st.eval_seconds / 60, st.checkpoint_seconds / 60, t.stop_reason)
        t.tracker.scalars(scalars, st.step)
        t.tracker.hparams_end("completed")
        try:
            t.tracker.metrics(metrics)
        except OSError as e:
            raise UserError(f"cannot write metrics.json in {t.run_dir}: {e.strerror or e}; the checkpoints are "
                            f"complete. Free space or make the folder writable") from None
        t.tracker.flush()
        return metrics

    # ------------------------------------------------------------------ metrics.json
    def seconds_to_target(self) -> Optional[float]:
        """Seconds of fit() (training, evaluation and checkpoints) until the first validation at or below
        ``trainer.target_ppl``; None without a target or before it is reached."""
        target = self.t.cfg.trainer.target_ppl
        hit = [c["seconds"] for c in self.t.state.curve if target is not None and c["valid_ppl"] <= target]
        return hit[0] if hit else None

    def metrics(self, status: str, error: Optional[str] = None) -> Dict[str, Any]:
        """metrics.json: how the run ended and why, its figures, where its seconds went, what ran."""
        t, st = self.t, self.t.state
        best = st.best_val if st.best_val is not None else float("nan")
        train_s = st.seconds - st.eval_seconds - st.checkpoint_seconds
        return {
            "status": status, "stop_reason": t.stop_reason, "error": error, "run_name": t.cfg.run_name,
            "best_valid_loss": best, "best_valid_ppl": ppl(best), "test_loss": None, "test_ppl": None,
            "steps": st.step, "epochs": t.epochs_done, "epochs_completed": st.epoch,
            "tokens": st.tokens_seen, "train_tokens_per_sec": t.throughput.tokens_per_sec,
            "params": t.params, "vocab_size": len(t.corpus.vocab),
            "seconds": round(st.seconds, 3), "train_seconds": round(max(0.0, train_s), 3),
            "eval_seconds": round(st.eval_seconds, 3), "checkpoint_seconds": round(st.checkpoint_seconds, 3),
            "target_ppl": t.cfg.trainer.target_ppl, "seconds_to_target": self.seconds_to_target(),
            "curve": st.curve, "bad_steps": st.bad_total, "world_size": t.dist.world,
            "device": str(t.device), "precision": t.precision, "compile": t.step_fn.compiled,
            "compile_scope": t.step_fn.scope, "config": self.settings(), **self.provenance(),
            **{k: v for cb in t.callbacks for k, v in cb.metrics().items()},
        }
