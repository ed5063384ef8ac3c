"""Plug-in points of the loop: a recipe adds behaviour here, never by editing ``Trainer.fit``.

A :class:`Callback` hears the loop's events and may change the run through the trainer's public
handles: ``trainer.set_optimizer`` (an optimizer phase, e.g. NT-ASGD's switch to averaged SGD),
``trainer.schedule``, ``trainer.model``. :meth:`Callback.eval_weights` swaps other weights in for
validation, ``best.pt`` and the test (weight averaging); :meth:`Callback.metrics` adds what it did to
metrics.json. Everything it needs to continue exactly after a resume goes in its ``state_dict``; its
``load_state_dict`` runs before the optimizer's state is loaded, so a phase that replaced the optimizer
replaces it again first.

:class:`WindowLength` decides each step's BPTT length (variable-length BPTT) and by how much the
learning rate scales for that step.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..trainer import Trainer


class Callback:
    """Every method is optional: the base class does nothing."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer") -> None:
        """After each optimizer step (``trainer.step`` already counts it)."""

    def on_validation_end(self, trainer: "Trainer", loss: float, improved: bool) -> None:
        """After each scheduled validation (epoch ends and ``trainer.eval_every``), before checkpoints."""

    def eval_weights(self, trainer: "Trainer") -> contextlib.AbstractContextManager:
        """A context in which ``trainer.model`` holds the weights to validate, keep as best and test."""
        return contextlib.nullcontext()

    def metrics(self) -> Dict[str, Any]:
        """What it did, for metrics.json (merged in at the run's end)."""
        return {}

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any], trainer: "Trainer") -> None: ...


class WindowLength:
    """Fixed BPTT windows (the classic example): every step is ``bptt`` tokens long, lr unscaled."""

    def __init__(self, bptt: int):
        self.bptt = bptt

    def next(self, step: int) -> Tuple[int, float]:
        """(this step's window length, the factor its learning rate is scaled by)."""
        return self.bptt, 1.0

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


@contextlib.contextmanager
def swapped_weights(model: torch.nn.Module, weights: Optional[Dict[str, torch.Tensor]]) -> Iterator[None]:
    """``model`` holds ``weights`` (a name -> tensor map of some of its parameters) inside the block."""
    if not weights:
        yield
        return
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in weights}
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
