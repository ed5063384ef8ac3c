"""Benchmark real training steps through the real Trainer, beside the classic example's loop.

    python -m wordlm.bench --data ../shared/data/wikitext-2-small \\
        --baseline ../shared/bench/seed_baseline.py --repeats 3 \\
        -c "model=lstm" -c "model=transformer"

Each ``-c`` is one config, as Hydra overrides. For each, wordlm and (with ``--baseline``)
the baseline run alternately, each in a fresh subprocess, ``--repeats`` times; the
medians are printed as one JSON line per config: training tokens/s, ms/step, peak
memory, model FLOPs utilisation (achieved model FLOP/s / a matmul peak measured on
the same device and dtype), evaluation tokens/s, generation words/s, the baseline's
tokens/s and the ratio. Timings are ratios on the same machine, never absolute claims.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .models import model_class, train_flops_per_token
from .runtime import matmul_peak, peak_memory_mb


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(overrides: List[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from .cli import CONF_DIR
    from .config import register_configs, to_config

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(hcompose(config_name="config", overrides=overrides))


def measure_one(overrides: List[str], steps: int, warmup: int) -> Dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of the real Trainer, plus eval and sampling."""
    import tempfile

    from .data import get_window
    from .data.datasets import load_corpus
    from .sampling import generate
    from .trainer import Trainer

    cfg = compose([*overrides, "trainer.progress=false", "trainer.sample_words=0"])
    corpus = load_corpus(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, corpus, Path(tmp))
    tc, dev = cfg.trainer, t.device
    n_windows = t.steps_per_epoch
    bptt = tc.bptt

    def run(k0: int, n: int) -> int:
        tokens = 0
        for k in range(k0, k0 + n):
            x, y = get_window(t.train_data, (k % n_windows) * bptt, bptt)
            t.train_step(x, y)
            tokens += x.numel()
        return tokens

    run(0, warmup)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    tokens = run(warmup, steps)
    _sync(dev)
    dt = time.perf_counter() - t0
    tps = tokens / dt

    # Evaluation: the first windows of the validation split.
    data = t.eval_data["valid"][: 40 * bptt + 1]
    from .scoring import nll

    nll(t.model, data[: 2 * bptt + 1], bptt, dev, t.eval_precision)
    _sync(dev)
    t0 = time.perf_counter()
    nll(t.model, data, bptt, dev, t.eval_precision)
    _sync(dev)
    eval_tps = (data.size(0) - 1) * data.size(1) / (time.perf_counter() - t0)

    # Generation: words/s of the sampler (one stream).
    gen = torch.Generator(device=dev.type).manual_seed(0)
    n_words = 100
    generate(t.model, [corpus.vocab.eos], 5, dev, start=corpus.vocab.eos, context=bptt, generator=gen)
    t0 = time.perf_counter()
    generate(t.model, [corpus.vocab.eos], n_words, dev, start=corpus.vocab.eos, context=bptt, generator=gen)
    _sync(dev)
    gen_wps = n_words / (time.perf_counter() - t0)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision, torch.float32)
    peak = matmul_peak(dev, dtype)
    flops = train_flops_per_token(cfg.model, len(corpus.vocab), bptt)
    mem_mb = peak_memory_mb(dev)
    return {
        "tokens_per_sec": tps, "ms_per_step": 1000 * dt / steps, "peak_mem_mb": mem_mb,
        "mfu": flops * tps / peak, "matmul_peak_tflops": peak / 1e12, "model_tflops": flops * tps / 1e12,
        "eval_tokens_per_sec": eval_tps, "gen_words_per_sec": gen_wps, "device": str(dev),
        "precision": t.precision, "threads": torch.get_num_threads(), "params": t.params,
        "compile": t.step_fn.compiled,
    }


def baseline_args(overrides: List[str], steps: int, warmup: int) -> List[str]:
    cfg = compose(overrides)
    from .data.datasets import corpus_dir

    m, tc = cfg.model, cfg.trainer
    return ["--data", str(corpus_dir(cfg.data)), *model_class(m.name).classic_args(m), "--lr", str(cfg.optim.lr),
            "--clip", str(tc.clip or 0), "--batch-size", str(tc.batch_size), "--bptt", str(tc.bptt), "--steps",
            str(steps), "--warmup", str(warmup), "--seed", str(tc.seed)]


def _subprocess_json(cmd: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"wordlm.bench: {shlex.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Benchmark wordlm training beside the classic example's loop.")
    ap.add_argument("-c", "--config", action="append", default=None,
                    help="Hydra overrides for one config, quoted (repeatable); default: the default config")
    ap.add_argument("--data", help="corpus folder (train/valid/test.txt): adds data=custom data.dir=DATA")
    ap.add_argument("--baseline", help="path to seed_baseline.py, timed beside wordlm")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # worker mode: JSON list of overrides
    a = ap.parse_args(argv)

    if a.one is not None:
        print(json.dumps(measure_one(json.loads(a.one), a.steps, a.warmup)))
        return

    env = {**os.environ}
    for cfg_str in a.config or [""]:
        overrides = shlex.split(cfg_str)
        if a.data:
            overrides = ["data=custom", f"data.dir={a.data}", *overrides]
        ours: List[Dict[str, Any]] = []
        base: List[float] = []
        for _ in range(a.repeats):  # alternate, so drifting machine load hits both alike
            ours.append(_subprocess_json([sys.executable, "-m", "wordlm.bench", "--one", json.dumps(overrides),
                                          "--steps", str(a.steps), "--warmup", str(a.warmup)], env))
            if a.baseline:
                b = _subprocess_json([sys.executable, a.baseline, *baseline_args(overrides, a.steps, a.warmup)],
                                     env)
                base.append(b["tokens_per_sec"])
        row: Dict[str, Any] = {"config": cfg_str or "(defaults)", "repeats": a.repeats}
        for k in ("tokens_per_sec", "ms_per_step", "peak_mem_mb", "mfu", "matmul_peak_tflops", "model_tflops",
                  "eval_tokens_per_sec", "gen_words_per_sec"):
            row[k] = round(statistics.median(r[k] for r in ours), 4)
        for k in ("device", "precision", "threads", "params", "compile"):
            row[k] = ours[0][k]
        row["runs_tokens_per_sec"] = [round(r["tokens_per_sec"], 1) for r in ours]
        if base:
            row["baseline_tokens_per_sec"] = round(statistics.median(base), 1)
            row["runs_baseline_tokens_per_sec"] = [round(b, 1) for b in base]
            row["ratio"] = round(row["tokens_per_sec"] / row["baseline_tokens_per_sec"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
