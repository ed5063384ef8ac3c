"""Adaptive softmax and adaptive input (wordlm.models.words): full log-probs, the clustered training path, tying,
and a real run through train, evaluate and generate."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, train_args, write_corpus

from wordlm.config import UserError
from wordlm.models import build_model, model_config
from wordlm.models.words import AdaptiveSoftmax, output_flops

V = 60
CUT = [10, 30]
KINDS = {
    "adaptive_softmax": {"softmax": "adaptive", "cutoffs": CUT},
    "adaptive_input": {"adaptive_input": True, "cutoffs": CUT},
    "both_tied": {"softmax": "adaptive", "adaptive_input": True, "tied": True, "cutoffs": CUT,
                  "adaptive_dropout": 0.2},
}
NAMES = ["lstm", "gru", "rnn_tanh", "rnn_relu", "transformer"]


def tiny(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if name == "transformer":
        kw.setdefault("nhead", 2)
    return build_model(model_config(name, emsize=16, nhid=16, nlayers=2, dropout=0.0, **kw), V)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", NAMES)
def test_log_probs_cover_the_vocabulary_and_the_target_path_agrees(name, kind, one_thread):
    model = tiny(name, **KINDS[kind]).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (9, 4), generator=g), torch.randint(0, V, (9, 4), generator=g)
    with torch.no_grad():
        logp, _ = model(x, None)
        target, _ = model(x, None, targets=y)
    assert logp.shape == (9, 4, V)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(9, 4), atol=1e-5)  # a distribution over every word
    assert (logp < 0).all()
    assert torch.allclose(target, logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), atol=1e-5)


def test_training_scores_a_cluster_only_for_the_positions_whose_target_is_in_it(monkeypatch):
    model = tiny("lstm", **KINDS["adaptive_softmax"]).train()
    rows = []
    real = AdaptiveSoftmax._tail

    def spy(self, h, i):
        rows.append((i, h.size(0)))
        return real(self, h, i)

    monkeypatch.setattr(AdaptiveSoftmax, "_tail", spy)
    y = torch.tensor([[1, 12, 40], [2, 3, 50], [45, 8, 9]])  # head: 5 positions, cluster 0: 1, cluster 1: 3
    logp, _ = model(torch.zeros(3, 3, dtype=torch.long), None, targets=y)
    assert rows == [(0, 1), (1, 3)]
    (-logp.mean()).backward()  # and gradients reach the head and the clusters that were used
    dec = model.decoder
    assert dec.head_words.grad.abs().sum() > 0 and dec.out[0].grad.abs().sum() > 0 and dec.out[1].grad.abs().sum() > 0
    rows.clear()
    logp, _ = model(torch.zeros(3, 3, dtype=torch.long), None, targets=torch.full((3, 3), 4))
    assert rows == [(0, 0), (1, 0)]  # every target in the head: the clusters run on no rows at all
    model.zero_grad()
    (-logp.mean()).backward()  # and their parameters still get a (zero) gradient: DDP needs every one each step
    assert all(p.grad is not None for p in model.parameters())
    assert model.decoder.out[1].grad.abs().sum() == 0


def test_tied_adaptive_layers_share_their_matrices(one_thread):
    model = tiny("transformer", **KINDS["both_tied"])
    enc, dec = model.encoder, model.decoder
    assert dec.head_words is enc.embeddings[0].weight
    assert all(a is b.weight for a, b in zip(dec.out, enc.embeddings[1:], strict=True))
    assert all(a is b.weight for a, b in zip(dec.proj, enc.projections[1:], strict=True))
    untied = tiny("transformer", **{**KINDS["both_tied"], "tied": False})
    shared = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters())
    assert shared == dec.head_words.numel() + sum(p.numel() for p in dec.out) + sum(p.numel() for p in dec.proj)
    # A tied checkpoint reloads tied.
    again = tiny("transformer", seed=5, **KINDS["both_tied"])
    again.load_state_dict(model.state_dict())
    assert again.decoder.head_words is again.encoder.embeddings[0].weight
    assert torch.equal(again.decoder.head_words, model.decoder.head_words)


def test_the_clustered_path_costs_less_than_the_full_softmax():
    full = model_config("lstm", emsize=200, nhid=200)
    ada = model_config("lstm", emsize=200, nhid=200, softmax="adaptive", cutoffs=[2000, 10000])
    assert output_flops(ada, 200, 33278) < output_flops(full, 200, 33278) / 4


@pytest.mark.parametrize("values,match", [
    ({"softmax": "adaptive", "cutoffs": [10, 60]}, r"model.cutoffs=\[10, 60\] do not fit a vocabulary of 60 words"),
    ({"softmax": "adaptive", "cutoffs": [30, 10]}, "must be one or more increasing word counts"),
    ({"softmax": "adaptive", "tied": True, "cutoffs": CUT}, "set both model.softmax=adaptive and model.adaptive_input"),
    ({"adaptive_input": True, "tied": True, "cutoffs": CUT}, "set both model.softmax=adaptive"),
    ({"softmax": "sampled"}, "model.softmax='sampled': use full|adaptive"),
    ({"softmax": "adaptive", "div_value": 0.5}, "model.div_value=0.5 must be >= 1"),
])
def test_mistakes_are_one_line(values, match):
    with pytest.raises(UserError, match=match):
        tiny("lstm", **values)


def test_a_run_with_adaptive_layers_trains_evaluates_and_generates(tmp_path):
    corpus = write_corpus(tmp_path / "c", {"train": 150, "valid": 20, "test": 20}, vocab=60)
    run = tmp_path / "run"
    run_cli("train.py", train_args(corpus, run, "trainer.max_steps=20", "model.softmax=adaptive",
                                   "model.adaptive_input=true", "model.tied=true", "model.cutoffs=[10,30]"),
            check=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and math.isfinite(metrics["test_ppl"])
    assert metrics["config"]["model.softmax"] == "adaptive" and metrics["config"]["model.cutoffs"] == [10, 30]
    ckpt = run / "checkpoints" / "best.pt"
    ev = subprocess.run([sys.executable, "-m", "wordlm.evaluate", f"checkpoint={ckpt}", "split=test"],
                        capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(ev.stdout.strip().splitlines()[-1])["perplexity"] == pytest.approx(metrics["test_ppl"], rel=1e-6)
    out = run_cli("generate.py", [f"checkpoint={ckpt}", "words=20", f"outf={tmp_path / 'g.txt'}"], check=True)
    words = (tmp_path / "g.txt").read_text().split()  # 20 words; each <eos> is written as a line break
    assert words and all(w == "<unk>" or (w[0] == "w" and 0 <= int(w[1:]) < 60) for w in words), out.stderr


@pytest.mark.parametrize("preset,params_m", [("wt103_adaptive_input_base", 247), ("wt103_transformer_xl_base", 151)])
def test_the_wikitext103_presets_compose_to_the_published_sizes(preset, params_m):
    """At WikiText-103's vocabulary (267,735 words and <eos>), built on the meta device (no memory)."""
    from wordlm.bench import compose
    from wordlm.models import count_params

    cfg = compose([f"experiment={preset}"])
    assert cfg.data.name == "wikitext103" and cfg.model.softmax == "adaptive" and cfg.model.adaptive_input
    with torch.device("meta"):
        model = build_model(cfg.model, 267_736)
    # Transformer-XL's own count includes its relative-position parameters, which wordlm's transformer lacks.
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.02)
    assert model.decoder.head_words is model.encoder.embeddings[0].weight  # tied


def test_the_cpu_speedrun_preset_is_the_classic_model_with_tied_adaptive_layers():
    from wordlm.bench import compose

    cfg = compose(["experiment=cpu_speedrun"])
    m = cfg.model
    assert (m.name, m.emsize, m.nhid, m.nlayers, m.dropout) == ("lstm", 200, 200, 2, 0.2)
    assert (m.softmax, m.adaptive_input, m.tied, m.cutoffs) == ("adaptive", True, True, [2000, 6000])
    assert (cfg.optim.name, cfg.optim.lr, cfg.trainer.batch_size, cfg.trainer.bptt) == ("sgd", 20.0, 20, 35)
