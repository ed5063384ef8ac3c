"""One optimizer step: micro-batches under autocast, extra loss terms, clipping, non-finite skip, compile.

No host synchronisation happens in a step: the loss, the gradient norm and the "step was finite"
flag stay on the device, and the loop reads them once per logging interval.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import runtime
from ..config import UserError
from ..distributed import Dist
from ..models import detach_state, target_log_probs

log = logging.getLogger("wordlm")

# A loss term: (aux outputs of the model, log-probs of the targets (T, B), targets (T, B)) -> a scalar added to
# the loss that is minimised. The reported loss stays the NLL. ``aux`` holds ``hidden`` and ``raw_hidden``
# (see wordlm.models). Terms are plain callables: AR/TAR, a penalty, anything.
LossTerm = Callable[[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]


def forward_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, state: Any, device: torch.device,
                 precision: str, terms: Tuple[LossTerm, ...] = (), scores_targets: bool = False):
    """(NLL, NLL + extra terms, state) of targets ``y`` (T, B) given inputs ``x`` (T, B).

    One function, so torch.compile fuses log_softmax, the loss and their backward into a few passes
    over the (T, B, V) log-probs. A model that scores targets itself (``scores_targets``) is asked for the
    targets' log-probs only: an adaptive softmax then takes its clustered path.
    """
    with runtime.autocast(device, precision):
        if terms:
            logp, state, aux = target_log_probs(net, x, state, y, aux=True, scores_targets=scores_targets)
        else:
            logp, state = target_log_probs(net, x, state, y, scores_targets=scores_targets)
    nll = -logp.float().mean()
    total = nll
    for term in terms:
        total = total + term(aux, logp, y).float()
    return nll, total, state


def compile_plan(flag: Optional[bool], device: torch.device, flops: float, model: torch.nn.Module,
                 fixed_windows: bool, compiles_well: bool) -> Tuple[bool, bool]:
    """(compile the whole step, compile the model's scoring head) for ``trainer.compile=flag``.

    Auto (null, a run long enough to pay for compiling) compiles the whole step of a model that compiles well on
    fixed-length windows; ``true`` does so whatever the windows (only windows of the compiled length use it).
    Otherwise (a layered RNN: its whole step compiles for minutes and runs slower; variable-length windows under
    auto) only the scoring of targets is compiled, any length (``LanguageModel.compile_head`` switches it on);
    a model without such a head (the adaptive softmax) compiles its whole step only when ``true`` says so."""
    if not runtime.resolve_compile(flag, device, flops):
        return False, False
    whole = compiles_well and (fixed_windows or flag is True)
    head = not whole and model.compile_head(True)
    return whole or (not head and flag is True), head


def _select(ok: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where the step was finite, else ``old`` (None, a tensor or a tuple of tensors), without a sync."""
    if new is None:
        return None
    if isinstance(new, torch.Tensor):
        return torch.where(ok, new, old)
    return tuple(_select(ok, n, o) for n, o in zip(new, old, strict=True))


class TrainStep:
    """``step(x, y, states) -> (ok, loss, grad_norm, states)`` over ``accum`` micro-batches of ``micro`` columns.

    The optimizer may be replaced between steps (an optimizer phase does that through
    ``Trainer.set_optimizer``). A step whose loss or gradient norm is not finite leaves the weights,
    the optimizer state and the carried hidden state untouched.
    """

    def __init__(self, net: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, precision: str, accum: int, micro: int, clip: Optional[float], dist: Dist,
                 compiled: bool, full_length: int, loss_terms: Sequence[LossTerm] = (), head: bool = False):
        self.net, self.model, self.device, self.precision = net, model, device, precision
        self.accum, self.micro, self.clip, self.dist = accum, micro, clip, dist
        self.terms = tuple(loss_terms)
        self.scores_targets = bool(getattr(model, "scores_targets", False))  # (``net`` may be DDP's wrapper)
        self.full_length = full_length  # only windows of this length go through the compiled step
        self.compiled_fn = torch.compile(forward_loss) if compiled else None
        self.head = head  # the caller switched on model.compile_head (compile_plan): the fallback switches it off
        self._proven = False
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.set_optimizer(optimizer)
        self.consec_bad = torch.zeros((), device=device)  # current run of non-finite steps
        self.worst_bad = torch.zeros((), device=device)  # longest run so far: checked without a sync

    @property
    def compiled(self) -> bool:
        return self.scope is not None

    @property
    def scope(self) -> Optional[str]:
        """What is compiled: "step" (the whole forward and loss), "head" (the scoring of targets) or None."""
        return "step" if self.compiled_fn is not None else "head" if self.head else None

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fused = any(g.get("fused") for g in optimizer.param_groups)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, states: List[Any], inject_nan: bool = False):
        use_compiled = self.compiled_fn is not None and x.size(0) == self.full_length
        if not (use_compiled or self.head) or self._proven:
            return self._step(x, y, states, use_compiled, inject_nan)
        try:
            out = self._step(x, y, states, use_compiled, inject_nan)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # no C++ compiler, an unsupported op...: train on, uncompiled
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("torch.compile failed (%s): training continues without it (trainer.compile=false "
                        "silences this)", first)
            self.compiled_fn = None
            if self.head:
                self.model.compile_head(False)
                self.head = False
            return self._step(x, y, states, False, inject_nan)
        self._proven = True
        return out

    def _step(self, x, y, states, use_compiled: bool, inject_nan: bool):
        K, m = self.accum, self.micro
        loss_fn = self.compiled_fn if use_compiled else forward_loss
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=self.device)
        new_states = list(states)
        for k in range(K):
            xs, ys = x[:, k * m : (k + 1) * m], y[:, k * m : (k + 1) * m]
            sync = self.net.no_sync() if self.dist.enabled and k < K - 1 else nullcontext()
            with sync:
                nll, total, state = loss_fn(self.net, xs, ys, states[k], self.device, self.precision, self.terms,
                                            self.scores_targets)
                if inject_nan:
                    nll, total = nll * float("nan"), total * float("nan")
                scaled = total / K
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            new_states[k] = detach_state(state)
            step_loss += nll.detach() / K
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip if self.clip else float("inf"))
        ok = torch.isfinite(step_loss) & torch.isfinite(gnorm)
        self._apply(ok)
        # A non-finite step must not poison the carried state either: a skipped step keeps the state it started from.
        new_states = [_select(ok, new, old) for new, old in zip(new_states, states, strict=True)]
        okf = ok.float()
        self.consec_bad = (self.consec_bad + 1) * (1 - okf)
        self.worst_bad = torch.maximum(self.worst_bad, self.consec_bad)
        return ok, step_loss, gnorm.float(), new_states

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

    def worst_bad_streak(self) -> int:
        return int(self.worst_bad.item())  # one host sync: the loop calls it once per interval on GPUs

    def state_dict(self) -> Dict[str, Any]:
        """The bad-step streaks (the max over ranks) and the fp16 grad scaler. Collective under DDP."""
        bad = self.dist.all_max(torch.stack([self.consec_bad, self.worst_bad]).float())
        st: Dict[str, Any] = {"bad": bad.cpu()}
        if self.scaler:
            st["scaler"] = self.scaler.state_dict()
        return st

    def load_state_dict(self, st: Dict[str, Any]) -> None:
        bad = st["bad"].to(self.device)
        self.consec_bad, self.worst_bad = bad[0].clone(), bad[1].clone()
        if self.scaler and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
