"""short_run (issue 27): lighter dropouts where the budget holds few epochs, decided once at 5 % of the budget from
the run's pace, used by every training step after it, kept by resume and reported in metrics.json."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from wordlm import checkpoint
from wordlm.config import Config, OptimConfig, ShortRunConfig, TrainerConfig, UserError, validate
from wordlm.data import read_corpus
from wordlm.models import model_config
from wordlm.tracking import Tracker
from wordlm.trainer import Trainer
from wordlm.training.recipe import ShortRun

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERED = dict(emsize=8, nhid=12, last_nhid=8, nlayers=2, tied=True, locked=True, dropout=0.5, dropouth=0.5,
               dropouti=0.5, dropoute=0.2, wdrop=0.5)
NONE = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0, wdrop=0.0)


def _cfg(short: ShortRunConfig, model: dict = None, name: str = "lstm", **trainer) -> Config:
    kw = dict(batch_size=4, eval_batch_size=4, bptt=8, epochs=3, log_interval=5, progress=False, sample_words=0,
              threads=1, device="cpu", precision="fp32", compile=False)
    kw.update(trainer)
    return Config(model=model_config(name, **(LAYERED if model is None else model)),
                  optim=OptimConfig(lr=5.0, schedule="constant"), trainer=TrainerConfig(**kw), short_run=short)


@pytest.mark.parametrize("short, message", [
    (ShortRunConfig(epochs=0, dropout=0.1), r"short_run.epochs=0 must be > 0"),
    (ShortRunConfig(epochs=5, wdrop=1.0), r"short_run.wdrop=1.0 must be in \[0, 1\)"),
    (ShortRunConfig(epochs=5), r"short_run.epochs=5 changes nothing: set the dropouts"),
])
def test_bad_short_run_settings_are_one_line_each(short, message):
    with pytest.raises(UserError, match=message):
        validate(_cfg(short))


def test_a_model_that_cannot_change_a_dropout_is_refused_before_training(corpus, tmp_path):
    with pytest.raises(UserError, match=r"short_run.wdrop: model=lstm cannot change wdrop during a run .*model.wdrop"):
        Trainer(_cfg(ShortRunConfig(epochs=5, wdrop=0.1), dict(emsize=8, nhid=8, dropout=0.2)),
                read_corpus(corpus), tmp_path)
    with pytest.raises(UserError, match=r"model=transformer cannot change dropout .*needs an RNN"):
        Trainer(_cfg(ShortRunConfig(epochs=5, dropout=0.1), dict(emsize=8, nhid=8, nhead=2), name="transformer"),
                read_corpus(corpus), tmp_path)


def test_a_short_budget_switches_the_dropouts_at_5_percent_and_trains_with_them(corpus, tmp_path):
    t = Trainer(_cfg(ShortRunConfig(epochs=50, **NONE), max_steps=40), read_corpus(corpus), tmp_path,
                Tracker(tmp_path))
    m = t.fit()
    t.tracker.close()
    (sr,) = t.callbacks
    assert isinstance(sr, ShortRun)
    assert sr.mark is not None and sr.switched_at == 2  # 5 % of 40 steps
    # a step budget: the extrapolation is the budget itself (40 windows of 8 tokens in epochs of the train split)
    assert sr.estimate == pytest.approx(40 / t.steps_per_epoch, rel=0.02)
    assert m["short_run_epochs_estimated"] == sr.estimate and m["short_run_from_step"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["short_run_from_step"] == 2
    # every dropout is off now: the model in training mode is deterministic (with the built-in 0.5s it is not)
    x = t.train_data[:8, :4]
    t.model.train()
    a, _ = t.model(x, t.model.init_state(4))
    b, _ = t.model(x, t.model.init_state(4))
    assert torch.equal(a, b)
    assert [layer.wdrop for layer in t.model.layers] == [0.0, 0.0]
    assert t.cfg.model.dropout == 0.5  # the config keeps what the model was built with


def test_a_budget_that_holds_enough_epochs_keeps_the_models_dropouts(corpus, tmp_path):
    t = Trainer(_cfg(ShortRunConfig(epochs=0.5, **NONE), max_steps=40), read_corpus(corpus), tmp_path)
    m = t.fit()
    assert m["short_run_epochs_estimated"] > 0.5 and m["short_run_from_step"] is None
    assert t.model.dropouts["dropout"] == 0.5 and [layer.wdrop for layer in t.model.layers] == [0.5, 0.5]


def test_the_decision_follows_the_time_budget_when_it_runs_out_first(corpus, tmp_path):
    """With max_minutes, the share of the budget is time: the estimate is the run's pace times the budget."""
    t = Trainer(_cfg(ShortRunConfig(epochs=1e6, dropout=0.1), max_minutes=10.0, max_steps=60), read_corpus(corpus),
                tmp_path)
    t.elapsed = lambda: 30.0 * t.state.step  # 30 s a step: the 10 minutes end at step 20, before max_steps=60
    m = t.fit()
    (sr,) = t.callbacks
    assert m["stop_reason"] == "max_minutes" and m["steps"] == 20
    assert sr.switched_at == 3  # the time share the loop last saw: 5 % after step 2, seen at step 3
    assert sr.estimate == pytest.approx(20 / t.steps_per_epoch, rel=0.1)


def test_resume_keeps_the_decision_and_continues_exactly(corpus, tmp_path):
    short = ShortRunConfig(epochs=50, dropout=0.1, dropouti=0.1, wdrop=0.1)
    ref = Trainer(_cfg(short, max_steps=40), read_corpus(corpus), tmp_path / "ref")
    ref.fit()
    run = tmp_path / "run"
    Trainer(_cfg(short, max_steps=20), read_corpus(corpus), run).fit()
    again = Trainer(_cfg(short, max_steps=40), read_corpus(corpus), run)
    again.resume(run / "checkpoints" / "last.pt")
    assert again.callbacks[0].switched_at == 2 and again.model.dropouts["dropout"] == 0.1
    assert [layer.wdrop for layer in again.model.layers] == [0.1, 0.1]
    again.fit()
    a = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(run / "checkpoints" / "last.pt")["model"]
    for k, v in a.items():
        assert torch.equal(b[k], v), k


def test_short_run_from_the_command_line_logs_its_decision(corpus_dir, tmp_path):
    r = run_cli("train.py", ["data=custom", f"data.dir={corpus_dir}", "model.emsize=8", "model.nhid=8",
                             "trainer.max_steps=20", "trainer.batch_size=4", "trainer.bptt=8", "trainer.device=cpu",
                             "trainer.compile=false", "trainer.sample_words=0", "short_run.epochs=100",
                             "short_run.dropout=0", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "short_run: about" in log and "training on from step 2 with dropout 0" in log
