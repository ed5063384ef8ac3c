"""The interface every model answers, and the registry that maps ``model.name`` to a class and its config
(see the package's docstring).

The built-in types (``rnn.py``, ``transformer.py``) import this module; the package imports them, so
``import wordlm.models`` registers them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from ..config import ModelConfig, UserError
from .words import check_cutoffs

_REGISTRY: Dict[str, Tuple[Type["LanguageModel"], Type[ModelConfig]]] = {}


class LanguageModel(nn.Module):
    """What every registered model provides besides ``forward``."""

    # Whether ``forward`` takes ``targets=`` (see the module's docstring). A model that does not is given the
    # full log-probs' gather instead, so a new model type needs only the log-probs.
    scores_targets: bool = False
    # Whether the model carries no state between windows (the transformer): its evaluation windows then take
    # history from the previous window (trainer.eval_context); a model with a state carries it instead.
    stateless: bool = False

    def init_state(self, batch_size: int, device=None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, vocab_size: int, bptt: int) -> float:
        """Forward matmul FLOPs of one token (MFU and the auto-compile decision use 3x this for training)."""
        raise NotImplementedError

    @classmethod
    def compiles_well(cls, cfg: ModelConfig) -> bool:
        """Whether torch.compile may compile this model's whole step: False where that is known to cost more
        than it gives; such a model compiles its scoring head instead (:meth:`compile_head`), or, without one, its
        whole step only when ``trainer.compile=true`` says so (``wordlm.training.step.compile_plan``)."""
        return True

    def compile_head(self, on: bool = True) -> bool:
        """Compile only the scoring of training targets (:meth:`~wordlm.models.words.Softmax.compile_scoring`),
        or stop; False where the model has no such head (an adaptive softmax: data-dependent shapes). The trainer
        asks for it where it does not compile the whole step (a layered RNN, variable-length windows)."""
        scoring = getattr(getattr(self, "decoder", None), "compile_scoring", None)
        if scoring is None:
            return False
        scoring(on)
        return True

    @classmethod
    def changeable_dropouts(cls, cfg: ModelConfig) -> Tuple[str, ...]:
        """The dropout keys :meth:`set_dropouts` can change during a run (``short_run``): none by default."""
        return ()

    def set_dropouts(self, **ps: float) -> None:
        """Train on from now with these dropout probabilities (keys of :meth:`changeable_dropouts`); the model's
        config keeps the ones it was built with."""
        raise UserError(f"{type(self).__name__} cannot change its dropouts during a run ({', '.join(ps)})")

    @classmethod
    def classic_args(cls, cfg: ModelConfig) -> List[str]:
        """The classic example's command-line flags for this model (the benchmark's baseline)."""
        raise NotImplementedError


def register(*names: str, config: Type[ModelConfig]) -> Callable[[type], type]:
    """Class decorator: ``model.name`` in ``names`` builds this class from a ``config`` instance."""

    def deco(cls: type) -> type:
        for n in names:
            _REGISTRY[n] = (cls, config)
        return cls

    return deco


def names() -> List[str]:
    return sorted(_REGISTRY)


def _entry(name: str):
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}': use model={'|'.join(names())}")
    return _REGISTRY[name]


def model_class(name: str) -> Type[LanguageModel]:
    return _entry(name)[0]


def config_class(name: str) -> Type[ModelConfig]:
    return _entry(name)[1]


def model_config(name: str = "lstm", **values: Any) -> ModelConfig:
    """The config dataclass of model ``name`` with ``values``; keys it does not know are a UserError."""
    cls = config_class(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"model={name} has no setting {', '.join('model.' + k for k in unknown)}")
    return cls(name=name, **values)


def config_from_dict(values: Dict[str, Any], strict: bool = False, where: str = "the checkpoint") -> ModelConfig:
    """Rebuild a model config from plain values (a checkpoint's): keys the type lacks are dropped.

    ``strict``: every key of the type must be there, so a checkpoint's model is rebuilt from its own
    config alone, never from today's defaults. A key added to a type after checkpoints without it were
    written is declared in the type's ``LEGACY`` (key -> the value that reproduces those checkpoints).
    """
    values = dict(values or {})
    cls = config_class(values.get("name", "lstm"))
    known = {f.name for f in dataclasses.fields(cls)}
    if strict:
        missing = sorted(known - set(values) - set(getattr(cls, "LEGACY", {})))
        if missing:
            raise UserError(f"{where} does not say its model's {', '.join('model.' + k for k in missing)}: it was not "
                            f"written by wordlm (or is damaged); it cannot be rebuilt without guessing")
    values = {**getattr(cls, "LEGACY", {}), **values}
    return cls(**{k: v for k, v in values.items() if k in known})


def validate_model(cfg: ModelConfig) -> None:
    _entry(cfg.name)
    cfg.validate()


def build_model(cfg: ModelConfig, vocab_size: int) -> LanguageModel:
    cls, conf = _entry(cfg.name)
    if not isinstance(cfg, conf):  # e.g. a plain ModelConfig: take its values into the type's own config
        cfg = conf(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                      if f.name in {g.name for g in dataclasses.fields(conf)}})
    cfg.validate()
    check_cutoffs(cfg, vocab_size)
    return cls(cfg, vocab_size)


def target_log_probs(model: nn.Module, x: torch.Tensor, state: Any, y: torch.Tensor, aux: bool = False,
                     scores_targets: Optional[bool] = None):
    """``model(x, state[, aux=True])`` with the log-prob of each target ``y`` (T, B) in place of the full (T, B, V)
    log-probs: the model's own target path where it has one (``scores_targets``; pass it for a wrapped model,
    e.g. DDP's), else a gather from the full log-probs."""
    if scores_targets is None:
        scores_targets = getattr(model, "scores_targets", False)
    kw = {"aux": True} if aux else {}
    if scores_targets:
        return model(x, state, targets=y, **kw)
    out = model(x, state, **kw)
    return (out[0].gather(-1, y.unsqueeze(-1)).squeeze(-1), *out[1:])


def train_flops_per_token(cfg: ModelConfig, vocab_size: int, bptt: int) -> float:
    """Model FLOPs of one training token: 3 x the forward matmul FLOPs (forward + 2 for backward)."""
    return 3 * model_class(cfg.name).flops_per_token(cfg, vocab_size, bptt)


def detach_state(state: Any) -> Any:
    """Cut the graph between BPTT windows; works for None, a tensor or a tuple of tensors."""
    return map_state(state, lambda t: t.detach())


def map_state(state: Any, fn) -> Any:
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return tuple(map_state(s, fn) for s in state)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
