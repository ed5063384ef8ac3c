"""Every model answers the same interface: forward(tokens (T, B), state) -> (log_probs (T, B, V), state)."""

from __future__ import annotations

import pytest
import torch

from wordlm.config import ModelConfig, UserError
from wordlm.models import RNNModel, TransformerModel, build_model, count_params, detach_state, model_config

V, T, B = 23, 7, 3
RNNS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
ALL = (*RNNS, "transformer")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name: str, tied: bool = False, **kw) -> ModelConfig:
    base = {"name": name, "emsize": 16, "nhid": 16, "nlayers": 2, "dropout": 0.1, "tied": tied}
    if name == "transformer":
        base["nhead"] = 2
    base.update(kw)
    return model_config(**base)


def tokens(T: int = T, B: int = B, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("name", ALL)
def test_output_shape_state_and_normalisation(name, tied):
    torch.manual_seed(0)
    cfg = tiny(name, tied)
    model = build_model(cfg, V)
    assert isinstance(model, TransformerModel if name == "transformer" else RNNModel)
    x = tokens()
    for mode in ("train", "eval"):
        model.train(mode == "train")
        logp, state = model(x)
        assert logp.shape == (T, B, V)
        assert logp.dtype == torch.float32
        assert torch.isfinite(logp).all()
        assert (logp <= 1e-6).all()
        # Each row is a distribution over the vocabulary.
        torch.testing.assert_close(logp.exp().sum(-1), torch.ones(T, B), atol=1e-5, rtol=0)

        if name == "transformer":
            assert state is None
        elif name == "lstm":
            h, c = state
            assert h.shape == c.shape == (cfg.nlayers, B, cfg.nhid)
        else:
            assert isinstance(state, torch.Tensor) and state.shape == (cfg.nlayers, B, cfg.nhid)

        # The returned state is accepted back (what the trainer does between BPTT windows).
        logp2, state2 = model(x, detach_state(state))
        assert logp2.shape == (T, B, V)
        assert (state2 is None) == (state is None)

    # Gradients reach the embedding (through the decoder too when tied).
    model.train()
    logp, _ = model(x)
    logp.sum().backward()
    assert model.encoder.weight.grad is not None and model.encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_tied_weights_are_shared(name):
    untied = build_model(tiny(name, False), V)
    tied = build_model(tiny(name, True), V)
    assert tied.decoder.weight is tied.encoder.weight
    assert untied.decoder.weight is not untied.encoder.weight
    # A shared matrix is one set of parameters, counted once.
    assert count_params(untied) - count_params(tied) == V * 16
    # And its state_dict still loads into a fresh tied model (what a checkpoint does).
    fresh = build_model(tiny(name, True), V)
    fresh.load_state_dict(tied.state_dict())
    assert torch.equal(fresh.decoder.weight, tied.encoder.weight)


def test_transformer_tied_needs_no_equal_nhid():
    # The transformer's decoder reads emsize-wide outputs; nhid is the feed-forward width.
    model = build_model(tiny("transformer", True, emsize=16, nhid=40), V)
    logp, _ = model(tokens())
    assert logp.shape == (T, B, V)


def as_tuple(state) -> tuple:
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


@pytest.mark.parametrize("name", RNNS)
def test_rnn_state_carries_the_past(name):
    """Running a sequence in two windows with the state carried equals running it at once (eval mode)."""
    torch.manual_seed(0)
    model = build_model(tiny(name), V).eval()
    x = tokens(T=10)
    with torch.no_grad():
        whole, s_whole = model(x)
        first, s = model(x[:4])
        second, s_end = model(x[4:], s)
        torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=1e-5)
        for a, b in zip(as_tuple(s_end), as_tuple(s_whole), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # Without the state, the second window forgets the first: a different answer.
        fresh, _ = model(x[4:])
        assert not torch.allclose(fresh, second, atol=1e-4)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("layers,emsize,nhead", [(1, 16, 2), (2, 24, 3)])
def test_transformer_is_causal(grad, layers, emsize, nhead):
    """Changing token t+k leaves the log-probs at positions <= t unchanged, and changes those after."""
    torch.manual_seed(0)
    model = build_model(tiny("transformer", emsize=emsize, nhid=32, nlayers=layers, nhead=nhead, dropout=0.3), V)
    model.eval()
    n = 12
    x = tokens(T=n, B=2, seed=1)
    with torch.set_grad_enabled(grad):
        base, _ = model(x)
        for p in range(n):
            y = x.clone()
            y[p] = (y[p] + 1 + torch.arange(2)) % V  # a different token at position p, in both columns
            out, _ = model(y)
            if p > 0:
                torch.testing.assert_close(out[:p], base[:p], atol=1e-6, rtol=0,
                                           msg=f"positions < {p} changed when token {p} changed")
            # Position p itself sees token p, and so does every later position.
            diff = (out[p:] - base[p:]).abs().amax(dim=(1, 2))  # (n - p,)
            assert (diff > 1e-5).all(), f"changing token {p} left positions {p}.. (partly) unchanged: {diff}"


def test_transformer_positions_matter_and_any_length_works():
    torch.manual_seed(0)
    model = build_model(tiny("transformer", dropout=0.0), V).eval()
    with torch.no_grad():
        # Same token everywhere: only the positional encoding tells the positions apart.
        x = torch.full((5, 1), 3)
        logp, _ = model(x)
        assert not torch.allclose(logp[1], logp[4], atol=1e-5)
        # Longer than any cached table (the cache starts at 64 positions), then shorter again.
        long_logp, _ = model(tokens(T=150, B=2))
        assert long_logp.shape == (150, 2, V)
        short, _ = model(x)
        torch.testing.assert_close(short, logp)


def test_odd_embedding_size_transformer():
    model = build_model(tiny("transformer", emsize=15, nhead=3, nhid=8), V).eval()
    logp, state = model(tokens())
    assert logp.shape == (T, B, V) and state is None
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(T, B), atol=1e-5, rtol=0)


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    model = build_model(tiny("lstm", dropout=0.5), V)
    x = tokens()
    model.eval()
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x)
        torch.testing.assert_close(a, b)
        model.train()
        c, _ = model(x)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("cfg,words", [
    (tiny("lstm", True, emsize=16, nhid=20), ["model.tied", "model.nhid"]),
    (tiny("transformer", emsize=16, nhead=3), ["model.nhead=3", "model.emsize=16"]),
    (tiny("gru", nhid=0), ["model.nhid=0"]),
    (tiny("lstm", nlayers=0), ["model.nlayers=0"]),
    (ModelConfig(name="foo"), ["foo", "lstm", "transformer"]),
    (tiny("lstm", dropout=1.0), ["model.dropout"]),
])
def test_build_model_rejects_impossible_configs(cfg, words):
    with pytest.raises(UserError) as e:
        build_model(cfg, V)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
