"""Device, precision, threads, seeds and RNG state: the parts of a run that are not the model."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Dict, Optional

import torch

from .config import TrainerConfig, UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("trainer.device=cuda but no CUDA GPU is visible: use trainer.device=cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise UserError(f"trainer.device='{name}': use auto|cpu|cuda")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UserError("trainer.precision=fp16 is for CUDA: on CPU use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16: use trainer.precision=fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup(tc: TrainerConfig, device: torch.device) -> None:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> Dict[str, Any]:
    st: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Optional[Dict[str, Any]]) -> None:
    if not st:
        return
    random.setstate(_tuplify(st["python"]))
    torch.set_rng_state(st["torch"].cpu())
    if "cuda" in st and torch.cuda.is_available():
        states = [s.cpu() for s in st["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def _tuplify(x: Any) -> Any:
    # random.setstate wants tuples; a checkpoint round-trip may hand back lists.
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
