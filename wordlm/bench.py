"""Benchmark real training steps through the real Trainer, beside the classic example's loop.

    python -m wordlm.bench --data ../shared/data/wikitext-2-small \\
        --baseline ../shared/bench/seed_baseline.py --repeats 3 \\
        -c "model=lstm" -c "model=transformer"

Time to a perplexity (``--to-ppl``): the classic example trains ``--baseline-epochs`` epochs (its defaults:
2x200 LSTM, SGD lr 20, batch 20, bptt 35) and each config trains with ``trainer.target_ppl`` until its
validation perplexity reaches the target, alternately, ``--repeats`` times; one JSON line per config gives the
seconds to the target (training + evaluation, the clock both programs keep from the first step) beside the
classic example's, and their ratio:

    python -m wordlm.bench --to-ppl baseline --data ../shared/data/wikitext-2-small \
        --baseline ../shared/bench/seed_baseline.py -c "experiment=cpu_speedrun"

``--to-ppl baseline`` targets the classic example's best validation perplexity in ``--baseline-epochs`` epochs.

Generation (``--generate WORDS``): words/s of sampling one stream from each config's model at its sizes over the
corpus's vocabulary, configs alternating in fresh processes; with ``--profile``, where a word's time goes:

    python -m wordlm.bench --generate 1000 --data ../shared/data/wikitext-2-small -c "model=lstm" -c "model=gru"

Tokenising (``--tokenize DIR``): seconds and peak resident memory of tokenising a corpus in a fresh process,
then of loading it from the cache that run wrote (``python -m wordlm.synthetic`` makes a WikiText-103-sized one).

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
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from .cli import CONF_DIR, die, one_line
from .compose import register_configs, to_config
from .config import DataConfig, UserError
from .data import get_window
from .data.datasets import corpus_dir, load_corpus
from .evaluation.scoring import nll
from .models import build_model, model_class, train_flops_per_token
from .runtime import matmul_peak, peak_memory_mb, resolve_device, seed_all, setup
from .sampling import generate
from .trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(overrides: List[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir


    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(hcompose(config_name="config", overrides=overrides))


def profile_one(overrides: List[str], steps: int, warmup: int, top: int = 15) -> Dict[str, Any]:
    """Where ``steps`` training steps of the real Trainer spend their time: torch.profiler's operators by self time
    (CPU time on a CPU; on a GPU, CUDA time as well)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile


    cfg = compose([*overrides, "trainer.progress=false", "trainer.sample_words=0"])
    corpus = load_corpus(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, corpus, Path(tmp))
    bptt, n = cfg.trainer.bptt, t.steps_per_epoch

    def run(k0: int, count: int) -> None:
        for k in range(k0, k0 + count):
            t.train_step(*get_window(t.train_data, (k % n) * bptt, bptt))

    run(0, warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if t.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run(warmup, steps)
        _sync(t.device)
    key = "self_cuda_time_total" if t.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    return {"config": overrides, "steps": steps, "ms_per_step": total / 1000 / steps, "device": str(t.device),
            "precision": t.precision, "compile": t.step_fn.compiled, "compile_scope": t.step_fn.scope,
            "top": [{"op": e.key, "share": round(getattr(e, key) / total, 4), "calls_per_step": e.count / steps}
                    for e in events[:top]]}


def measure_one(overrides: List[str], steps: int, warmup: int) -> Dict[str, Any]:
    """Time ``steps`` training steps (after ``warmup``) of the real Trainer, plus eval and sampling."""
    import tempfile


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
        "compile": t.step_fn.compiled, "compile_scope": t.step_fn.scope,
    }


