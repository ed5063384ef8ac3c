"""Checkpoints: plain containers and tensors only, written atomically, read with weights_only=True.

A checkpoint alone rebuilds the model: it carries the model's state_dict, the resolved
config as plain dicts, and the vocabulary as a list of words; for resuming, also the
trainer's and optimizer's state and the RNG states. Nothing in it is ever executed.
"""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .compose import from_dict
from .config import Config, UserError, to_dict
from .data.vocab import Vocab
from .models import build_model, config_from_dict

FORMAT = "wordlm-checkpoint"
VERSION = 2  # 2: trainer state by part (position in tokens, meter, step, schedule, callbacks); 1 is upgraded


def save(path: os.PathLike, payload: Dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: temp file in the same folder, fsync, rename, fsync folder.

    A crash at any moment leaves either the previous complete file or the new complete one.
    """
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    done = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:
        io = _io_error(e)  # torch.save's zip writer may turn a failed write into a RuntimeError on cleanup
        if io is None and "write" not in str(e).lower():
            raise  # not an I/O failure: a bug, keep the traceback
        if io is not None and io.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "the disk is full"
        elif io is not None:
            what = io.strerror or str(io)
        else:
            what = str(e).strip().splitlines()[-1]
        raise UserError(
            f"cannot write checkpoint {path}: {what}; the previous checkpoint is kept. "
            f"Free space or make the folder writable (or choose another with hydra.run.dir=...)"
        ) from None
    finally:
        if not done:
            try:
                tmp.unlink()
            except OSError:
                pass


def _io_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e`` (itself or an exception it was raised while handling), if any."""
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _verify(path: Path) -> None:
    """Every member of the archive against the CRC the zip stored when it was written: a flipped byte in a tensor
    (a bad disk, a bad copy) is caught here, never read as a weight."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{path} is not a complete checkpoint (truncated or corrupt: {e}); use another one, e.g. "
                        f"checkpoints/best.pt") from None
    if bad is not None:
        raise UserError(f"{path} is damaged: {bad} no longer matches the checksum written with it (the file changed "
                        f"on disk or in a copy); use another checkpoint, e.g. checkpoints/best.pt")


def load(path: os.PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``, every tensor mapped to ``map_location``."""
    path = Path(path)
    if path.is_dir():
        found = [c for c in (path / "best.pt", path / "checkpoints" / "best.pt") if c.is_file()]
        raise UserError(f"{path} is a folder, not a checkpoint file: pass the .pt file itself, e.g. "
                        f"{found[0] if found else path / 'checkpoints' / 'best.pt'}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path (runs keep them in <run>/checkpoints/)")
    if not zipfile.is_zipfile(path):
        # torch.load falls back to plain unpickling for non-zip files, whose errors on arbitrary bytes
        # (KeyError, ...) say nothing about checkpoints; wordlm always writes torch.save's zip format.
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":
            raise UserError(f"{path} is not a complete checkpoint (truncated or corrupt: the zip archive has no end); "
                            f"use another one, e.g. checkpoints/best.pt")
        raise UserError(f"{path} is not a wordlm checkpoint (not a torch.save archive): "
                        f"pass a .pt file written by train.py, e.g. <run>/checkpoints/best.pt")
    _verify(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise UserError(
                f"refusing {path}: it holds pickled Python objects, which could run code; "
                f"only wordlm checkpoints (tensors and plain containers) are loaded"
            ) from None
        raise UserError(f"{path} is not a readable checkpoint ({first}): it may be truncated or corrupt") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} is not a complete checkpoint (truncated or corrupt: {first}); "
            f"use another one, e.g. checkpoints/best.pt"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{path} is not a wordlm checkpoint (no '{FORMAT}' marker)")
    version = ck.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise UserError(f"{path} is a wordlm checkpoint of format version {version!r}, and this wordlm reads "
                        f"versions 1 to {VERSION}: use the wordlm release that wrote it (or a newer one)")
    for key in ("model", "config", "vocab"):
        if key not in ck:
            raise UserError(f"{path} is an incomplete wordlm checkpoint: '{key}' is missing")
    if version == 1 and "trainer" in ck:
        ck = _upgrade_v1(ck)
    return ck


def _upgrade_v1(ck: Dict[str, Any]) -> Dict[str, Any]:
    """Format 1 kept the trainer state flat and counted windows; format 2 keeps it by part, in tokens."""
    old = ck["trainer"]
    iv = old["interval"]
    step_fn = {"bad": iv["bad"]}
    if "scaler" in ck:
        step_fn["scaler"] = ck["scaler"]
    ck["trainer"] = {
        "step": old["step"], "epoch": old["epoch"], "pos": int(old["window"]) * int(old["bptt"]),
        "best_val": old["best_val"], "validated_at": old["step"] if int(old["window"]) == 0 else -1,
        "bad_total": old["bad_total"], "seconds": old["train_seconds"], "world": old["world"],
        "columns": old["columns"], "bptt": old["bptt"], "state": old["state"],
        "meter": {"sums": iv["sums"], "steps": iv["steps"], "tokens": iv["tokens"]},
        "throughput": {"tokens": old["timed_tokens"], "seconds": old["timed_seconds"]},
        "step_fn": step_fn, "schedule": old.get("schedule") or {"plateau_lr": ck["config"]["optim"]["lr"]},
        "windows": {}, "callbacks": [], "rng": old.get("rng"),
    }
    return ck


@dataclass
class Loaded:
    """What a checkpoint rebuilds: the config, the vocabulary and a model with its weights."""

    config: Config
    vocab: Vocab
    model: torch.nn.Module
    raw: Dict[str, Any]
    weights: str = "trained"  # which weights the model holds: "trained", or the averages the run validated


def need_checkpoint(path: str | None, command: str) -> Path:
    if not path:
        raise UserError(f"checkpoint=PATH is required, e.g. python {command} "
                        f"checkpoint=outputs/<run>/checkpoints/best.pt")
    p = Path(path).expanduser()
    if p.is_dir():
        found = [c for c in (p / "best.pt", p / "checkpoints" / "best.pt") if c.is_file()]
        hint = f"e.g. checkpoint={found[0]}" if found else "e.g. checkpoint=<run>/checkpoints/best.pt"
        raise UserError(f"checkpoint={path} is a folder, not a checkpoint file: pass the .pt file itself, {hint}")
    return p


def load_model(path: os.PathLike, device: Any = "cpu") -> Loaded:
    ck = load(path, map_location=device)
    cfg = from_dict(ck["config"])
    cfg.model = config_from_dict(ck["config"].get("model"), strict=True, where=str(path))
    try:
        vocab = Vocab(ck["vocab"])
    except ValueError as e:
        raise UserError(f"{path} holds a malformed vocabulary: {e}") from None
    model = build_model(cfg.model, len(vocab))
    # last.pt of a run that averages (NT-ASGD) holds the averaged weights it validated beside the raw ones it
    # trains on: a checkpoint is scored, sampled and exported with the weights its run validated.
    validated = ck.get("validated_model")
    load_weights(model, validated if validated is not None else ck["model"], str(path))
    model.to(device)
    return Loaded(cfg, vocab, model, ck, "averaged (as the run validated them)" if validated is not None else "trained")


# Model keys that change what weights of the same shapes compute (init_from refuses a checkpoint that differs).
COMPUTES = ("norm_first", "activation", "positions", "bias", "tied", "softmax", "adaptive_input")


def init_from(model: torch.nn.Module, vocab: Vocab, path: Any) -> None:
    """``trainer.init_from``: a new run starts from a checkpoint's model weights (nothing else of it)."""
    p = Path(str(path)).expanduser()
    ck = load(p)
    theirs = config_from_dict(ck["config"].get("model"), where=f"trainer.init_from={path}")
    ours = getattr(model, "cfg", None)
    if ours is not None:  # the shapes are load_weights' to check; these keys change what the same shapes compute
        keys = [k for k in ("name", *COMPUTES) if hasattr(theirs, k) and hasattr(ours, k)
                and getattr(theirs, k) != getattr(ours, k)]
        if keys:
            shown = ", ".join(f"model.{k}: {getattr(theirs, k)!r} there, {getattr(ours, k)!r} here" for k in keys[:4])
            raise UserError(f"trainer.init_from={path} holds another model ({shown}): use that run's model settings "
                            f"(or its experiment=...)")
    if ck["vocab"] != vocab.itos:
        raise UserError(f"trainer.init_from={path} was trained with another vocabulary ({len(ck['vocab'])} words, "
                        f"this corpus gives {len(vocab)}): use the same data settings as that run")
    validated = ck.get("validated_model")  # (an averaging run's last.pt: the averages it validated)
    load_weights(model, validated if validated is not None else ck["model"], f"trainer.init_from={path}")


def load_weights(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with a one-line error when shapes or keys do not match the model asked for."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:3]))
        if missing:
            parts.append("missing " + ", ".join(missing[:3]))
        if extra:
            parts.append("unexpected " + ", ".join(extra[:3]))
        raise UserError(
            f"{where} does not fit this model ({'; '.join(parts)}): "
            f"use the model settings the checkpoint was trained with"
        )
    model.load_state_dict(state)


def payload(cfg: Config, vocab: Vocab, model_state: Dict[str, torch.Tensor],
            extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    out = {"model": model_state, "config": to_dict(cfg), "vocab": list(vocab.itos)}
    if extra:
        out.update(extra)
    return out
