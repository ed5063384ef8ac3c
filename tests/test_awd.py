"""The AWD-LSTM recipe, each part against a hand computation on a tiny model, then together with exact resume.

Weight drop, locked and embedding dropout (wordlm/models/rnn.py); AR/TAR, NT-ASGD and variable-length
BPTT (wordlm/training/recipe.py); the presets (conf/experiment/awd_lstm_*.yaml).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import run_cli, train_args

from wordlm import checkpoint
from wordlm.config import Config, LossConfig, OptimConfig, TrainerConfig, UserError, validate
from wordlm.data import read_corpus
from wordlm.evaluation.scoring import nll
from wordlm.models import build_model, model_config
from wordlm.models.rnn import RNNLayer, embedding_dropout, locked_dropout
from wordlm.trainer import Trainer
from wordlm.training import Callback
from wordlm.training.recipe import NTASGD, ActivationPenalty, VariableWindowLength, nonmono_fired

pytestmark = pytest.mark.usefixtures("one_thread")

AWD_TINY = dict(emsize=8, nhid=12, last_nhid=8, nlayers=3, tied=True, locked=True, dropout=0.3, dropouth=0.2,
                dropouti=0.4, dropoute=0.1, wdrop=0.5)


def awd_cfg(optim: OptimConfig | None = None, loss: LossConfig | None = None, **trainer) -> Config:
    kw = dict(batch_size=4, eval_batch_size=4, bptt=8, epochs=3, log_interval=5, progress=False, sample_words=0,
              threads=1, device="cpu", precision="fp32", compile=False, variable_bptt=True)
    kw.update(trainer)
    return Config(model=model_config("lstm", **AWD_TINY),
                  optim=optim or OptimConfig(lr=5.0, schedule="constant", weight_decay=1.2e-6, ntasgd=True,
                                             nonmono=1),
                  trainer=TrainerConfig(**kw), loss=loss or LossConfig(ar=2.0, tar=1.0))


# ---------------------------------------------------------------------------- model-side regularisers
def test_locked_dropout_masks_are_shared_over_time_and_differ_between_sequences():
    torch.manual_seed(0)
    y = locked_dropout(torch.ones(20, 6, 50), 0.5, training=True)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every time step
    assert set(y.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1 / (1 - p)
    assert all(not torch.equal(y[0, 0], y[0, b]) for b in range(1, 6))  # each sequence its own mask
    x = torch.randn(5, 3, 4)
    assert locked_dropout(x, 0.5, training=False) is x

    # In the model: the output dropout's mask (hidden / raw_hidden) is one per sequence, the same at every step.
    torch.manual_seed(1)
    m = build_model(model_config("lstm", **AWD_TINY), 30).train()
    _, _, aux = m(torch.randint(0, 30, (9, 5)), None, aux=True)
    ratio = aux["hidden"] / aux["raw_hidden"]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))
    kept = ratio != 0
    assert torch.allclose(ratio[kept], torch.full_like(ratio[kept], 1 / 0.7)) and 0 < kept.float().mean() < 1


def test_embedding_dropout_drops_whole_words():
    torch.manual_seed(0)
    emb = nn.Embedding(40, 6)
    tokens = torch.arange(40).repeat(5).view(20, 10)  # every word 5 times
    out = embedding_dropout(emb, tokens, 0.5, training=True)
    dropped = set()
    for w in range(40):
        rows = out[tokens == w]
        if torch.all(rows == 0):
            dropped.add(w)
        else:  # kept: every occurrence is the word's vector / (1 - p)
            assert torch.allclose(rows, (emb.weight[w] / 0.5).expand_as(rows))
    assert 5 < len(dropped) < 35
    assert torch.equal(embedding_dropout(emb, tokens, 0.5, training=False), emb(tokens))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_weight_drop_masks_the_recurrent_matrix_anew_every_forward_and_not_in_eval(kind):
    torch.manual_seed(0)
    layer = RNNLayer(kind, 5, 7, wdrop=0.5)
    ref = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN}[kind](5, 7)  # the hand computation: torch's own RNN
    x = torch.randn(6, 3, 5)

    def ref_out(w_hh):
        with torch.no_grad():
            ref.weight_ih_l0.copy_(layer.weight_ih)
            ref.weight_hh_l0.copy_(w_hh)
            ref.bias_ih_l0.copy_(layer.bias_ih)
            ref.bias_hh_l0.copy_(layer.bias_hh)
            return ref(x)[0]

    outs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out, _ = layer(x, None)
        torch.manual_seed(seed)  # the same draw: the mask drop_weight put on the matrix (rand >= p kept, / (1 - p))
        mask = (torch.rand_like(layer.weight_hh) >= 0.5).float() / 0.5
        assert 0.3 < (mask == 0).float().mean() < 0.7
        assert torch.allclose(out, ref_out(layer.weight_hh * mask), atol=1e-6)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1])  # a new mask each forward
    out.sum().backward()
    assert layer.weight_hh.grad is not None and layer.weight_hh.grad.abs().sum() > 0
    layer.eval()
    assert torch.allclose(layer(x, None)[0], ref_out(layer.weight_hh), atol=1e-6)  # eval: the full matrix


def test_per_layer_sizes_tie_the_decoder_to_the_embedding_and_defaults_stay_the_classic_model():
    m = build_model(model_config("lstm", emsize=8, nhid=12, last_nhid=8, nlayers=3, tied=True), 30)
    assert [(lay.weight_ih.shape[1], lay.hidden_size) for lay in m.layers] == [(8, 12), (12, 12), (12, 8)]
    assert m.decoder.weight is m.encoder.weight
    state = m.init_state(2)
    assert [tuple(s.shape) for s in state] == [(1, 2, 12)] * 4 + [(1, 2, 8)] * 2  # h, c per layer
    m.eval()
    x = torch.randint(0, 30, (10, 2))
    a, st = m(x[:6], None)
    b, _ = m(x[6:], st)
    whole, _ = m(x, None)
    assert torch.allclose(torch.cat([a, b]), whole, atol=1e-5)  # the carried state is the whole state
    classic = build_model(model_config("lstm"), 30)
    assert isinstance(classic.rnn, nn.LSTM) and not hasattr(classic, "layers")  # defaults: the classic nn.LSTM
    with pytest.raises(UserError, match="model.last_nhid=8"):
        model_config("lstm", emsize=10, nhid=12, last_nhid=8, tied=True).validate()


def test_a_checkpoint_from_before_the_awd_keys_rebuilds_the_classic_model():
    from wordlm.models import config_from_dict

    old = {"name": "lstm", "emsize": 16, "nhid": 16, "nlayers": 2, "dropout": 0.2, "tied": False}
    cfg = config_from_dict(old, strict=True)
    assert not cfg.layered and cfg.wdrop == 0 and cfg.dropoute == 0 and cfg.p("dropouti") == 0.2


# ---------------------------------------------------------------------------- AR / TAR
def test_ar_and_tar_equal_the_formula_and_leave_the_reported_loss_the_nll():
    torch.manual_seed(0)
    h, raw = torch.randn(7, 3, 5), torch.randn(7, 3, 5)
    aux = {"hidden": h, "raw_hidden": raw}
    ar = sum(float(v) ** 2 for v in h.flatten()) / h.numel()
    pairs = zip(raw[1:].flatten(), raw[:-1].flatten(), strict=True)
    tar = sum(float(a - b) ** 2 for a, b in pairs) / raw[1:].numel()
    got = ActivationPenalty(2.0, 1.0)(aux, torch.zeros(7, 3, 4), torch.zeros(7, 3, dtype=torch.long))
    assert math.isclose(float(got), 2.0 * ar + 1.0 * tar, rel_tol=1e-5)
    assert float(ActivationPenalty(0.0, 0.0)(aux, torch.zeros(1), None)) == 0.0

    from wordlm.training.step import forward_loss

    m = build_model(model_config("lstm", **AWD_TINY), 30).train()
    x, y = torch.randint(0, 30, (8, 4)), torch.randint(0, 30, (8, 4))
    torch.manual_seed(3)
    nll_, total, _ = forward_loss(m, x, y, None, torch.device("cpu"), "fp32", (ActivationPenalty(2.0, 1.0),))
    torch.manual_seed(3)  # the same dropout masks
    logp, _, aux = m(x, None, aux=True)
    assert torch.allclose(nll_, F.nll_loss(logp.view(-1, 30), y.view(-1)))
    want = nll_ + 2.0 * aux["hidden"].pow(2).mean() + (aux["raw_hidden"][1:] - aux["raw_hidden"][:-1]).pow(2).mean()
    assert torch.allclose(total, want)


# ---------------------------------------------------------------------------- NT-ASGD
def test_the_nonmono_trigger_is_the_reference_condition():
    losses = [5.0, 4.0, 3.0, 3.4, 3.3, 3.2, 3.1, 2.95, 3.05, 2.0]
    fired = []
    history = []
    for v in losses:
        fired.append(nonmono_fired(history, v, 5))
        history.append(v)
    # 3.4 > 3.0 at the 4th check is not enough (no more than nonmono checks yet); at the 9th, 3.05 is worse than
    # the best of all checks but the last five (3.0).
    assert fired == [False] * 8 + [True, False]


class Record(Callback):
    """After NT-ASGD (it runs first): the raw weights after every step and what each validation reported."""

    def __init__(self):
        self.raw, self.vals, self.lrs, self.lengths, self.last_pos = {}, [], [], [], 0

    def on_step_end(self, trainer):
        self.raw[trainer.step] = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        self.lrs.append(trainer.schedule.lr)
        # This step's window: the advance of the position (which restarts at 0 after an epoch end).
        self.lengths.append(trainer.pos - self.last_pos if trainer.pos > self.last_pos else trainer.pos)
        self.last_pos = trainer.pos

    def on_validation_end(self, trainer, loss, improved):
        self.vals.append((trainer.step, loss))


def _fit(corpus: Path, run: Path, resume: bool = False, **trainer):
    rec = Record()
    t = Trainer(awd_cfg(**trainer), read_corpus(corpus), run, callbacks=[rec])
    if resume:
        t.resume(run / "checkpoints" / "last.pt")
    return t, t.fit(), rec


def test_ntasgd_switches_on_the_trigger_validates_on_the_averages_and_resumes_exactly(corpus, tmp_path):
    ref, m, rec = _fit(corpus, tmp_path / "ref", max_steps=48, eval_every=6)
    nt = ref.callbacks[0]
    assert isinstance(nt, NTASGD) and nt.averaging and nt.switched_at is not None
    # It switched at the first validation where the reference's condition held, not before.
    losses = [v for _, v in rec.vals]
    first = next(i for i in range(len(losses)) if nonmono_fired(losses[:i], losses[i], 1))
    assert nt.switched_at == rec.vals[first][0]
    # The averages are the mean of the raw weights after every step since the switch...
    steps = [s for s in rec.raw if s > nt.switched_at]
    assert nt.count == len(steps)
    for i, name in enumerate(nt._names):
        mean = torch.stack([rec.raw[s][name] for s in steps]).mean(0)
        assert torch.allclose(nt.avg[i], mean, atol=1e-6), name
    # ...and validation scored them: the last scheduled validation equals scoring the averaged weights by hand.
    model = build_model(ref.cfg.model, len(ref.corpus.vocab))
    last_val_step = rec.vals[-1][0]
    n = len([s for s in steps if s <= last_val_step])
    weights = ref.model.state_dict()
    weights.update({k: torch.stack([rec.raw[s][k] for s in steps[:n]]).mean(0) for k in nt._names})
    weights["decoder.weight"] = weights["encoder.weight"]  # tied
    model.load_state_dict(weights)
    assert math.isclose(nll(model, ref.eval_data["valid"], 8, torch.device("cpu"), "fp32"), rec.vals[-1][1],
                        rel_tol=1e-5)
    # The variable windows scaled each step's lr by length / bptt (checked inside the first epoch: its last window
    # may be cut short by the end of the data).
    assert sum(rec.lengths[:20]) < ref.train_data.size(0) - 1
    for length, lr in zip(rec.lengths[:20], rec.lrs[:20], strict=True):
        assert math.isclose(lr, 5.0 * length / 8, rel_tol=1e-9)
    assert len(set(rec.lengths[:20])) > 2

    # Stop before the switch, resume; stop after it, resume: the same run, weights, averages and test loss.
    run = tmp_path / "run"
    _fit(corpus, run, max_steps=nt.switched_at - 2, eval_every=6)
    _fit(corpus, run, resume=True, max_steps=nt.switched_at + 7, eval_every=6)
    t, m2, _ = _fit(corpus, run, resume=True, max_steps=48, eval_every=6)
    assert t.callbacks[0].switched_at == nt.switched_at and t.callbacks[0].count == nt.count
    raw_ref = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]  # the raw weights at the stop
    raw_run = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    for k, v in raw_ref.items():
        assert torch.equal(raw_run[k], v), k
    for k, v in ref.model.state_dict().items():  # the tested (best) weights
        assert torch.equal(t.model.state_dict()[k], v), k
    for a, b in zip(t.callbacks[0].avg, nt.avg, strict=True):
        assert torch.equal(a, b)
    assert m2["test_loss"] == m["test_loss"] and m2["best_valid_loss"] == m["best_valid_loss"]
    best = checkpoint.load(tmp_path / "ref" / "checkpoints" / "best.pt")
    assert best["trainer"]["step"] > nt.switched_at  # the averaged weights won: best.pt holds them
    assert torch.equal(best["model"]["encoder.weight"], best["trainer"]["callbacks"][0]["avg"]["encoder.weight"])


def test_finetune_averages_from_the_start_and_stops_on_the_trigger(corpus, tmp_path):
    first, _, _ = _fit(corpus, tmp_path / "first", max_steps=12, eval_every=6)
    best = tmp_path / "first" / "checkpoints" / "best.pt"
    ft = OptimConfig(lr=5.0, schedule="constant", finetune=True, nonmono=1)
    cfg = awd_cfg(optim=ft, init_from=str(best), eval_every=3, max_steps=90)
    validate(cfg)
    t = Trainer(cfg, read_corpus(corpus), tmp_path / "ft")
    start = nll(t.model, t.eval_data["valid"], 8, torch.device("cpu"), "fp32")
    m = t.fit()
    nt = t.callbacks[0]
    assert nt.switched_at == 0 and nt.count == m["steps"]  # averaged from the first step
    assert m["stop_reason"] == "nonmono" and m["steps"] < 90
    assert nonmono_fired(nt.history[:-1], nt.history[-1], 1)
    # The loaded model's own score was the best to beat (the reference's finetune.py).
    assert m["best_valid_loss"] <= start and start not in nt.history
    # Resumed, a finished finetuning stays finished.
    again = Trainer(cfg, read_corpus(corpus), tmp_path / "ft")
    again.resume(tmp_path / "ft" / "checkpoints" / "last.pt")
    assert again.fit()["steps"] == m["steps"]
    with pytest.raises(UserError, match="trainer.init_from="):
        validate(awd_cfg(optim=ft))
    with pytest.raises(UserError, match="pick one"):
        validate(awd_cfg(optim=OptimConfig(ntasgd=True, finetune=True), init_from=str(best)))


# ---------------------------------------------------------------------------- variable BPTT
def test_variable_bptt_lengths_follow_the_reference_distribution_and_scale_the_lr():
    w = VariableWindowLength(70, seed=0)
    draws = [w.next(i) for i in range(20000)]
    lengths = torch.tensor([n for n, _ in draws], dtype=torch.float)
    assert all(math.isclose(s, n / 70) for n, s in draws)
    assert lengths.min() >= 5
    short = lengths < 52  # N(35, 5) vs N(70, 5): 3.5 sigma apart
    assert 0.04 < short.float().mean() < 0.06  # bptt / 2 with probability 0.05
    long = lengths[~short]
    # int() truncates towards zero, as the reference's int(np.random.normal(bptt, 5)): mean 69.5, sd ~5.
    assert abs(long.mean() - 69.5) < 0.15 and abs(long.std() - 5.0) < 0.15
    assert abs(lengths[short].mean() - 34.5) < 0.6
    again = VariableWindowLength(70, seed=0)
    again.load_state_dict(w.state_dict())
    assert [again.next(0) for _ in range(5)] == [w.next(0) for _ in range(5)]  # the stream resumes


# ---------------------------------------------------------------------------- precision, presets
def test_bf16_autocast_trains_the_awd_model(corpus, tmp_path):
    t = Trainer(awd_cfg(precision="bf16", max_steps=4), read_corpus(corpus), tmp_path)
    m = t.fit()
    assert math.isfinite(m["test_loss"]) and m["bad_steps"] == 0


def test_presets_compose_to_the_papers_models():
    from wordlm.bench import compose

    wt2 = compose(["experiment=awd_lstm_wt2"])
    assert wt2.model.sizes == [1150, 1150, 400] and wt2.model.tied and wt2.model.locked
    assert (wt2.model.dropout, wt2.model.dropouth, wt2.model.dropouti, wt2.model.dropoute, wt2.model.wdrop) == (
        0.4, 0.2, 0.65, 0.1, 0.5)
    assert (wt2.loss.ar, wt2.loss.tar, wt2.optim.lr, wt2.optim.weight_decay, wt2.optim.ntasgd) == (
        2.0, 1.0, 30.0, 1.2e-6, True)
    assert (wt2.trainer.batch_size, wt2.trainer.bptt, wt2.trainer.epochs, wt2.trainer.seed) == (80, 70, 750, 1882)
    # The paper's parameter count: 33M on WikiText-2's 33,278 words, 24M on PTB's 10,000.
    assert sum(p.numel() for p in build_model(wt2.model, 33278).parameters()) == 33_556_078
    ptb = compose(["experiment=awd_lstm_ptb"])
    assert (ptb.model.dropouti, ptb.model.dropouth, ptb.trainer.batch_size, ptb.trainer.seed) == (0.4, 0.25, 20, 141)
    assert ptb.data.name == "ptb" and ptb.trainer.epochs == 500
    assert sum(p.numel() for p in build_model(ptb.model, 10000).parameters()) == 24_221_600
    ft = compose(["experiment=awd_lstm_wt2_finetune", "trainer.init_from=x.pt"])
    assert ft.optim.finetune and not ft.optim.ntasgd and ft.model == wt2.model
    small = compose(["experiment=awd_lstm_small"])
    assert small.model.locked and small.model.tied and small.optim.ntasgd and small.trainer.max_minutes == 20


@pytest.mark.slow
def test_the_awd_recipe_trains_from_the_command_line(corpus, tmp_path):
    run = tmp_path / "run"
    args = train_args(corpus, run, "model.emsize=16", "model.nhid=24", "model.last_nhid=16", "model.nlayers=3",
                      "model.tied=true", "model.locked=true", "model.wdrop=0.5", "model.dropoute=0.1",
                      "model.dropouti=0.3", "model.dropouth=0.2", "optim=ntasgd", "optim.lr=5", "optim.nonmono=1",
                      "loss.ar=2", "loss.tar=1", "trainer.variable_bptt=true", "trainer.eval_every=5",
                      "trainer.max_steps=30")
    p = run_cli("train.py", args, check=True)
    log = (run / "train.log").read_text()
    assert "recipe: weight drop 0.5, embedding dropout 0.1, locked dropout" in log
    assert "NT-ASGD: valid loss" in log and "averaging the weights from step" in log
    assert "warn" not in p.stderr.lower()
    p = run_cli("generate.py", [f"checkpoint={run}/checkpoints/best.pt", "words=20"], check=True)
    assert "20 words in" in p.stderr and p.stdout.split()