def generate_one(overrides: List[str], words: int, profile: bool = False, top: int = 12) -> Dict[str, Any]:
    """Worker: words/s of sampling ``words`` words (one stream, temperature 1, after 20 warm-up words) from the
    config's model, built at its sizes over the corpus's vocabulary (speed does not depend on the weights). With
    ``profile``: torch.profiler's operators by self time, per word."""

    cfg = compose(overrides)
    corpus = load_corpus(cfg.data)
    dev = resolve_device(cfg.trainer.device)
    setup(cfg.trainer, dev)
    seed_all(cfg.trainer.seed)
    model = build_model(cfg.model, len(corpus.vocab)).to(dev).eval()
    eos, ctx = corpus.vocab.eos, cfg.trainer.bptt
    gen = torch.Generator(device=dev.type).manual_seed(0)

    def run(n: int) -> None:
        generate(model, [eos], n, dev, start=eos, context=ctx, generator=gen)
        _sync(dev)

    run(20)
    out: Dict[str, Any] = {"model": cfg.model.name, "vocab": len(corpus.vocab), "context": ctx,
                           "params": sum(p.numel() for p in model.parameters()), "device": str(dev),
                           "threads": torch.get_num_threads()}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            run(words)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        out.update({"us_per_word": round(total / words, 1),
                    "top": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 4),
                             "calls_per_word": round(e.count / words, 2)} for e in events[:top]]})
        return out
    t0 = time.perf_counter()
    run(words)
    out["words_per_sec"] = words / (time.perf_counter() - t0)
    return out


def generate_bench(a: argparse.Namespace, env: Dict[str, str]) -> None:
    """Generation words/s of each config, in fresh processes, configs alternating, ``--repeats`` times; medians."""
    data = ["data=custom", f"data.dir={a.data}"] if a.data else []
    configs = [(c or "(defaults)", [*data, *shlex.split(c)]) for c in (a.config or [""])]
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in configs}
    worker = [sys.executable, "-m", "wordlm.bench", "--generate-one", "--generate", str(a.generate)]
    if a.profile:
        for name, overrides in configs:
            r = _subprocess_json([*worker, "--profile", "--one", json.dumps(overrides)], env)
            print(json.dumps({"config": name, **r}), flush=True)
        return
    for _ in range(a.repeats):  # alternate, so drifting machine load hits every config alike
        for name, overrides in configs:
            runs[name].append(_subprocess_json([*worker, "--one", json.dumps(overrides)], env))
    for name, rs in runs.items():
        wps = [r["words_per_sec"] for r in rs]
        print(json.dumps({"config": name, "words": a.generate, "repeats": a.repeats,
                          "words_per_sec": round(statistics.median(wps), 1),
                          "runs_words_per_sec": [round(w, 1) for w in wps],
                          **{k: rs[0][k] for k in ("model", "vocab", "context", "params", "device", "threads")}}),
              flush=True)


def baseline_args(overrides: List[str], steps: int, warmup: int) -> List[str]:
    cfg = compose(overrides)

    m, tc = cfg.model, cfg.trainer
    return ["--data", str(corpus_dir(cfg.data)), *model_class(m.name).classic_args(m), "--lr", str(cfg.optim.lr),
            "--clip", str(tc.clip or 0), "--batch-size", str(tc.batch_size), "--bptt", str(tc.bptt), "--steps",
            str(steps), "--warmup", str(warmup), "--seed", str(tc.seed)]


def _subprocess_json(cmd: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        _child_failed(cmd, p)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _child_failed(cmd: List[str], p: subprocess.CompletedProcess) -> None:
    """A child's own one-line error is passed on as it is; anything else (a crash) with the command and its tail."""
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("wordlm: error: ")]
    if lines:
        raise UserError(lines[-1][len("wordlm: error: "):])
    raise SystemExit(f"wordlm: error: {shlex.join(cmd)} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")


def _reached(curve: List[Dict[str, Any]], target: float) -> float | None:
    """Seconds of the first curve point at or below ``target``."""
    return next((c["seconds"] for c in curve if c["valid_ppl"] <= target), None)


