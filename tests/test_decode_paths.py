"""Generation's fast paths (one word at a time on a CPU) compute what the ordinary forward computes.

The RNNs run their cell kernels for windows of up to ``CELL_STEPS`` steps outside training, and a decoder fed a few
rows multiplies a cached transpose of its weight (``wordlm.models.words.linear``): both only change how the same
arithmetic is laid out, so token-at-a-time log-probs and states must equal one forward over the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

from wordlm.models import build_model, model_config, words
from wordlm.models.rnn import CELL_STEPS
from wordlm.models.words import FEW_ROWS, few_rows

V = 50
RNN_VARIANTS = {
    "classic": {},
    "one-layer": {"nlayers": 1},
    "locked": {"locked": True},
    "weight-drop-3-layers": {"nlayers": 3, "wdrop": 0.3},
    "tied-last-nhid": {"emsize": 16, "last_nhid": 16, "tied": True},
    "adaptive": {"softmax": "adaptive", "adaptive_input": True, "tied": True, "cutoffs": [10, 30], "emsize": 32},
}


def states(s):
    return list(s) if isinstance(s, tuple) else [s]


@pytest.fixture
def transpose_all(monkeypatch):
    """The tests' tiny weights are below the size that takes the cached transpose: let every weight take it."""
    monkeypatch.setattr(words, "TRANSPOSE_MIN", 1)


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("opts", RNN_VARIANTS.values(), ids=RNN_VARIANTS.keys())
def test_rnn_word_at_a_time_equals_one_forward(name, opts, transpose_all):
    torch.manual_seed(0)
    values = {"emsize": 24, "nhid": 32, "dropout": 0.3, **opts}
    model = build_model(model_config(name, **values), V).eval()
    x = torch.randint(0, V, (3 * CELL_STEPS + 2, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, full_state = model(x)  # longer than CELL_STEPS: the fused kernel
        state, pieces, at = None, [], 0
        for n in (1, 1, CELL_STEPS, 2, 1, x.size(0) - CELL_STEPS - 5):  # cells, then the kernel again at the end
            logp, state = model(x[at:at + n], state)
            pieces.append(logp)
            at += n
    assert at == x.size(0)
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=0)
    for a, b in zip(states(state), states(full_state), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_training_and_autograd_never_take_the_fast_paths():
    torch.manual_seed(0)
    model = build_model(model_config("lstm", emsize=16, nhid=16), V)
    x = torch.randint(0, V, (1, 1))
    logp, _ = model(x)  # training mode, autograd on: the ordinary path, which has a graph
    assert logp.requires_grad
    model.eval()
    assert few_rows(torch.zeros(FEW_ROWS, 16)) is False  # autograd is on here
    with torch.no_grad():
        assert few_rows(torch.zeros(FEW_ROWS, 16)) and not few_rows(torch.zeros(FEW_ROWS + 1, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not few_rows(torch.zeros(1, 16))


def test_the_cached_transpose_follows_every_change_of_the_weights(transpose_all):
    torch.manual_seed(0)
    model = build_model(model_config("transformer", emsize=16, nhid=24, nhead=2, tied=True), V).eval()
    x = torch.randint(0, V, (1, 1))

    def one_word():
        with torch.no_grad():
            return model(x)[0]

    def reference():
        with torch.no_grad():
            return model(x.repeat(1, FEW_ROWS + 1))[0][:, :1]  # too many rows for the fast path

    before = one_word()
    assert "weight" in model.decoder.__dict__["_transposed"]  # (the fast path ran)
    torch.testing.assert_close(before, reference(), atol=1e-6, rtol=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # an in-place update of the (tied) decoder weight
    model.train()
    model(torch.randint(0, V, (8, 2)))[0].mean().backward()
    opt.step()
    model.eval()
    after = one_word()
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, reference(), atol=1e-6, rtol=0)
    fresh = build_model(model.cfg, V)
    model.load_state_dict(fresh.state_dict())  # copy_ into the same tensors
    torch.testing.assert_close(one_word(), reference(), atol=1e-6, rtol=0)
    assert not any(k.startswith("_transposed") for k in model.state_dict())
