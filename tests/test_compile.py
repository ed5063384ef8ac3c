"""The compiled scoring head: what a layered RNN (weight drop, locked dropout) and variable-length windows compile
instead of the whole step. Real torch.compile (Inductor and the machine's C++ compiler): slow, except the plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli, train_args

LAYERED = ["model.locked=true", "model.wdrop=0.3", "model.nlayers=2", "trainer.max_steps=12"]


@pytest.mark.slow
def test_compiled_head_scores_and_differentiates_as_the_eager_one_at_every_window_length():
    from torch._dynamo.utils import counters

    from wordlm.models.words import Softmax

    torch.manual_seed(0)
    dec = Softmax(12, 50)
    dec.compile_scoring(True)
    head, calls = dec._compiled, []
    dec.__dict__["_compiled"] = lambda *a: calls.append(a[0].shape) or head(*a)
    graphs = counters["stats"]["unique_graphs"]
    for T, B, precision in ((7, 3, "fp32"), (9, 3, "fp32"), (1, 1, "fp32"), (11, 3, "bf16")):
        h = torch.randn(T, B, 12, requires_grad=True)
        y = torch.randint(0, 50, (T, B))
        got, want = [], []
        for training, out in ((True, got), (False, want)):
            dec.train(training)  # the compiled head serves training only: eval is the eager path
            h.grad = dec.weight.grad = dec.bias.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                lp = dec.target_log_prob(h, y)
            lp.sum().backward()
            out.extend([lp.detach(), h.grad, dec.weight.grad, dec.bias.grad])
        tol = 1e-5 if precision == "fp32" else 2e-2
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=tol, atol=tol)
        if T == 9:  # two lengths, one graph (dynamic shapes; rows flattened)
            assert counters["stats"]["unique_graphs"] - graphs == 1
    # Training went through the compiled head (flat rows), eval did not; a single row stays eager.
    assert calls == [torch.Size([21, 12]), torch.Size([27, 12]), torch.Size([33, 12])]
    dec.compile_scoring(False)
    assert dec._compiled is None


def test_compile_plan_compiles_the_whole_step_where_it_pays_and_the_head_elsewhere(tmp_path, monkeypatch):
    """torch.compile is lazy: planning compiles nothing, so this runs fast."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # planning picks the cache folder: keep it here
    from wordlm.models.rnn import RNNConfig, RNNModel
    from wordlm.training.step import compile_plan

    cpu, big = torch.device("cpu"), 1e20  # FLOPs: auto wants to compile

    def plan(flag, fixed, well, adaptive=False, flops=big):
        cfg = RNNConfig(name="lstm", emsize=8, nhid=8, nlayers=1, tied=True, locked=True,
                        softmax="adaptive" if adaptive else "full", adaptive_input=adaptive, cutoffs=[4])
        model = RNNModel(cfg, 20)
        out = compile_plan(flag, cpu, flops, model, fixed_windows=fixed, compiles_well=well)
        head_on = getattr(model.decoder, "_compiled", None) is not None
        assert head_on == out[1]
        return out

    assert plan(None, True, True) == (True, False)  # the classic model: the whole step
    assert plan(None, False, True) == (False, True)  # variable windows: the head
    assert plan(True, False, True) == (True, False)  # unless true: the whole step at the compiled length
    assert plan(None, True, False) == plan(True, True, False) == (False, True)  # a layered RNN: the head
    assert plan(None, True, False, adaptive=True) == (False, False)  # no head: eager under auto
    assert plan(True, True, False, adaptive=True) == (True, False)  # and the whole step when true
    assert plan(None, True, True, flops=1.0) == plan(False, True, True) == (False, False)  # too short; off


def test_inductor_cache_has_a_folder_per_cpu_vector_isa(tmp_path, monkeypatch):
    """Kernels generated for one vector ISA are never served to another: inductor's cache is not keyed by it, and
    an AVX2 kernel rebuilt for AVX-512 writes past its buffers (runtime.separate_inductor_cache)."""
    from wordlm import runtime

    monkeypatch.setattr(torch._dynamo.config, "allow_rnn", torch._dynamo.config.allow_rnn)  # restored after
    base, folders = tmp_path / "cache", {}
    for capability in ("default", None):  # ATEN_CPU_CAPABILITY=default: inductor generates scalar code
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(base))
        if capability:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        else:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        runtime.resolve_compile(True, torch.device("cpu"), 0.0)  # compiling on the CPU picks the folder
        folders[capability] = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        runtime.separate_inductor_cache()  # a second call keeps it
        assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) == folders[capability]
    assert folders["default"] == base / "isa-scalar"
    native = folders[None]
    assert native.parent == base and native.name.startswith("isa-") and native != folders["default"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(base))
    runtime.resolve_compile(False, torch.device("cpu"), 0.0)  # not compiling: the user's folder is left alone
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(base)


@pytest.mark.slow
def test_kernels_cached_under_avx2_do_not_kill_a_native_run(corpus_dir, tmp_path):
    """One cache folder, first filled under ATEN_CPU_CAPABILITY=avx2, then used natively. On an AVX-512 CPU the AVX2
    kernels, served from inductor's cache and rebuilt for AVX-512, corrupted the heap (the run died at its first
    step: "double free or corruption") until each ISA got its own folder; on an AVX2 CPU both runs are native."""
    cache = tmp_path / "inductor"
    for i, env in enumerate(({"ATEN_CPU_CAPABILITY": "avx2"}, {})):
        run_cli("train.py", train_args(corpus_dir, tmp_path / f"run{i}", *LAYERED, "trainer.compile=true"),
                timeout=400, env={"TORCHINDUCTOR_CACHE_DIR": str(cache), **env}, check=True)
        assert _metrics(tmp_path / f"run{i}")["compile_scope"] == "head"
    assert (cache / "isa-avx2").is_dir()


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_a_layered_rnn_compiles_its_head_and_a_failing_compiler_leaves_one_warning(corpus_dir, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", train_args(corpus_dir, run, *LAYERED, "trainer.compile=true"), timeout=400,
            env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, check=True)
    m = _metrics(run)
    assert m["compile_scope"] == "head" and m["compile"] is True
    log = (run / "train.log").read_text()
    assert m["config"]["trainer.compile_scope"] == "head" and "compile head" in log
    assert "torch.compile failed" not in log
    # The same run eagerly: the same losses but for rounding (the head draws no random numbers).
    eager = tmp_path / "eager"
    run_cli("train.py", train_args(corpus_dir, eager, *LAYERED, "trainer.compile=false"),
            timeout=400, check=True)
    e = _metrics(eager)
    assert e["compile_scope"] is None and e["test_ppl"] == pytest.approx(m["test_ppl"], rel=1e-2)

    # No C++ compiler (and nothing cached to fall back on): one warning, then the same run eagerly.
    bad = tmp_path / "bad"
    run_cli("train.py", train_args(corpus_dir, bad, *LAYERED, "trainer.compile=true"), timeout=400,
            env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty"), "CXX": str(tmp_path / "no-such-c++")},
            check=True)
    m, log = _metrics(bad), (bad / "train.log").read_text()
    assert log.count("torch.compile failed") == 1 and "training continues without it" in log
    assert m["compile_scope"] is None and m["status"] == "completed" and m["steps"] == 12
