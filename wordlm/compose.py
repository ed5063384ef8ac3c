"""A typed :class:`~wordlm.config.Config` from what the outside gives: Hydra's DictConfig, a checkpoint's
plain dict, and the schemas Hydra checks every override against.

The one module that knows both the config sections (``wordlm.config``, which imports nothing of wordlm's) and
the model registry (``wordlm.models``, where each model type's config class lives with the model).
"""

from __future__ import annotations

from typing import Any, List

from . import models
from .config import (
    _SECTIONS,
    RESUMABLE,
    Config,
    EvaluateConfig,
    ExportConfig,
    GenerateConfig,
    build,
    flatten,
    plain,
    to_dict,
    validate,
)
from .record import register_resolver


def from_dict(values: dict) -> Config:
    """Rebuild a Config from plain containers (e.g. a checkpoint's): the model's config class from its name."""
    name = values.get("run_name")
    return Config(model=models.config_from_dict(values.get("model") or {}),
                  run_name=None if name is None else str(name),
                  **{name: build(cls, values.get(name)) for name, cls in _SECTIONS.items()})


def to_config(dictconfig: Any) -> Config:
    """Hydra DictConfig -> typed, validated Config (the boundary: nothing below the entry points sees Hydra)."""
    cfg = from_dict(plain(dictconfig))
    validate(cfg)
    return cfg


def resume_conflicts(saved: dict, cfg: Config) -> List[tuple]:
    """(key, checkpoint's value, this command's value) for each run-defining key that differs."""
    # A key the checkpoint's wordlm did not have yet counts as its default (a model type's LEGACY value): the
    # behaviour that wordlm had. Changing it on resume is a change like any other.
    old = {**flatten(to_dict(from_dict(saved))), **flatten(saved)}
    new = flatten(to_dict(cfg))
    out = []
    stateless = models.model_class(cfg.model.name).stateless
    acting = {f"model.{k}" for k in cfg.model.effective()}  # (a model key that does nothing here cannot conflict)
    for key, value in new.items():
        if key in RESUMABLE or key not in old or (key == "trainer.eval_context" and not stateless) or (
                key.startswith("model.") and key not in acting):
            continue  # (eval_context only shapes a stateless model's evaluation windows)
        a, b = old[key], value
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b or (isinstance(a, (list, tuple)) and list(a) == list(b or []))
        if not same:
            out.append((key, a, b))
    return out


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore: typos and wrong types fail before training."""
    from hydra.core.config_store import ConfigStore  # (Hydra: only the entry points that compose need it)
    from omegaconf import MISSING

    register_resolver()  # hydra.run.dir names the run's folder with it
    cs = ConfigStore.instance()
    cs.store(name="wordlm_schema", node=Config(model=MISSING))  # conf/model/<name>.yaml fills model
    for name in models.names():  # each model YAML extends its own type's schema: /schema/model/<name>
        cs.store(group="schema/model", name=name, node=models.config_class(name)(name=name))
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
