"""The transformer's options, its incremental (key/value cache) decoding and its causal guarantee."""

from __future__ import annotations

import math

import pytest
import torch

from wordlm import checkpoint
from wordlm.config import Config, UserError, to_dict, validate
from wordlm.data import Vocab
from wordlm.models import build_model, model_config
from wordlm.sampling import Sampler, generate

V = 40
OPTIONS = {
    "classic": {},
    "pre-norm": {"norm_first": True},
    "gelu": {"activation": "gelu"},
    "learned-positions": {"positions": "learned", "max_len": 64},
    "scaled-init": {"init": "scaled", "nlayers": 3},
    "no-bias": {"bias": False},
    "tied": {"tied": True},
    "dropouts": {"attn_dropout": 0.1, "resid_dropout": 0.2},
    "all": {"norm_first": True, "activation": "gelu", "positions": "learned", "max_len": 64, "init": "scaled",
            "bias": False, "tied": True, "attn_dropout": 0.1, "resid_dropout": 0.3},
}


def tiny(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    values = {"emsize": 16, "nhid": 24, "nlayers": 2, "dropout": 0.3, "nhead": 2, **kw}
    return build_model(model_config("transformer", **values), V).eval()


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "cached-transposes"])
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_incremental_decoding_equals_the_full_causal_forward(opts, transposed, monkeypatch):
    from wordlm.models import words

    if transposed:  # every weight through the cached transposes generation uses for large ones
        monkeypatch.setattr(words, "TRANSPOSE_MIN", 1)
    model = tiny(**opts)
    seq = torch.randint(0, V, (40, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(seq)  # (T, B, V)
    cache = model.init_cache()
    pieces, at = [], 0
    for n in (5, 1, 1, 9, 1, 13, 1, 1, 8):  # a prompt, single tokens, chunks
        pieces.append(model.decode(seq[at:at + n], cache))
        at += n
    assert at == seq.size(0) and cache["len"] == at
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_changing_a_later_token_never_changes_earlier_log_probs(opts):
    model = tiny(**opts)
    gen = torch.Generator().manual_seed(2)
    seq = torch.randint(0, V, (24, 2), generator=gen)
    with torch.no_grad():
        base, _ = model(seq)
        for t in (0, 7, 22):
            changed = seq.clone()
            changed[t + 1:] = torch.randint(0, V, changed[t + 1:].shape, generator=gen)
            out, _ = model(changed)
            torch.testing.assert_close(out[: t + 1], base[: t + 1], atol=1e-5, rtol=0)
            assert not torch.allclose(out[t + 1:], base[t + 1:], atol=1e-4)  # (the later ones did change)


def test_options_build_what_they_say():
    classic = tiny()
    names = {n for n, _ in classic.named_parameters()}
    assert "layers.norm.weight" not in names and "pos.weight" not in names and "decoder.bias" in names
    pre = tiny(norm_first=True)
    assert pre.layers.norm is not None and all(layer.norm_first for layer in pre.layers.layers)
    assert not any(n.endswith("bias") for n, _ in tiny(bias=False).named_parameters())
    assert tiny(positions="learned", max_len=50).pos.weight.shape == (50, 16)
    assert tiny(activation="gelu").layers.layers[0].activation is torch.nn.functional.gelu
    drop = tiny(attn_dropout=0.1, resid_dropout=0.25)
    layer = drop.layers.layers[0]
    assert layer.self_attn.dropout == 0.1 and layer.dropout1.p == layer.dropout2.p == drop.drop.p == 0.25
    assert layer.dropout.p == 0.3  # inside the feed-forward: model.dropout
    deep = tiny(init="scaled", nlayers=8, emsize=64, nhid=256)
    w = deep.layers.layers[0]
    assert w.linear1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert w.linear2.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert w.self_attn.out_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert float(w.linear1.bias.detach().abs().max()) == 0.0


def test_learned_positions_refuse_windows_longer_than_max_len():
    cfg = Config(model=model_config("transformer", positions="learned", max_len=32))
    cfg.trainer.bptt = 35
    with pytest.raises(UserError, match=r"trainer.bptt=35 needs windows of up to 35 tokens, longer than "
                                        r"model.max_len=32 .*set model.max_len=35"):
        validate(cfg)
    cfg.trainer.bptt, cfg.trainer.variable_bptt = 30, True
    with pytest.raises(UserError, match="with variable_bptt needs windows of up to 70"):
        validate(cfg)
    with pytest.raises(UserError, match="model.activation='swish': use relu|gelu"):
        model_config("transformer", activation="swish").validate()


def test_sampler_decodes_incrementally_and_slides_by_half_a_window():
    model = tiny(norm_first=True)
    ctx = 8
    s = Sampler(model, "cpu", context=ctx)
    seq = [int(t) for t in torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(3))]
    logp = s.feed(seq[:5])
    lengths = []
    for i in range(5, len(seq)):
        history = s.history
        with torch.no_grad():
            ref, _ = model(torch.tensor(history).unsqueeze(1))
        torch.testing.assert_close(logp, ref[-1, 0], atol=1e-5, rtol=0)  # the window it holds, scored as one
        assert history == seq[:i][-len(history):]
        lengths.append(len(history))
        logp = s.feed([seq[i]])
    # Up to the context, then from half of it again: never more than ctx, never less than ctx // 2.
    assert max(lengths) == ctx and min(lengths[3:]) == ctx // 2 and lengths[:4] == [5, 6, 7, 8]


def test_a_checkpoint_from_before_the_options_loads_and_samples_identically(tmp_path):
    model = tiny()
    cfg = Config(model=model.cfg)
    saved = to_dict(cfg)
    for key in ("norm_first", "activation", "positions", "max_len", "init", "attn_dropout", "resid_dropout", "bias",
                "dropoute"):
        del saved["model"][key]  # what a checkpoint written before these keys holds
    vocab = Vocab(["<unk>", "<eos>"] + [f"w{i}" for i in range(V - 2)])
    path = tmp_path / "old.pt"
    payload = checkpoint.payload(cfg, vocab, model.state_dict())
    payload["config"] = saved
    checkpoint.save(path, payload)
    loaded = checkpoint.load_model(path).model.eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    seq = torch.randint(0, V, (20, 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq)[0], model(seq)[0], atol=0, rtol=0)

    def sample(m):
        return generate(m, [3, 4], 30, "cpu", start=1, context=64, generator=torch.Generator().manual_seed(5))

    def windowed(m):  # the sampler before the key/value cache: the whole window re-run for every word
        out, ids, gen = [], [3, 4], torch.Generator().manual_seed(5)
        from wordlm.sampling import draw

        for _ in range(30):
            with torch.no_grad():
                logp = m(torch.tensor(ids).unsqueeze(1))[0][-1, 0]
            out.append(draw(logp, 1.0, 0, 1.0, gen))
            ids.append(out[-1])
        return out

    assert sample(loaded) == sample(model) == windowed(model)


# ---------------------------------------------------------------------------- evaluation with context
class PositionProbe(torch.nn.Module):
    """Stateless like the transformer, and scores nothing: it records the windows it is given (the test's tokens
    are their own positions)."""

    scores_targets = True

    def __init__(self):
        super().__init__()
        self.windows: list = []

    def init_state(self, batch_size: int, device=None):
        return None

    def forward(self, x, state=None, targets=None):
        self.windows.append(x[:, 0].tolist())
        if targets is not None:
            return targets.float(), None  # "log-prob" of each target = its position: what is scored shows
        return torch.zeros(x.size(0), x.size(1), 128), None


@pytest.mark.parametrize("context", [0, 1, 3, 7])
def test_evaluation_with_context_scores_each_token_once_with_its_history(monkeypatch, context):
    from wordlm.evaluation import scoring

    bptt, T = 8, 101
    data = torch.arange(T).unsqueeze(1).repeat(1, 2)  # (T, B): each token is its position
    scored = []
    real = scoring._summed

    def spy(target_logp):
        scored.append([int(v) for v in target_logp[:, 0].tolist()])
        return real(target_logp)

    monkeypatch.setattr(scoring, "_summed", spy)
    probe = PositionProbe()
    scoring.nll(probe, data, bptt, torch.device("cpu"), context=context)
    assert [p for window in scored for p in window] == list(range(1, T))  # every target once, in order
    for window, targets in zip(probe.windows, scored, strict=True):
        assert len(window) <= bptt and window == list(range(window[0], window[-1] + 1))
        for p in targets:  # the target at p is predicted from p - 1 with min(context, p - 1) tokens before it
            assert window[0] <= max(0, p - 1 - context) and p - 1 <= window[-1]


def test_evaluation_with_no_context_is_the_plain_evaluation_and_rnns_ignore_it():
    from wordlm.evaluation.scoring import eval_context, nll

    model = tiny(norm_first=True)
    data = torch.randint(0, V, (90, 3), generator=torch.Generator().manual_seed(6))
    cpu = torch.device("cpu")
    plain = nll(model, data, 8, cpu)
    assert nll(model, data, 8, cpu, context=0) == plain
    assert nll(model, data, 8, cpu, context=eval_context(model, None, 8)) != plain  # (null = 4: it does change)
    assert eval_context(model, None, 8) == 4 and eval_context(model, 0, 8) == 0
    rnn = build_model(model_config("gru", emsize=16, nhid=16, nlayers=1), V).eval()
    assert eval_context(rnn, 5, 8) == 0  # carries its state: every window already has all of the past
    with pytest.raises(ValueError, match="eval_context=8 must be in"):
        eval_context(model, 8, 8)


def test_the_transformer_small_preset_composes_to_what_it_says():
    from wordlm.bench import compose
    from wordlm.models import count_params

    cfg = compose(["experiment=transformer_small"])
    m = cfg.model
    assert (m.name, m.norm_first, m.activation, m.init, m.tied) == ("transformer", True, "gelu", "scaled", True)
    assert cfg.trainer.bptt > 35 and cfg.trainer.max_minutes == 20
    assert (cfg.optim.name, cfg.optim.schedule) == ("adamw", "cosine") and cfg.optim.warmup_steps > 0
    assert cfg.optim.schedule_over == "time" and validate(cfg) is None  # the cosine ends with the 20 minutes
    assert (m.softmax, m.adaptive_input, list(m.cutoffs)) == ("adaptive", True, [2000, 6000])
    assert 3e6 < count_params(build_model(m, 13777)) < 4e6  # on wikitext-2-small's vocabulary (tied bands)


def test_embedding_dropout_drops_whole_words_in_training_only():
    model = tiny(dropoute=0.5, dropout=0.0)
    tokens = torch.tensor([[3, 3, 5, 5, 3, 7, 7, 7]]).t()  # (T, 1): repeated words
    model.train()
    torch.manual_seed(0)
    emb = model._embed(tokens) - model.positions(tokens.size(0), "cpu")  # (T, 1, E): the words' vectors alone
    dropped = emb.abs().sum(-1).squeeze(1) == 0
    for w in (3, 5, 7):  # a word is dropped everywhere it occurs, or nowhere
        assert len(set(dropped[tokens[:, 0] == w].tolist())) == 1
    assert dropped.any() and not dropped.all()
    kept = ~dropped
    torch.testing.assert_close(emb[kept], 2 * model.encoder(tokens)[kept] * model.scale)  # the rest / (1 - p)
    model.eval()
    torch.testing.assert_close(model._embed(tokens), model.encoder(tokens) * model.scale
                               + model.positions(tokens.size(0), "cpu"))
    with pytest.raises(UserError, match=r"model.dropoute=1.0 must be in \[0, 1\)"):
        model_config("transformer", dropoute=1.0).validate()
