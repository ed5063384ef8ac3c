"""Faithful to the references (issue 26): the cache and dynamic evaluation give every model type the static
evaluation's history; pointer.py's warm-up and per-data-set settings; dynamiceval.py's 5-token segments and
scaling rule; a tuning grid that widens; fairseq's adaptive-softmax dropout; the upstream classic transformer."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import run_cli, write_corpus

from wordlm import checkpoint
from wordlm.config import CacheConfig, Config, DataConfig, DynamicConfig, EvaluateConfig, UserError
from wordlm.data import Vocab
from wordlm.evaluation import cache as caching
from wordlm.evaluation import dynamic as dynamics
from wordlm.evaluation import stream, tuning
from wordlm.evaluation.command import run as evaluate_run
from wordlm.evaluation.scoring import windows
from wordlm.models import build_model, model_config
from wordlm.models.words import AdaptiveSoftmax

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
WORDS = 30
V = WORDS + 2


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = {"nhead": 2} if name == "transformer" else {}
    return build_model(model_config(name, emsize=8, nhid=12, nlayers=2, dropout=0.3, **kw), V).eval()


def stream_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the history
@pytest.mark.parametrize("stateless", [False, True])
def test_windows_score_every_target_once_with_the_static_history(stateless):
    n, bptt, context = 53, 9, 4
    pieces = list(windows(n, 3, bptt, context, stateless))
    scored = [t for _, i, j in pieces for t in range(i, j)]
    assert scored == list(range(n))  # every target once, in order
    for lo, i, j in pieces:
        assert lo <= i < j and j - lo <= (bptt if stateless else 3)
        if stateless:  # fed from its static window's start: at least `context` tokens before it (but at the start)
            assert i - lo >= min(context, i) and (lo == 0 or (lo + context) % (bptt - context) == 0)


def checkpoint_of(tmp: Path, name: str, bptt: int = 9, eval_context=None) -> Path:
    model = tiny(name)
    cfg = Config(model=model.cfg)
    cfg.trainer.bptt, cfg.trainer.eval_context = bptt, eval_context
    vocab = Vocab(["<unk>", "<eos>"] + [f"w{i}" for i in range(WORDS)])
    path = tmp / f"{name}.pt"
    checkpoint.save(path, checkpoint.payload(cfg, vocab, model.state_dict()))
    return path


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_switched_off_the_methods_equal_the_default_static_evaluation(tmp_path, name):
    corpus = write_corpus(tmp_path / "corpus", {"train": 30, "valid": 10, "test": 25}, vocab=WORDS)
    ckpt = checkpoint_of(tmp_path, name)
    data = DataConfig(name="custom", dir=str(corpus))

    def score(**kw) -> dict:
        return evaluate_run(EvaluateConfig(checkpoint=str(ckpt), data=data, device="cpu", progress=False, **kw))

    static = score(batch_size=1)  # the default static evaluation: eval_context = bptt // 2 for the transformer
    assert static["eval_context"] == (4 if name == "transformer" else 0)
    off_cache = score(cache=CacheConfig(enabled=True, lam=0.0))
    off_dyn = score(dynamic=DynamicConfig(enabled=True, lr=0.0, decay=0.0))
    for off in (off_cache, off_dyn):
        assert off["eval_context"] == static["eval_context"] and off["tokens"] == static["tokens"]
        assert abs(off["loss"] - static["loss"]) <= 1e-6 * static["loss"], (off["loss"], static["loss"])
    # Switched on, they change the score; and without history the transformer's static score is another number.
    on = score(cache=CacheConfig(enabled=True, lam=0.3, warmup="none"))
    assert abs(on["loss"] - static["loss"]) > 1e-4
    if name == "transformer":
        assert abs(score(batch_size=1, eval_context=0)["loss"] - static["loss"]) > 1e-4
    assert off_dyn["dynamic"]["segment"] == 5 and off_dyn["stat_seconds"] >= 0 and off_dyn["score_seconds"] > 0


@pytest.mark.parametrize("name", ["lstm", "transformer"])
def test_cache_rescored_from_features_equals_the_stream(name):
    model, data = tiny(name), stream_of(80, seed=2)
    settings = CacheConfig(window=20, theta=0.8, lam=0.25, warmup="reference")
    bptt, context = 9, (4 if name == "transformer" else 0)
    seg = bptt - context if name == "transformer" else bptt
    online = -stream.token_nll(model, data, seg, CPU, cache=settings, bptt=bptt, context=context)
    hidden, tok = stream.features(model, data, bptt, CPU, context=context)
    offline = caching.rescore(hidden, tok, data[1:], settings, chunk=7)
    torch.testing.assert_close(offline.double(), online, atol=1e-6, rtol=1e-6)
    assert float((offline - tok).abs().max()) > 1e-3  # the cache did mix something in


# ------------------------------------------------------------------------------------------ the cache
def test_cache_warmup_reference_scores_with_the_model_alone_until_more_than_window_tokens_precede():
    model, data = tiny("lstm"), stream_of(60, seed=5)
    hidden, tok = stream.features(model, data, 9, CPU)
    window = 12
    ref = caching.rescore(hidden, tok, data[1:], CacheConfig(window=window, theta=1.0, lam=0.3, warmup="reference"))
    none = caching.rescore(hidden, tok, data[1:], CacheConfig(window=window, theta=1.0, lam=0.3, warmup="none"))
    assert torch.equal(ref[: window + 1], tok[: window + 1])  # pointer.py: start_idx + idx > window
    assert not torch.equal(ref[window + 1:], tok[window + 1:]) and torch.equal(ref[window + 1:], none[window + 1:])
    assert torch.equal(none[:1], tok[:1]) and not torch.equal(none[1: window + 1], tok[1: window + 1])


def test_cache_defaults_are_the_references_per_data_set():
    ptb = caching.settings(CacheConfig(enabled=True), "ptb")
    assert (ptb.window, ptb.theta, ptb.lam) == (500, 1.0, 0.1)
    for name in ("wikitext2", "wikitext103", "custom"):
        s = caching.settings(CacheConfig(enabled=True), name)
        assert (s.window, round(s.theta, 3), round(s.lam, 4)) == (3785, 0.663, 0.1279)
    assert caching.settings(CacheConfig(window=7, lam=0.3), "ptb").window == 7  # a given value stays


# ------------------------------------------------------------------------------------------ dynamic evaluation
def test_dynamic_defaults_are_dynamiceval_py_and_scale_with_the_segment():
    d = dynamics.settings(DynamicConfig(enabled=True), bptt=35)
    assert (d.segment, d.lr, d.decay, d.eps) == (5, 5e-5, 2e-3, 2e-5)
    d = dynamics.settings(DynamicConfig(enabled=True, segment=20), bptt=35)
    assert math.isclose(d.lr, 2e-4) and math.isclose(d.decay, 8e-3)  # x 20 / 5, as dynamiceval.py scales its grid
    d = dynamics.settings(DynamicConfig(enabled=True, segment=None, lr=1e-4), bptt=35)
    assert d.segment == 35 and d.lr == 1e-4 and math.isclose(d.decay, 0.014)  # a given lr stays


def test_gradient_statistics_use_the_evaluations_segments():
    model = tiny("lstm")
    ids = stream_of(400, seed=3).reshape(-1)
    seen = []
    real = dynamics.target_log_probs

    def spy(m, x, state, y, **kw):
        seen.append(x.size(0))
        return real(m, x, state, y, **kw)

    with mock.patch.object(dynamics, "target_log_probs", spy):
        dynamics.gradient_stats(model, ids, 5, CPU, "fp32", batch_size=4)
    assert set(seen[:-1]) == {5}  # every batch a 5-token segment (the last may be shorter)


# ------------------------------------------------------------------------------------------ tuning
def test_the_grid_widens_past_an_edge_while_it_improves():
    best, loss, tried = tuning.search({"lam": [0.05, 0.1279, 0.2], "theta": [0.3, 1.0]},
                                      lambda p: (p["lam"] - 0.5) ** 2 + (p["theta"] - 0.1) ** 2)
    assert best["lam"] > 0.2 and best["theta"] < 0.3  # both beyond the grid
    assert len(tried) > 6 and loss == min(t["loss"] for t in tried)
    inside, _, tried = tuning.search({"lam": [0.05, 0.1279, 0.2]}, lambda p: (p["lam"] - 0.12) ** 2)
    assert inside["lam"] == 0.1279 and len(tried) == 3  # a best value inside the grid: nothing more is tried
    capped, _, _ = tuning.search({"window": [2, 4]}, lambda p: -p["window"], limits={"window": 10})
    assert capped["window"] == 8  # 16 would exceed the limit


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("change, message", [
    (dict(cache=CacheConfig(enabled=True, window=0)), "cache.window=0 must be >= 1"),
    (dict(cache=CacheConfig(enabled=True, warmup="soon")), "cache.warmup='soon': use reference|none"),
    (dict(dynamic=DynamicConfig(enabled=True, segment=0)), "dynamic.segment=0 must be >= 1"),
    (dict(dynamic=DynamicConfig(enabled=True, segment=10)), "dynamic.segment=10 is longer than the 9 tokens a window"),
])
def test_bad_settings_are_one_line_before_any_scoring(tmp_path, change, message):
    ckpt = checkpoint_of(tmp_path, "lstm")
    corpus = write_corpus(tmp_path / "corpus", {"train": 5, "valid": 5, "test": 5}, vocab=WORDS)
    with pytest.raises(UserError) as e:
        evaluate_run(EvaluateConfig(checkpoint=str(ckpt), data=DataConfig(name="custom", dir=str(corpus)),
                                    device="cpu", progress=False, **change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_segment_longer_than_bptt_from_the_command_line(tmp_path):
    ckpt = checkpoint_of(tmp_path, "lstm")
    corpus = write_corpus(tmp_path / "corpus", {"train": 5, "valid": 5, "test": 5}, vocab=WORDS)
    p = run_cli("evaluate.py", [f"checkpoint={ckpt}", "data=custom", f"data.dir={corpus}", "dynamic.enabled=true",
                                "dynamic.segment=40", "device=cpu"], cwd=tmp_path)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert "dynamic.segment=40 is longer than the 9 tokens a window scores (bptt=9)" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ adaptive softmax
def test_adaptive_softmax_drops_the_heads_input_in_training_only():
    torch.manual_seed(0)
    sm = AdaptiveSoftmax(16, 40, [10, 20], 2.0, dropout=0.5)
    h, target = torch.randn(6, 5, 16), torch.randint(0, 40, (6, 5))
    for train in (True, False):
        sm.train(train)
        with mock.patch.object(sm, "_head", wraps=sm._head) as head, \
                mock.patch.object(sm, "_tail", wraps=sm._tail) as tail:
            sm.target_log_prob(h, target)
            sm.log_prob(h)
        assert head.call_count == 2 and tail.call_count >= 2
        rows = h.reshape(-1, 16)
        for call in head.call_args_list + tail.call_args_list:
            seen = call.args[0].reshape(-1, 16)
            if seen.size(0) < 4:  # a cluster with (almost) no targets: too few entries to count
                continue
            zero = (seen == 0).float().mean()
            # each row is one of the features: scaled by 1 / (1 - p) where kept and zero where dropped (training),
            # the feature itself (eval)
            scale = 2.0 if train else 1.0
            close = (seen[:, None, :] - rows[None] * scale).abs() < 1e-5
            assert (close | (seen[:, None, :] == 0)).all(-1).any(1).all()
            assert (0.3 < zero < 0.7) if train else zero == 0


# ------------------------------------------------------------------------------------------ classic transformer
def test_classic_transformer_preset_is_upstreams_nn_transformer():
    from hydra import compose, initialize_config_dir

    from wordlm.compose import register_configs, to_config
    from wordlm.config import conf_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = to_config(compose(config_name="config", overrides=["experiment=classic_transformer"]))
    assert (cfg.trainer.precision, cfg.trainer.eval_context, cfg.optim.name, cfg.optim.lr) == ("fp32", 0, "sgd", 20.0)
    torch.manual_seed(0)
    ours = build_model(cfg.model, 1000)
    upstream = torch.nn.Transformer(d_model=200, nhead=2, dim_feedforward=200, num_encoder_layers=2)
    # The same encoder: nn.Transformer's encoder (its layers and final LayerNorm) loads into ours exactly.
    ours.layers.load_state_dict(upstream.encoder.state_dict(), strict=True)
    ref_layer = upstream.encoder.layers[0]
    for layer in ours.layers.layers:
        assert layer.norm_first is False and layer.self_attn.dropout == ref_layer.self_attn.dropout == 0.1
        assert layer.dropout.p == ref_layer.dropout.p and layer.dropout1.p == ref_layer.dropout1.p == 0.1
    assert ours.drop.p == 0.2  # the example's --dropout: on the embeddings + positions only
    # Xavier-uniform inside the layers (nn.Transformer's init), not nn.Linear's default (bound 1/sqrt(200) = 0.07).
    fresh = build_model(cfg.model, 1000)
    w = fresh.layers.layers[0].linear1.weight
    assert 0.1 < float(w.detach().abs().max()) <= math.sqrt(6 / 400) + 1e-6


# ------------------------------------------------------------------------------------------ finetune cap
def test_finetune_caps_the_variable_window_at_bptt_plus_10_as_finetune_py():
    from conftest import tiny_config

    from wordlm.training.recipe import from_config

    lengths = {}
    for finetune in (False, True):
        cfg = tiny_config(bptt=70, variable_bptt=True, seed=3)
        cfg.optim.finetune = finetune
        window = from_config(cfg)[2]
        lengths[finetune] = [window.next(i)[0] for i in range(3000)]
    assert max(lengths[False]) > 80  # main.py: no cap (N(70, 5) passes 80 about 2 % of the time)
    assert max(lengths[True]) == 80 and min(lengths[True]) >= 5


def test_final_eval_dynamic_too_large_for_memory_is_refused_before_training():
    from wordlm import runtime

    def build():
        return build_model(model_config("lstm", emsize=64, nhid=64, nlayers=1), 1000)

    params = sum(p.numel() for p in build().parameters())
    train_need = runtime.check_memory(build, CPU, "sgd", 80, 1000)
    between = train_need + 4 * params  # room to train, not for dynamic evaluation's 7 copies of the weights
    with mock.patch.object(runtime, "available_memory", return_value=between):
        assert runtime.check_memory(build, CPU, "sgd", 80, 1000) == train_need  # static final_eval: fine
        with pytest.raises(UserError) as e:
            runtime.check_memory(build, CPU, "sgd", 80, 1000, dynamic_tokens=500)
    msg = str(e.value)
    assert "trainer.final_eval" in msg and "trainer.final_eval=static" in msg and "\n" not in msg


def test_checkpoints_from_before_the_new_placement_keep_the_old_one():
    from wordlm.models import config_from_dict

    old = config_from_dict({"name": "lstm", "emsize": 16, "nhid": 16, "nlayers": 1, "dropout": 0.0, "tied": False,
                            "softmax": "adaptive", "cutoffs": [10, 20], "div_value": 2.0, "adaptive_input": False,
                            "adaptive_dropout": 0.5})
    assert old.adaptive_dropout_input is False
    assert build_model(old, 40).decoder.input_dropout == 0.0
    new = model_config("lstm", softmax="adaptive", cutoffs=[10, 20], adaptive_dropout=0.5)
    assert new.adaptive_dropout_input is True and build_model(new, 40).decoder.input_dropout == 0.5
