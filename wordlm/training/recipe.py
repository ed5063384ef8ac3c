"""The AWD-LSTM training recipe's parts (Merity et al. 2017), each a plug-in of the loop, each off by default.

- :class:`ActivationPenalty` — AR and TAR, loss terms on the model's ``aux`` outputs;
- :class:`NTASGD` — non-monotonically triggered averaged SGD: a callback that keeps the running average of
  the weights once the trigger fired, and hands the averages to validation, ``best.pt`` and the test;
- :class:`VariableWindowLength` — variable-length BPTT, with the learning rate scaled by the window length;
- :class:`ShortRun` — lighter dropouts where the budget holds few epochs (``short_run``; not the paper's).

:func:`from_config` builds the ones a config asks for; the model-side regularisers (weight drop, locked and
embedding dropout) are keys of the model itself (``wordlm.models.rnn``).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from ..config import Config, UserError
from ..models import model_class
from .callbacks import Callback, WindowLength, swapped_weights
from .step import LossTerm

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import Trainer

log = logging.getLogger("wordlm")


class ActivationPenalty:
    """AR: ``ar * mean(h ** 2)`` of the dropped last-layer outputs (``aux["hidden"]``); TAR:
    ``tar * mean((r[t+1] - r[t]) ** 2)`` of the raw ones (``aux["raw_hidden"]``), as in the paper's Eq. (3)-(4)
    and the reference code (means over time, batch and units)."""

    def __init__(self, ar: float, tar: float):
        self.ar, self.tar = ar, tar

    def __call__(self, aux: Dict[str, torch.Tensor], logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = logp.new_zeros((), dtype=torch.float32)
        if self.ar:
            total = total + self.ar * aux["hidden"].float().pow(2).mean()
        if self.tar:
            raw = aux["raw_hidden"].float()
            total = total + self.tar * (raw[1:] - raw[:-1]).pow(2).mean()
        return total


def nonmono_fired(history: List[float], loss: float, nonmono: int) -> bool:
    """The reference's trigger: ``loss`` (this check) is worse than the best of all earlier checks but the
    last ``nonmono`` ones (``len(history) > nonmono and loss > min(history[:-nonmono])``)."""
    return len(history) > nonmono and loss > min(history[:-nonmono])


class NTASGD(Callback):
    """NT-ASGD as a callback: the optimizer stays (plain SGD: torch's ASGD with ``t0=0, lambd=0``, the
    reference's settings, takes exactly SGD's steps); this keeps the running mean of the weights after
    every step once averaging started, and swaps it in for validation, ``best.pt`` and the test.

    ``finetune=False``: averaging starts at the first validation that fails the nonmono test.
    ``finetune=True`` (the reference's finetune.py, run with ``trainer.init_from`` of a trained model):
    averaging from the first step, and the run stops at the first validation that fails the test.
    ``average_from=F`` (``optim.average_from``): averaging also starts once a fraction F of the run's budget is
    spent — its steps or its ``max_minutes``, whichever runs out first — if the trigger has not fired before.
    ``trigger=False``: no nonmono trigger at all (averaging only from ``average_from``).
    """

    def __init__(self, nonmono: int, finetune: bool = False, average_from: Optional[float] = None,
                 trigger: bool = True):
        self.nonmono, self.finetune, self.average_from, self.trigger = nonmono, finetune, average_from, trigger
        self.averaging = finetune
        self.history: List[float] = []  # every validation loss so far (the reference's best_val_loss list)
        self.count = 0  # steps averaged
        self.switched_at: Optional[int] = 0 if finetune else None
        self.stopped = False  # finetuning ended on the trigger
        self.avg: List[torch.Tensor] = []
        self._params: List[torch.Tensor] = []
        self._names: List[str] = []

    def _bind(self, trainer: "Trainer") -> None:
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        self._names, self._params = [n for n, _ in named], [p for _, p in named]

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._bind(trainer)
        if self.stopped:  # a finished finetuning run, resumed: it stays finished
            trainer.stop_reason = "nonmono"
        elif self.finetune and trainer.step == 0 and trainer.best_val is None:
            # As the reference's finetune.py: the loaded model's own validation loss is the best to beat, so
            # the averages replace it in best.pt (and the test) only once they are better.
            trainer.best_val = trainer.evaluate("valid")
            trainer.best_weights = trainer.weights_on_cpu()
            log.info("finetuning from valid loss %.4f (valid ppl %.2f)", trainer.best_val, math.exp(trainer.best_val))
            trainer.save_checkpoint("best", trainer.best_weights)

    def on_step_end(self, trainer: "Trainer") -> None:
        if not self.averaging and self.average_from is not None:
            spent = trainer.budget_spent()
            if spent >= self.average_from:
                log.info("averaging the weights from step %d on: %.0f%% of the budget is spent "
                         "(optim.average_from=%g)", trainer.step, 100 * spent, self.average_from)
                self.averaging, self.switched_at = True, trainer.step
        if not self.averaging:
            return
        self.count += 1
        with torch.no_grad():
            if not self.avg:
                self.avg = [p.detach().clone() for p in self._params]
            else:  # avg += (p - avg) / count: the mean of the iterates since averaging started
                torch._foreach_lerp_(self.avg, self._params, 1.0 / self.count)

    def on_validation_end(self, trainer: "Trainer", loss: float, improved: bool) -> None:
        fired = self.trigger and nonmono_fired(self.history, loss, self.nonmono)
        self.history.append(loss)
        if not fired:
            return
        if self.finetune:
            log.info("NT-ASGD: valid loss %.4f is not better than the best before the last %d checks: "
                     "finetuning ends", loss, self.nonmono)
            trainer.stop_reason, self.stopped = "nonmono", True
        elif not self.averaging:
            log.info("NT-ASGD: valid loss %.4f is not better than the best before the last %d checks: "
                     "averaging the weights from step %d on", loss, self.nonmono, trainer.step)
            self.averaging, self.switched_at = True, trainer.step

    def eval_weights(self, trainer: "Trainer") -> contextlib.AbstractContextManager:
        if not (self.averaging and self.count):
            return contextlib.nullcontext()
        return swapped_weights(trainer.model, dict(zip(self._names, self.avg, strict=True)))

    def metrics(self) -> Dict[str, Any]:
        return {"averaging_from_step": self.switched_at}

    def state_dict(self) -> Dict[str, Any]:
        avg = {n: a.detach().cpu() for n, a in zip(self._names, self.avg, strict=True)} if self.avg else {}
        return {"averaging": self.averaging, "history": list(self.history), "count": self.count,
                "stopped": self.stopped, "switched_at": self.switched_at, "avg": avg}

    def load_state_dict(self, state: Dict[str, Any], trainer: "Trainer") -> None:
        self._bind(trainer)
        self.averaging, self.count = bool(state["averaging"]), int(state["count"])
        self.history, self.switched_at = [float(v) for v in state["history"]], state["switched_at"]
        self.stopped = bool(state.get("stopped", False))
        saved = state.get("avg") or {}
        self.avg = [saved[n].to(p.device, p.dtype).clone() for n, p in zip(self._names, self._params, strict=True)] \
            if saved else []


class ShortRun(Callback):
    """``short_run``: lighter dropouts where the budget holds fewer than ``epochs`` epochs. The regularisation a
    recipe is tuned for is a long run's: a run that fits 10 epochs (``cpu_20min`` in fp32 on a CPU without AVX-512)
    underfits with it, one that fits 23 or more does not (docs/results.md). How many epochs fit is known only once
    the run has a pace: at ``DECIDE`` of the budget it extrapolates its epochs since ``MARK`` (past the compile and
    warm-up of the first steps) to the whole budget, time or steps, whichever runs out first, and below ``epochs``
    trains on with ``dropouts``. One decision per run, kept by resume."""

    MARK, DECIDE = 0.02, 0.05

    def __init__(self, epochs: float, dropouts: Dict[str, float]):
        self.epochs, self.dropouts = epochs, dropouts
        self.mark: Optional[Tuple[float, float]] = None  # (budget spent, epochs done) at MARK
        self.estimate: Optional[float] = None  # epochs the budget holds, once decided
        self.switched_at: Optional[int] = None  # the step from which the dropouts are short_run's

    def on_step_end(self, trainer: "Trainer") -> None:
        if self.estimate is not None:
            return
        spent, done = trainer.budget_spent(), trainer.epochs_done
        if self.mark is None:
            if spent >= self.MARK:
                self.mark = (spent, done)
            return
        if spent < self.DECIDE:
            return
        s0, e0 = self.mark
        self.estimate = done + (done - e0) / max(spent - s0, 1e-9) * (1 - spent)
        if self.estimate < self.epochs:
            self.switched_at = trainer.step
            trainer.model.set_dropouts(**self.dropouts)
            log.info("short_run: about %.1f epochs fit the budget (fewer than short_run.epochs=%g): training on "
                     "from step %d with %s", self.estimate, self.epochs, trainer.step,
                     ", ".join(f"{k} {v:g}" for k, v in self.dropouts.items()))
        else:
            log.info("short_run: about %.1f epochs fit the budget (short_run.epochs=%g): the model's dropouts stay",
                     self.estimate, self.epochs)

    def metrics(self) -> Dict[str, Any]:
        return {"short_run_epochs_estimated": self.estimate, "short_run_from_step": self.switched_at}

    def state_dict(self) -> Dict[str, Any]:
        return {"mark": self.mark, "estimate": self.estimate, "switched_at": self.switched_at}

    def load_state_dict(self, state: Dict[str, Any], trainer: "Trainer") -> None:
        self.mark = tuple(state["mark"]) if state.get("mark") is not None else None
        self.estimate, self.switched_at = state.get("estimate"), state.get("switched_at")
        if self.switched_at is not None:
            trainer.model.set_dropouts(**self.dropouts)


class VariableWindowLength(WindowLength):
    """AWD-LSTM's variable-length BPTT: the base length is ``bptt`` with probability ``p_full`` (0.95), else
    ``bptt / 2``; the window is ``max(min_len, int(N(base, std)))`` tokens (std 5, at least 5); the step's
    learning rate is scaled by ``length / bptt``. ``max_len``: a cap on the window (the reference's finetune.py
    caps it at ``bptt + 10``; its main.py does not). Its own random stream, seeded from the run's seed: every rank
    draws the same lengths, dropout masks do not move them, and resume continues the stream."""

    def __init__(self, bptt: int, seed: int, p_full: float = 0.95, std: float = 5.0, min_len: int = 5,
                 max_len: Optional[int] = None):
        super().__init__(bptt)
        self.p_full, self.std, self.min_len, self.max_len = p_full, std, min_len, max_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, step: int) -> Tuple[int, float]:
        base = self.bptt if torch.rand((), generator=self.gen).item() < self.p_full else self.bptt / 2
        n = max(self.min_len, int(base + self.std * torch.randn((), generator=self.gen).item()))
        if self.max_len is not None:
            n = min(n, self.max_len)
        return n, n / self.bptt

    def state_dict(self) -> Dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("gen") is not None:
            self.gen.set_state(state["gen"])


def from_config(cfg: Config) -> Tuple[List[Callback], List[LossTerm], Optional[WindowLength]]:
    """The recipe parts ``cfg`` turns on: (callbacks, loss terms, window length or None for fixed windows)."""
    callbacks: List[Callback] = []
    terms: List[LossTerm] = []
    if cfg.loss.ar or cfg.loss.tar:
        terms.append(ActivationPenalty(cfg.loss.ar, cfg.loss.tar))
    o = cfg.optim
    if o.ntasgd or o.finetune or o.average_from is not None:
        callbacks.append(NTASGD(o.nonmono, finetune=o.finetune, average_from=o.average_from,
                                trigger=o.ntasgd or o.finetune))
    sr = cfg.short_run
    if sr.epochs is not None:
        can = model_class(cfg.model.name).changeable_dropouts(cfg.model)
        cannot = [k for k in sr.dropouts() if k not in can]
        if cannot:
            raise UserError(
                f"short_run.{cannot[0]}: model={cfg.model.name} cannot change {', '.join(cannot)} during a run"
                + (f" (it can: {', '.join(can)})" if can
                   else " (short_run needs an RNN: lstm, gru, rnn_tanh, rnn_relu)")
                + ("; weight drop needs a model built with it (model.wdrop > 0)" if "wdrop" in cannot and can else ""))
        callbacks.append(ShortRun(sr.epochs, sr.dropouts()))
    cap = cfg.trainer.bptt + 10 if cfg.optim.finetune else None  # finetune.py's cap; main.py has none
    window = VariableWindowLength(cfg.trainer.bptt, cfg.trainer.seed, max_len=cap) if cfg.trainer.variable_bptt \
        else None
    return callbacks, terms, window


def describe(cfg: Config) -> str:
    """One line naming the recipe parts in use (the start of train.log)."""
    m, parts = cfg.model, []
    for key, label in (("wdrop", "weight drop"), ("dropoute", "embedding dropout")):
        if getattr(m, key, 0):
            parts.append(f"{label} {getattr(m, key)}")
    if getattr(m, "locked", False):
        parts.append(f"locked dropout {m.p('dropouti')}/{m.p('dropouth')}/{m.dropout} (input/between/output)")
    if cfg.loss.ar or cfg.loss.tar:
        parts.append(f"AR {cfg.loss.ar} TAR {cfg.loss.tar}")
    if cfg.optim.ntasgd:
        parts.append(f"NT-ASGD (nonmono {cfg.optim.nonmono})")
    if cfg.optim.finetune:
        parts.append(f"finetune (averaged from the start, stop on nonmono {cfg.optim.nonmono})")
    if cfg.optim.average_from is not None:
        parts.append(f"weight averaging from {cfg.optim.average_from:g} of the budget")
    if cfg.trainer.variable_bptt:
        parts.append("variable BPTT")
    if cfg.short_run.epochs is not None:
        parts.append(f"lighter dropouts if fewer than {cfg.short_run.epochs:g} epochs fit the budget (short_run)")
    return ", ".join(parts)
