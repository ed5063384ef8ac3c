"""What a run says about itself: its name, the settings that ran (resolved, and only those that act), the
library versions and the code's git commit. TensorBoard, metrics.json and train.log all read it from here.

Importing this module is cheap (no torch, no Hydra): the run-name resolver runs while Hydra composes.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .config import conf_dir, flatten, to_dict

# Overrides that say where files go or how a run is watched, not what it is: never part of a run's name.
NOT_IN_NAME = frozenset({
    "run_name", "trainer.resume", "trainer.init_from", "trainer.progress", "trainer.log_interval",
    "trainer.sample_words", "trainer.checkpoint_every", "trainer.checkpoint_minutes", "trainer.dist_timeout_s",
    "data.root", "data.cache", "data.cache_dir", "data.url", "data.checksum", "sweep.objective",
})
NAME_MAX = 80  # characters of a run name kept in its folder's name


@functools.lru_cache(maxsize=None)
def default_groups() -> Dict[str, str]:
    """The config groups' default choices (conf/config.yaml's defaults list): ``{"model": "lstm", ...}``."""
    out: Dict[str, str] = {}
    text = (conf_dir() / "config.yaml").read_text()
    for m in re.finditer(r"^\s+-\s+(\w+):\s*(\S+)\s*$", text, re.M):
        out[m.group(1)] = m.group(2)
    return out


def run_name(given: Any, overrides: Iterable[str], flat: Optional[Dict[str, Any]] = None) -> str:
    """``run_name=`` when set; else the command line's overrides that change the run, e.g.
    ``model=transformer,optim=adamw`` (a group set to its default, paths, logging and resume keys are left
    out, and, given the run's ``flat`` config, keys that do nothing in it; a path keeps its last part);
    ``defaults`` when nothing is left."""
    if given not in (None, ""):
        return str(given)
    groups = default_groups()
    parts = []
    for o in overrides:
        key, sep, value = str(o).partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra.") or key in NOT_IN_NAME or (flat is not None and not acts(key, flat)):
            continue
        if "." not in key and groups.get(key) == value:
            continue
        if "/" in value:
            value = value.rstrip("/").rsplit("/", 1)[-1]
        if re.fullmatch(r"-?\d+\.\d{5,}(e[-+]?\d+)?", value):  # a sweeper's sampled 8.344221972306672: 4 digits
            value = f"{float(value):.4g}"
        parts.append(f"{key}={value}")
    return ",".join(parts) or "defaults"


def folder_name(name: str) -> str:
    """A run name as part of a folder name, which Hydra's override grammar and shells take unquoted:
    ``model=transformer,optim.lr=0.001`` -> ``model-transformer_lr-0.001`` (keys without their section); a
    long one keeps its start and its end (where a sweep's changing values are), joined by ``__``."""
    short = ",".join(re.sub(r"^[\w]+\.(?=[\w.]+=)", "", part) for part in name.split(","))
    safe = re.sub(r"[^A-Za-z0-9._+-]", lambda m: {"=": "-", ",": "_"}.get(m.group(), "_"), short).strip("._-")
    if len(safe) > NAME_MAX:
        head = NAME_MAX // 2
        safe = safe[:head].rstrip("._-") + "__" + safe[-(NAME_MAX - head - 2):].lstrip("._-")
    return safe or "run"


def dir_suffix(given: Any, overrides: Any, _root_: Any = None) -> str:
    """Hydra resolver behind ``hydra.run.dir``: ``_<folder name>`` of the run name (``_root_``: the composed
    config, so that keys which do nothing in this run stay out of the name)."""
    flat = None
    if _root_ is not None:
        try:
            from omegaconf import OmegaConf

            values = OmegaConf.to_container(_root_, resolve=False)
            flat = flatten({k: v for k, v in values.items() if k != "hydra"})
        except Exception:  # noqa: BLE001 - a name without that refinement is still a name
            flat = None
    return "_" + folder_name(run_name(given, list(overrides or []), flat))


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("wordlm_run_suffix"):
        OmegaConf.register_new_resolver("wordlm_run_suffix", dir_suffix)


# ---------------------------------------------------------------------------- the settings that ran
def acts(key: str, flat: Dict[str, Any]) -> bool:
    """Whether ``key`` of a flattened config changes anything in this run (``optim.momentum`` does nothing
    for AdamW, ``optim.anneal`` nothing for a cosine schedule)."""
    o = lambda k: flat.get(f"optim.{k}")  # noqa: E731
    rules = {
        "optim.momentum": o("name") == "sgd",
        "optim.nesterov": o("name") == "sgd",
        "optim.betas": o("name") == "adamw",
        "optim.eps": o("name") == "adamw",
        "optim.anneal": o("schedule") == "plateau",
        "optim.warmup_steps": o("schedule") in ("cosine", "constant"),
        "optim.min_lr_ratio": o("schedule") == "cosine",
        "optim.schedule_over": o("schedule") == "cosine",
        "optim.nonmono": bool(o("ntasgd") or o("finetune")),
        "trainer.debug_nan_steps": flat.get("trainer.debug_nan_at_step") is not None,
        "data.dir": flat.get("data.name") == "custom" or flat.get("data.dir") is not None,
        "data.cache_dir": bool(flat.get("data.cache")),
    }
    final = flat.get("trainer.final_eval")
    if key.startswith("cache."):  # trainer.final_eval's settings (their `enabled` is evaluate.py's switch)
        return key != "cache.enabled" and final in ("cache", "both")
    if key.startswith("dynamic."):
        return key != "dynamic.enabled" and final in ("dynamic", "both")
    if key.startswith("short_run."):  # off without short_run.epochs; a dropout left null keeps the model's
        return flat.get("short_run.epochs") is not None and flat.get(key) is not None
    if key in ("tune", "tune_tokens"):
        return final in ("cache", "dynamic", "both") and (key == "tune" or bool(flat.get("tune")))
    return rules.get(key, True)


def settings(cfg: Any, resolved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The flattened config as it ran: only keys that act, ``resolved`` values (``trainer.device: cpu``, not
    ``auto``) in place of the requested ones, plus ``resolved``'s extra facts (vocabulary size, parameters)."""
    values = to_dict(cfg)
    if hasattr(cfg.model, "effective"):
        values["model"] = cfg.model.effective()
    flat = flatten(values)
    flat = {k: v for k, v in flat.items() if acts(k, flat)}
    flat.update(resolved or {})
    return dict(sorted(flat.items()))


def hparam_value(v: Any) -> Any:
    """A value as TensorBoard's HPARAMS shows it: booleans stay booleans, numbers numbers, null is "none",
    lists their text."""
    if v is None:
        return "none"
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)


# ---------------------------------------------------------------------------- provenance
def versions() -> Dict[str, Optional[str]]:
    from importlib import metadata

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for dist in ("wordlm", "torch", "hydra-core", "omegaconf", "tensorboard"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


def git_commit(where: Optional[Path] = None) -> Optional[Dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the checkout wordlm's code runs from; None outside one (an
    installed wheel) or without git."""
    src = Path(where or Path(__file__).resolve().parent.parent)
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if not (top / "wordlm" / "record.py").is_file():  # some other repository around an installed package
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None