def _train_to(overrides: List[str], target: float, minutes: float, env: Dict[str, str]) -> Dict[str, Any]:
    """One real training run (``python -m wordlm.cli``, a fresh process) until the validation perplexity reaches
    ``target``, or ``minutes`` pass. Samples are off (the classic example draws none)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "wordlm.cli", *overrides, f"trainer.target_ppl={target}",
               f"trainer.max_minutes={minutes}", "trainer.sample_words=0", "trainer.progress=false",
               f"hydra.run.dir={tmp}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        process_s = time.perf_counter() - t0
        if p.returncode != 0:
            _child_failed(cmd, p)
        m = json.loads((Path(tmp) / "metrics.json").read_text())
    return {"seconds": m["seconds_to_target"], "curve": m["curve"], "process_seconds": round(process_s, 1),
            "tokens_per_sec": m["train_tokens_per_sec"], "compile": m["compile"], "precision": m["precision"],
            "test_ppl": m["test_ppl"], "params": m["params"]}


def to_ppl(a: argparse.Namespace, env: Dict[str, str]) -> None:
    """Seconds until the validation perplexity reaches a target, beside the classic example."""
    if not a.baseline:
        raise UserError("--to-ppl needs --baseline (the classic example to run beside wordlm)")
    data = ["data=custom", f"data.dir={a.data}"] if a.data else []
    args = baseline_args(data, 0, 0)
    for flag in ("--steps", "--warmup"):  # (the timed-steps mode's)
        i = args.index(flag)
        del args[i:i + 2]
    classic = [sys.executable, a.baseline, *args, "--epochs", str(a.baseline_epochs)]
    configs = [(c or "(defaults)", [*data, *shlex.split(c)]) for c in (a.config or [""])]
    target = None if a.to_ppl == "baseline" else float(a.to_ppl)
    base: List[Dict[str, Any]] = []
    ours: Dict[str, List[Dict[str, Any]]] = {name: [] for name, _ in configs}
    for _ in range(a.repeats):  # alternate, so drifting machine load hits both alike
        b = _subprocess_json(classic, env)
        base.append(b)
        if target is None:
            target = min(c["valid_ppl"] for c in b["curve"])  # the classic example's best in --baseline-epochs
            print(json.dumps({"target_ppl": target, "from": f"the classic example's best in {a.baseline_epochs} "
                              f"epochs", "baseline_seconds": b["curve"][-1]["seconds"]}), flush=True)
        limit = a.limit_minutes or 2 * b["curve"][-1]["seconds"] / 60
        for name, overrides in configs:
            ours[name].append(_train_to(overrides, target, limit, env))
    base_s = [_reached(b["curve"], target) for b in base]
    base_ok = [s for s in base_s if s is not None]
    for name, runs in ours.items():
        secs = [r["seconds"] for r in runs]
        ok = [s for s in secs if s is not None]
        row: Dict[str, Any] = {
            "config": name, "target_ppl": target, "repeats": a.repeats,
            "seconds_to_target": round(statistics.median(ok), 2) if len(ok) == len(secs) else None,
            "runs_seconds": secs, "runs_process_seconds": [r["process_seconds"] for r in runs],
            "tokens_per_sec": round(statistics.median(r["tokens_per_sec"] for r in runs), 1),
            "precision": runs[0]["precision"], "compile": runs[0]["compile"], "params": runs[0]["params"],
            "baseline_seconds_to_target": round(statistics.median(base_ok), 2) if base_ok else None,
            "runs_baseline_seconds": base_s, "threads": torch.get_num_threads(),
            "curve": runs[0]["curve"], "baseline_curve": base[0]["curve"],
        }
        if row["seconds_to_target"] and row["baseline_seconds_to_target"]:
            row["time_ratio"] = round(row["seconds_to_target"] / row["baseline_seconds_to_target"], 3)
        print(json.dumps(row), flush=True)


def tokenize_one(folder: str, cache_dir: str) -> Dict[str, Any]:
    """Worker: load ``folder`` as ``data=custom`` through the tokenisation cache in ``cache_dir``; seconds and the
    process's peak resident memory (``ru_maxrss``: everything this process ever held, the interpreter and torch
    included)."""
    import resource


    t0 = time.perf_counter()
    corpus = load_corpus(DataConfig(name="custom", dir=folder, cache_dir=cache_dir))
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024, 1), "vocab": len(corpus.vocab),
            "tokens": {s: int(corpus.split(s).numel()) for s in ("train", "valid", "test")}}


def tokenize_bench(folder: str, env: Dict[str, str]) -> None:
    """Tokenise ``folder`` twice in fresh processes: first through an empty cache (tokenise + write the cache),
    then again (load the cache)."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache_dir:
        for phase in ("tokenise", "cached"):
            r = _subprocess_json([sys.executable, "-m", "wordlm.bench", "--tokenize-one", folder, cache_dir], env)
            print(json.dumps({"phase": phase, "folder": folder, **r}), flush=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Benchmark wordlm training beside the classic example's loop.")
    ap.add_argument("-c", "--config", action="append", default=None,
                    help="Hydra overrides for one config, quoted (repeatable); default: the default config")
    ap.add_argument("--data", help="corpus folder (train/valid/test.txt): adds data=custom data.dir=DATA")
    ap.add_argument("--baseline", help="path to seed_baseline.py, timed beside wordlm")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--to-ppl", metavar="PPL|baseline",
                    help="time to this validation perplexity instead of tokens/s; 'baseline': the classic example's "
                         "best in --baseline-epochs epochs")
    ap.add_argument("--baseline-epochs", type=int, default=6, help="--to-ppl: epochs of the classic example")
    ap.add_argument("--limit-minutes", type=float, default=None,
                    help="--to-ppl: give up on a config after this long (default: twice the classic example's run)")
    ap.add_argument("--profile", action="store_true",
                    help="where the time of --steps training steps goes (torch.profiler, operators by self time), "
                         "one JSON line per config")
    ap.add_argument("--tokenize", metavar="DIR",
                    help="peak memory and seconds of tokenising DIR/{train,valid,test}.txt, then of loading its cache")
    ap.add_argument("--generate", type=int, metavar="WORDS", default=None,
                    help="generation words/s instead of training: sample WORDS words (one stream) from each config's "
                         "model; with --profile, where the time of a word goes")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # worker mode: JSON list of overrides
    ap.add_argument("--generate-one", action="store_true", help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--tokenize-one", nargs=2, help=argparse.SUPPRESS)  # worker mode: folder, cache dir
    return ap


def check(a: argparse.Namespace) -> None:
    """One line per impossible flag, before any work (``wordlm: error: ...``, exit 2)."""
    for flag, value, least in (("--steps", a.steps, 1), ("--warmup", a.warmup, 0), ("--repeats", a.repeats, 1),
                               ("--baseline-epochs", a.baseline_epochs, 1)):
        if value < least:
            raise UserError(f"{flag} {value} must be >= {least}")
    if a.generate is not None and a.generate < 1:
        raise UserError(f"--generate {a.generate}: give the number of words to sample, e.g. --generate 1000")
    if a.to_ppl not in (None, "baseline"):
        try:
            ok = float(a.to_ppl) > 1
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"--to-ppl {a.to_ppl!r}: give a perplexity above 1 (e.g. --to-ppl 250) or 'baseline'")
    if a.limit_minutes is not None and not a.limit_minutes > 0:
        raise UserError(f"--limit-minutes {a.limit_minutes} must be > 0")
    for flag, folder in (("--data", a.data), ("--tokenize", a.tokenize)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise UserError(f"{flag} {folder}: no such folder (it must hold train.txt, valid.txt and test.txt)")
    if a.baseline is not None and not Path(a.baseline).expanduser().is_file():
        raise UserError(f"--baseline {a.baseline}: no such file (the path to seed_baseline.py)")


def main(argv: List[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        check(a)
        _dispatch(a)
    except (UserError, HydraException, OmegaConfBaseException) as e:
        die(str(e) if isinstance(e, UserError) else one_line(e))


def _dispatch(a: argparse.Namespace) -> None:
    if a.tokenize_one:
        print(json.dumps(tokenize_one(*a.tokenize_one)))
        return
    if a.tokenize:
        tokenize_bench(a.tokenize, {**os.environ})
        return
    if a.generate_one:
        print(json.dumps(generate_one(json.loads(a.one), a.generate, a.profile)))
        return
    if a.generate is not None:
        generate_bench(a, {**os.environ})
        return
    if a.profile:
        for cfg_str in a.config or [""]:
            data = ["data=custom", f"data.dir={a.data}"] if a.data else []
            print(json.dumps(profile_one([*data, *shlex.split(cfg_str)], a.steps, a.warmup)), flush=True)
        return
    if a.to_ppl is not None:
        to_ppl(a, {**os.environ})
        return

    if a.one is not None:
        print(json.dumps(measure_one(json.loads(a.one), a.steps, a.warmup)))
        return

    speed_rows(a)


def speed_rows(a: argparse.Namespace) -> None:
    """Tokens/s of each config beside the classic loop: fresh processes, alternating, the median of --repeats."""
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
        for k in ("device", "precision", "threads", "params", "compile", "compile_scope"):
            row[k] = ours[0][k]
        row["runs_tokens_per_sec"] = [round(r["tokens_per_sec"], 1) for r in ours]
        if base:
            row["baseline_tokens_per_sec"] = round(statistics.median(base), 1)
            row["runs_baseline_tokens_per_sec"] = [round(b, 1) for b in base]
            row["ratio"] = round(row["tokens_per_sec"] / row["baseline_tokens_per_sec"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
