"""Device, precision, threads, seeds and RNG state: the parts of a run that are not the model."""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import Any, Dict, Optional

import torch

from .config import TrainerConfig, UserError


def resolve_device(name: str, local_rank: int = 0, key: str = "trainer.device") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}=cuda but no CUDA GPU is visible: use {key}=cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name != "cpu":
        raise UserError(f"{key}='{name}': use auto|cpu|cuda")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """Does this CPU do bf16 arithmetic in hardware (AVX512-BF16 or AMX)? Linux only; elsewhere False."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device, key: str = "trainer.precision") -> str:
    """auto: bf16 autocast where the hardware has it (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise UserError(f"{key}='{name}': use auto|fp32|bf16|fp16")
    if name == "fp16" and device.type == "cpu":
        raise UserError(f"{key}=fp16 is for CUDA: on CPU use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"this GPU has no bf16: use {key}=fp16 or fp32")
    return name


# trainer.compile=null compiles runs whose eager training would take longer than this (estimated from the
# model FLOPs at a rough device speed): compilation costs 0.5-3 minutes on a CPU, a minute or so on a GPU.
COMPILE_MIN_SECONDS = 300
ROUGH_FLOPS = {"cpu": 1e11, "cuda": 1e13}


def resolve_compile(flag, device: torch.device, train_flops: float) -> bool:
    if flag is None:
        flag = train_flops / ROUGH_FLOPS.get(device.type, 1e11) > COMPILE_MIN_SECONDS
    if flag and device.type == "cpu":
        import torch._dynamo

        # On CPU, tracing through nn.LSTM/GRU/RNN lets inductor fuse the whole step (about 2x faster
        # here); on CUDA the cuDNN kernels are better left alone.
        torch._dynamo.config.allow_rnn = True
        separate_inductor_cache()
    return bool(flag)


def separate_inductor_cache() -> None:
    """Give inductor's compile cache a subfolder per CPU vector ISA (``<TORCHINDUCTOR_CACHE_DIR>/isa-avx512vnni``).

    Inductor's FX graph cache is not keyed by the ISA its C++ kernels were generated for (torch 2.13): a graph
    compiled with AVX2 (8-lane loops; ``ATEN_CPU_CAPABILITY=avx2``, or a cache folder shared with an AVX2 machine)
    and then served on an AVX-512 CPU is rebuilt there with 16-lane vectors but keeps its 8-lane loop bounds, and
    writes past its buffers: the process dies of heap corruption ("double free or corruption", measured with
    ``experiment=cpu_20min``). One folder per ISA keeps such kernels apart; a user's own TORCHINDUCTOR_CACHE_DIR
    is kept as the parent. Nothing is deleted."""
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # read first: inductor writes its default into it when used
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        isa = pick_vec_isa()
        base = os.path.abspath(base or default_cache_dir())
    except Exception:  # an inductor without these helpers: leave its cache as it is
        return
    key = "isa-" + (type(isa).__name__.lower().removeprefix("vec") if isa else "scalar")
    if os.path.basename(base) != key:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, key)


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


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on ``device`` (MemAvailable on Linux CPUs), or None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: Optional[int] = None,
                reps: Optional[int] = None, tries: int = 5) -> float:
    """Measured dense matmul FLOP/s on this device and dtype (best of ``tries``): the denominator of MFU."""
    cuda = device.type == "cuda"
    n = n or (4096 if cuda else 1024)
    reps = reps or (20 if cuda else 4)
    gen = torch.Generator(device=device).manual_seed(0)  # private: the training RNG streams stay untouched
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    best = 0.0
    for _ in range(tries):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated tensors on a GPU, the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def check_memory(build: Any, device: torch.device, optim_name: str, tokens_per_step: int, vocab: int,
                 dynamic_tokens: int = 0) -> int:
    """Estimate a training run's memory before allocating anything; refuse one that cannot fit.

    ``build()`` makes the model; it runs on the meta device (no memory) to count parameters. The estimate is
    weights + gradients + optimizer state (1 extra copy for SGD, 2 for AdamW) in fp32, plus the (T, B, V)
    log-probs and their gradients (the largest activations of a word-level LM), times 1.2 for the rest.
    ``dynamic_tokens``: the run ends with dynamic evaluation (``trainer.final_eval``), whose batches of gradient
    statistics hold that many tokens; it keeps 7 copies of the weights (weights, gradients, the trained weights,
    the gradient statistics, three precomputed terms of the update), checked here too so the run does not fail at
    its end.
    """
    with torch.device("meta"):
        model = build()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    states = 2 if optim_name == "adamw" else 1
    need = int(1.2 * (4 * params * (2 + states) + 3 * 4 * tokens_per_step * vocab))
    have = available_memory(device)
    if have is not None and need > have:
        raise UserError(f"this model does not fit in memory: {params / 1e6:,.1f}M parameters need about "
                        f"{need / 2**30:,.1f} GiB to train (weights, gradients, optimizer state, log-probs), and "
                        f"{device} has {have / 2**30:,.1f} GiB available: use smaller model sizes or "
                        f"trainer.batch_size")
    dyn = int(1.2 * (4 * params * 7 + 3 * 4 * dynamic_tokens * vocab)) if dynamic_tokens else 0
    if have is not None and dyn > have:
        raise UserError(f"trainer.final_eval asks for dynamic evaluation, which for this model needs about "
                        f"{dyn / 2**30:,.1f} GiB (7 copies of {params / 1e6:,.1f}M weights, and gradient statistics) "
                        f"and {device} has {have / 2**30:,.1f} GiB available: use trainer.final_eval=static or cache, "
                        f"and run evaluate.py dynamic.enabled=true where there is more memory")
    return max(need, dyn)
