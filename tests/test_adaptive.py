"""The neural cache and dynamic evaluation: exact when switched off, no leak from the future, a proper
distribution, Krause's update by hand, and the CLI with tuning."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from wordlm.config import CacheConfig, DynamicConfig
from wordlm.evaluation import stream as adaptive
from wordlm.evaluation.scoring import nll
from wordlm.models import build_model, model_config

pytestmark = pytest.mark.usefixtures("one_thread")
V = 17
CPU = torch.device("cpu")


def tiny(name: str):
    torch.manual_seed(0)
    kw = {"nhead": 2} if name == "transformer" else {}
    return build_model(model_config(name, emsize=8, nhid=12, nlayers=2, dropout=0.3, **kw), V).eval()


def stream(n: int = 61, b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, b), generator=torch.Generator().manual_seed(seed))


def stats(model, data):
    return adaptive.gradient_stats(model, data.reshape(-1), 5, CPU, "fp32", batch_size=3)


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_switched_off_they_equal_the_static_evaluation(name):
    model, data = tiny(name), stream(b=2)
    static = nll(model, data, 7, CPU)
    off_cache = adaptive.token_nll(model, data, 7, CPU, cache=CacheConfig(lam=0.0, window=20)).mean().item()
    dyn = adaptive.Dynamic(model, DynamicConfig(lr=0.0, decay=0.0), stats(model, stream(40, seed=1)))
    off_dyn = adaptive.token_nll(model, data, 7, CPU, dynamic=dyn).mean().item()
    assert abs(off_cache - static) < 1e-6 and abs(off_dyn - static) < 1e-6
    on = adaptive.token_nll(model, data, 7, CPU, cache=CacheConfig(lam=0.3, window=20, theta=1.0,
                                                                   warmup="none")).mean().item()
    assert abs(on - static) > 1e-4  # and switched on, they do change the numbers


@pytest.mark.parametrize("name", ["lstm", "transformer"])
@pytest.mark.parametrize("method", ["cache", "dynamic", "both"])
def test_no_position_sees_the_future(name, method):
    model = tiny(name)
    ms = stats(model, stream(40, seed=1))
    cache = CacheConfig(window=30, theta=1.0, lam=0.3, warmup="none") if method in ("cache", "both") else None

    def scores(data):
        dyn = adaptive.Dynamic(model, DynamicConfig(lr=0.01, decay=0.01), ms) if method != "cache" else None
        return adaptive.token_nll(model, data, 5, CPU, cache=cache, dynamic=dyn)[:, 0]

    a = stream(60, seed=3)
    t = 23  # mid-segment
    b = a.clone()
    b[t + 1:] = (b[t + 1:] + 1) % V  # every later token changes
    sa, sb = scores(a), scores(b)
    assert torch.equal(sa[:t], sb[:t])  # targets 1..t (scored at 0..t-1) are untouched
    assert not torch.equal(sa[t:], sb[t:])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores(a)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored afterwards


def test_cache_distribution_sums_to_one_and_matches_the_scored_targets():
    model, data = tiny("lstm"), stream(40, b=2)
    c = adaptive.Cache(CacheConfig(window=12, theta=0.7, lam=0.25, warmup="none"))
    state = None
    with torch.no_grad():
        for i in range(0, 39, 8):
            x, y = data[i:i + 8], data[i + 1:i + 9]
            n = min(x.size(0), y.size(0))
            x, y = x[:n], y[:n]
            logp, state, aux = model(x, state, aux=True)
            p = c.distribution(aux["hidden"], logp, y)
            torch.testing.assert_close(p.sum(-1), torch.ones(n, 2), atol=1e-5, rtol=0)
            picked = c.target_logp(aux["hidden"], logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), y)  # then pushes
            torch.testing.assert_close(picked.exp(), p.gather(-1, y.unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=1e-4)


def test_dynamic_update_matches_a_hand_computation():
    model = tiny("lstm")
    ms = stats(model, stream(40, seed=1))
    cfg = DynamicConfig(lr=0.01, decay=0.5, eps=2e-5)
    dyn = adaptive.Dynamic(model, cfg, ms)
    theta0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    gsum = sum(float(m.mean()) for m in ms.values()) / len(ms)
    decrate = {k: (m / gsum).clamp(max=1 / cfg.decay) for k, m in ms.items()}
    x, y = stream(9, seed=4)[:-1], stream(9, seed=4)[1:]
    expected = {k: v.clone() for k, v in theta0.items()}
    for _ in range(2):  # the second step also pulls back towards theta0
        logp, _ = model(x)
        torch.nn.functional.nll_loss(logp.reshape(-1, V), y.reshape(-1)).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        for k in expected:
            expected[k] = expected[k] + cfg.decay * decrate[k] * (theta0[k] - expected[k]) \
                - cfg.lr * grads[k] / (ms[k] + cfg.eps)
        dyn.update()
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[k], atol=1e-6, rtol=1e-5)
    dyn.restore()
    assert all(torch.equal(p.detach(), theta0[k]) for k, p in model.named_parameters())


@pytest.mark.slow
def test_cli_tunes_on_valid_and_scores_test_without_touching_the_checkpoint(tmp_path_factory, tmp_path):
    from conftest import ROOT
    from test_generate import trained_run

    ckpt = trained_run(tmp_path_factory) / "checkpoints" / "best.pt"
    before = ckpt.read_bytes()
    p = subprocess.run([sys.executable, "-m", "wordlm.evaluate", f"checkpoint={ckpt}", "cache.enabled=true",
                        "dynamic.enabled=true", "tune=true", "tune_tokens=60", "progress=false", "device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    grid = math.prod(len(v) for v in adaptive.CACHE_GRID.values()) + 6 * 4  # the cache's grid, then Krause's
    assert out["split"] == "test" and out["batch_size"] == 1 and out["tried"] >= grid
    assert math.isfinite(out["perplexity"]) and math.isfinite(out["valid_ppl"]) and out["seconds"] > 0
    assert out["tune_seconds"] > 0 and out["dynamic"]["rule"] == "rms" and out["dynamic"]["segment"] == 5
    assert ckpt.read_bytes() == before
    p = subprocess.run([sys.executable, "-m", "wordlm.evaluate", f"checkpoint={ckpt}", "tune=true"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "cache.enabled=true" in p.stderr and "Traceback" not in p.stderr
