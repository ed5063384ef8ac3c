"""The training core as parts: the step, the schedules, and what a recipe plugs in without editing the loop.

In-process and tiny (one thread); the CLI-level controls (eval_every, max_minutes, init_from,
presets, pip install) are at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, tiny_config, train_args, write_corpus

from wordlm import checkpoint
from wordlm.config import Config, ModelConfig, OptimConfig, UserError
from wordlm.data import read_corpus
from wordlm.distributed import Dist
from wordlm.models import LanguageModel, build_model, model_config, register
from wordlm.optim import Schedule, build_optimizer
from wordlm.trainer import Trainer
from wordlm.training import Callback, TrainStep, WindowLength
from wordlm.training.callbacks import swapped_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(name: str = "lstm", optim: OptimConfig | None = None, **trainer) -> Config:
    return tiny_config(name, optim, **trainer)


# ---------------------------------------------------------------------------- the step
@pytest.mark.parametrize("optim", [
    OptimConfig(name="sgd", lr=1.0, momentum=0.9, fused=False),
    OptimConfig(name="sgd", lr=1.0, momentum=0.9, fused=True),
    OptimConfig(name="adamw", lr=1e-2, fused=False),
    OptimConfig(name="adamw", lr=1e-2, fused=True),
], ids=["sgd-momentum", "sgd-momentum-fused", "adamw", "adamw-fused"])
def test_non_finite_step_leaves_weights_optimizer_and_state_untouched(optim):
    torch.manual_seed(0)
    model = build_model(model_config("lstm", emsize=8, nhid=8, nlayers=1, dropout=0.0), 11)
    opt = build_optimizer(optim, model.parameters(), torch.device("cpu"))
    step = TrainStep(model, model, opt, device=torch.device("cpu"), precision="fp32", accum=1, micro=3, clip=0.25,
                     dist=Dist(), compiled=False, full_length=5)
    x = torch.randint(0, 11, (5, 3))
    y = torch.randint(0, 11, (5, 3))
    states = [model.init_state(3)]
    ok, loss, gnorm, states = step(x, y, states)  # a good step first: the optimizer now has state
    assert bool(ok) and math.isfinite(float(loss))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = {id_: {k: v.clone() for k, v in s.items()} for id_, s in enumerate(opt.state.values())}
    carried = [t.clone() for t in states[0]]

    ok, loss, gnorm, new_states = step(x, y, states, inject_nan=True)
    assert not bool(ok) and int(step.consec_bad) == 1 and int(step.worst_bad) == 1
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(opt_state[i][k], v), f"optimizer state {k} changed on a skipped step"
    # The carried state is the one the step started from, not NaN.
    assert all(torch.equal(c, n) for c, n in zip(carried, new_states[0], strict=True))

    ok, *_ = step(x, y, states)
    assert bool(ok) and int(step.consec_bad) == 0 and int(step.worst_bad) == 1  # the longest streak is kept
    assert any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- schedules
def _schedule(**kw) -> Schedule:
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(**kw)
    return Schedule(cfg, build_optimizer(cfg, [p], torch.device("cpu")), total_steps=100)


def test_warmup_is_linear_then_cosine_ends_at_min_lr():
    s = _schedule(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert [s.lr_at(i) for i in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(55) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mean of peak and end
    assert s.lr_at(100) == pytest.approx(1e-4) and s.lr_at(1000) == pytest.approx(1e-4)
    c = _schedule(name="adamw", lr=1e-3, schedule="constant", warmup_steps=4)
    assert [c.lr_at(i) for i in (0, 3, 4, 99)] == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3])


def test_cosine_over_time_ends_with_the_budget_or_the_steps_whichever_comes_first():
    s = _schedule(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, schedule_over="time")
    assert s.lr_at(55) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # no time spent: as over steps
    s.time_frac = 0.5
    assert s.lr_at(5) == pytest.approx(6e-4)  # warmup stays by steps
    assert s.lr_at(10) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half the budget spent: half way
    assert s.lr_at(91) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9))))  # steps lead
    s.time_frac = 1.7
    assert s.lr_at(20) == pytest.approx(1e-4)
    steps = _schedule(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    steps.time_frac = 0.5
    assert steps.lr_at(10) == pytest.approx(1e-3)  # schedule_over=steps ignores the clock


def test_plateau_divides_only_when_not_improved_and_round_trips():
    s = _schedule(lr=20.0, anneal=4.0)
    s.on_validation(True, 10)
    assert s.lr == 20.0
    s.on_validation(False, 20)
    assert s.lr == 5.0
    assert s.set(21, scale=0.5) == 2.5 and s.lr == 2.5  # a short BPTT window scales its step's lr
    t = _schedule(lr=20.0, anneal=4.0)
    t.load_state_dict(s.state_dict(), 21)
    assert t.lr == 5.0 and t.lr_at(1000) == 5.0


# ---------------------------------------------------------------------------- plug-ins
class SwitchToAveraged(Callback):
    """A toy NT-ASGD: at the first validation, switch to a fresh SGD at lr/2 and average the weights from then on;
    validation, best.pt and the test see the averages."""

    def __init__(self):
        self.switched_at = None
        self.avg = None
        self.n = 0

    def _switch(self, trainer, lr):
        trainer.set_optimizer(torch.optim.SGD(trainer.model.parameters(), lr=lr))

    def on_validation_end(self, trainer, loss, improved):
        if self.switched_at is None:
            self.switched_at = trainer.step
            self._switch(trainer, trainer.schedule.lr)
            trainer.schedule.plateau_lr /= 2
            self.avg = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
            self.n = 1

    def on_step_end(self, trainer):
        if self.avg is not None:
            self.n += 1
            for k, p in trainer.model.named_parameters():
                self.avg[k] += (p.detach() - self.avg[k]) / self.n

    def eval_weights(self, trainer):
        return swapped_weights(trainer.model, self.avg)

    def state_dict(self):
        return {"switched_at": self.switched_at, "avg": self.avg, "n": self.n}

    def load_state_dict(self, st, trainer):
        self.switched_at, self.avg, self.n = st["switched_at"], st["avg"], st["n"]
        if self.switched_at is not None:
            self._switch(trainer, 1.0)  # the lr comes back from the schedule; the state from the checkpoint


class Alternating(WindowLength):
    """A toy variable-length BPTT: a random length in [3, 8] each step from its own generator, lr scaled by it."""

    def __init__(self, bptt):
        super().__init__(bptt)
        self.gen = torch.Generator().manual_seed(7)
        self.seen = []

    def next(self, step):
        n = int(torch.randint(3, 9, (1,), generator=self.gen))
        self.seen.append(n)
        return n, n / self.bptt

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, st):
        self.gen.set_state(st["gen"])


class AR:
    """A toy activation regulariser: alpha * mean(hidden^2); records what it saw."""

    def __init__(self, alpha):
        self.alpha, self.calls = alpha, []

    def __call__(self, aux, logp, y):
        self.calls.append((tuple(aux["hidden"].shape), tuple(aux["raw_hidden"].shape), tuple(logp.shape)))
        return self.alpha * aux["hidden"].pow(2).mean()


def _fit(corpus: Path, run: Path, resume: bool = False, **trainer):
    cb, win, ar = SwitchToAveraged(), Alternating(8), AR(2.0)
    t = Trainer(tiny_cfg(**trainer), read_corpus(corpus), run, callbacks=[cb], loss_terms=[ar], window_length=win)
    if resume:
        t.resume(run / "checkpoints" / "last.pt")
    return t, t.fit(), cb, win, ar


def test_loss_term_phase_switch_averaging_and_window_length_plug_in_and_resume_exactly(corpus, tmp_path):
    ref, m, cb, win, ar = _fit(corpus, tmp_path / "ref", max_steps=40, eval_every=12)
    # The loss term saw the model's aux outputs and each target's log-prob; it changed the gradients, not the
    # reported loss.
    assert ar.calls and ar.calls[0][0] == ar.calls[0][1] == (win.seen[0], 4, 16)
    assert ar.calls[0][2] == (win.seen[0], 4)
    assert set(win.seen) <= set(range(3, 9)) and len(set(win.seen)) > 2
    # The phase switched at the first validation, and the averages are what best.pt holds.
    assert cb.switched_at == 12 and isinstance(ref.optimizer, torch.optim.SGD)
    assert ref.optimizer.defaults["foreach"] is None  # the callback's optimizer (wordlm's own is foreach)
    assert ref.optimizer is ref.step_fn.optimizer and ref.optimizer is ref.schedule.opt
    best = checkpoint.load(tmp_path / "ref" / "checkpoints" / "best.pt")
    last = checkpoint.load(tmp_path / "ref" / "checkpoints" / "last.pt")
    raw = dict(ref.model.named_parameters())
    assert any(not torch.equal(last["model"][k], cb.avg[k]) for k in cb.avg)  # raw weights differ from averages
    assert best["trainer"]["step"] > 12  # the best came after the switch: it is the averages, not the raw weights
    assert all(torch.equal(best["model"][k], v) for k, v in best["trainer"]["callbacks"][0]["avg"].items())
    assert raw  # the model itself trains on the raw weights
    assert m["stop_reason"] == "max_steps" and math.isfinite(m["test_loss"])

    # Stop after the switch, mid-epoch and off a validation step, then resume: the same run exactly.
    run = tmp_path / "run"
    _fit(corpus, run, max_steps=17, eval_every=12)
    t, m2, cb2, _, _ = _fit(corpus, run, resume=True, max_steps=40, eval_every=12)
    assert t.step == 40 and cb2.switched_at == 12 and cb2.n == cb.n
    for k, v in ref.model.state_dict().items():
        assert torch.equal(t.model.state_dict()[k], v), k
    for k in cb.avg:
        assert torch.equal(cb2.avg[k], cb.avg[k]), k
    assert m2["test_loss"] == m["test_loss"] and m2["best_valid_loss"] == m["best_valid_loss"]


# ---------------------------------------------------------------------------- a model type from outside
@dataclass
class BigramConfig(ModelConfig):
    name: str = "toy_bigram"
    scale: float = 1.0  # a key only this type has


@register("toy_bigram", config=BigramConfig)
class Bigram(LanguageModel):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.table = torch.nn.Embedding(vocab_size, vocab_size)
        torch.nn.init.zeros_(self.table.weight)  # uniform to start

    def init_state(self, batch_size, device=None):
        return None

    def forward(self, tokens, state=None, aux=False):
        logp = torch.log_softmax(self.table(tokens) * self.cfg.scale, dim=-1)
        return (logp, None, {"hidden": logp, "raw_hidden": logp}) if aux else (logp, None)

    @classmethod
    def flops_per_token(cls, cfg, vocab_size, bptt):
        return 0.0

    @classmethod
    def classic_args(cls, cfg):
        return []


def test_a_registered_model_type_trains_checkpoints_and_rebuilds_without_touching_the_core(corpus, tmp_path):
    cfg = tiny_cfg(max_steps=30, eval_every=10)
    cfg.model = model_config("toy_bigram", scale=2.0)
    cfg.optim = OptimConfig(name="adamw", lr=0.01, schedule="constant")
    m = Trainer(cfg, read_corpus(corpus), tmp_path).fit()
    vocab = len(read_corpus(corpus).vocab)
    assert m["best_valid_ppl"] < vocab  # it learnt: better than the uniform start
    loaded = checkpoint.load_model(tmp_path / "checkpoints" / "best.pt")
    assert isinstance(loaded.model, Bigram) and loaded.config.model.scale == 2.0
    with pytest.raises(UserError, match="model=toy_bigram has no setting model.nhead"):
        model_config("toy_bigram", nhead=2)


# ---------------------------------------------------------------------------- run controls, end to end
def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _valid_steps(run: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars("valid/loss")]


def test_eval_every_validates_mid_epoch_and_max_minutes_stops_cleanly(corpus, tmp_path):
    run = tmp_path / "every"
    run_cli("train.py", train_args(corpus, run, "trainer.eval_every=7", "trainer.max_steps=20", "trainer.epochs=5",
                                   "trainer.sample_words=0"), check=True)
    assert _valid_steps(run) == [7, 14, 20]  # two scheduled validations, then the one at the stop
    m = _metrics(run)
    assert m["stop_reason"] == "max_steps" and m["steps"] == 20
    assert "| step 14 | valid loss" in (run / "train.log").read_text()

    run = tmp_path / "budget"
    p = run_cli("train.py", train_args(corpus, run, "trainer.max_minutes=0.003", "trainer.epochs=1000",
                                       "trainer.sample_words=0"), check=True)
    m = _metrics(run)
    assert m["stop_reason"] == "max_minutes" and 0 < m["steps"] < 1000 * 29
    assert math.isfinite(m["test_ppl"]) and (run / "checkpoints" / "best.pt").is_file()
    assert "stopped by max_minutes" in p.stdout

    # The cosine schedule over the budget: a run of 1000 epochs cut by the clock still anneals to its end.
    run = tmp_path / "budget-cosine"
    p = run_cli("train.py", train_args(corpus, run, "optim=adamw", "optim.schedule_over=time", "optim.warmup_steps=2",
                                       "optim.min_lr_ratio=0.1", "trainer.max_minutes=0.05", "trainer.epochs=1000",
                                       "trainer.sample_words=0", "trainer.log_interval=1"), check=True)
    m = _metrics(run)
    lrs = [float(x) for x in re.findall(r"\| lr ([0-9.e+-]+) \|", (run / "train.log").read_text())]
    assert m["stop_reason"] == "max_minutes" and len(lrs) == m["steps"] > 20
    assert lrs[-1] == pytest.approx(1e-4, rel=0.05) and max(lrs) > 5e-4  # peak, then the end of the cosine
    assert all(b <= a * 1.000001 for a, b in zip(lrs[5:], lrs[6:], strict=False))  # falling after the warmup
    bad = run_cli("train.py", train_args(corpus, tmp_path / "bad", "optim=adamw", "optim.schedule_over=time"))
    assert bad.returncode != 0 and "optim.schedule_over=time decays the cosine schedule over the time budget: it " \
                                   "needs optim.schedule=cosine and trainer.max_minutes" in bad.stderr


def test_init_from_starts_a_new_run_from_weights_only(corpus, tmp_path):
    src = tmp_path / "src"
    run_cli("train.py", train_args(corpus, src, "trainer.max_steps=10"), check=True)
    best = checkpoint.load(src / "checkpoints" / "best.pt")
    cfg = tiny_cfg(init_from=str(src / "checkpoints" / "best.pt"))
    cfg.model = model_config("lstm", emsize=16, nhid=16, nlayers=1, dropout=0.0)
    t = Trainer(cfg, read_corpus(corpus), tmp_path / "new")
    assert all(torch.equal(best["model"][k], v) for k, v in t.model.state_dict().items())
    assert t.step == 0 and not t.optimizer.state  # weights only: a fresh optimizer, step 0
    other = write_corpus(tmp_path / "other", {"train": 50, "valid": 10, "test": 10}, vocab=40, seed=5)
    with pytest.raises(UserError, match="trainer.init_from=.*another vocabulary"):
        Trainer(cfg, read_corpus(other), tmp_path / "new2")


@pytest.mark.slow
def test_presets_are_listed_and_set_the_classic_sizes(tmp_path):
    p = run_cli("train.py", ["--help"], cwd=tmp_path, check=True)
    assert "experiment: awd_lstm_ptb, awd_lstm_ptb_finetune, awd_lstm_small, awd_lstm_wt2, awd_lstm_wt2_finetune, " \
           "classic_large, classic_medium" in p.stdout
    p = run_cli("train.py", ["experiment=classic_large", "--cfg", "job"], cwd=tmp_path, check=True)
    import yaml

    job = yaml.safe_load(p.stdout)
    assert job["model"] == {"name": "lstm", "emsize": 1500, "nhid": 1500, "nlayers": 2, "dropout": 0.65,
                            "tied": True, "dropouti": None, "dropouth": None, "dropoute": 0.0, "wdrop": 0.0,
                            "locked": False, "last_nhid": None, "softmax": "full", "cutoffs": [2000, 10000],
                            "div_value": 4.0, "adaptive_input": False, "adaptive_dropout": 0.0,
                            "adaptive_dropout_input": True}
    assert job["optim"]["name"] == "sgd" and job["optim"]["lr"] == 20.0 and job["trainer"]["epochs"] == 40
    p = run_cli("train.py", ["experiment=classic_medium", "model.dropout=0.4", "--cfg", "job"], cwd=tmp_path,
                check=True)
    assert yaml.safe_load(p.stdout)["model"]["dropout"] == 0.4  # the command line wins over the preset


@pytest.mark.slow
def test_pip_install_then_train_from_another_folder(corpus, tmp_path):
    """pip install . (not -e) into a fresh venv; the console script runs from elsewhere; nothing lands in the
    package or the corpus folder."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    where = subprocess.run([str(py), "-c", "import wordlm; print(wordlm.__file__)"], check=True, cwd=tmp_path,
                           capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    before = sorted(p.name for p in corpus.iterdir())
    env = {k: v for k, v in os.environ.items() if k != "WORDLM_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    p = subprocess.run([str(venv / "bin" / "wordlm-train"), "data=custom", f"data.dir={corpus}",
                        *train_args(corpus, elsewhere / "run", "trainer.max_steps=3")[2:]],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints" / "best.pt").is_file() and (elsewhere / "run" / "metrics.json").is_file()
    assert sorted(p.name for p in corpus.iterdir()) == before  # no cache or lock next to the user's text
    assert list((tmp_path / "xdg" / "wordlm" / "data" / "cache").glob("corpus-*/cache-*.pt"))
    site = Path(where).parents[1]  # site-packages
    assert not list(site.rglob("cache-*.pt")) and not (site / "data").exists()
    # The search configs and the SLURM launcher config ship too, and compose from the installed copy.
    assert (site / "wordlm" / "conf" / "hparams_search" / "classic.yaml").is_file()
    p = subprocess.run([str(venv / "bin" / "wordlm-train"), "hparams_search=classic", "hydra/launcher=slurm",
                        "--cfg", "hydra"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "OptunaSweeper" in p.stdout and "SlurmLauncher" in p.stdout, p.stderr[-2000:]


# ---------------------------------------------------------------------------- resume corner cases
def test_resume_into_another_folder_keeps_the_runs_best_weights(corpus, tmp_path):
    a = Trainer(tiny_cfg(max_steps=30, eval_every=10), read_corpus(corpus), tmp_path / "a")
    a.fit()
    best = checkpoint.load(tmp_path / "a" / "checkpoints" / "best.pt")
    b = Trainer(tiny_cfg(max_steps=31, eval_every=10), read_corpus(corpus), tmp_path / "b")
    b.resume(tmp_path / "a" / "checkpoints" / "last.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in b.best_weights.items())


def test_a_checkpoint_taken_after_the_last_window_validates_that_epoch_first(corpus, tmp_path):
    # Format-1 checkpoints could be written after an epoch's last window and before its validation.
    t = Trainer(tiny_cfg(max_steps=5), read_corpus(corpus), tmp_path / "a")
    t.fit()
    ck = checkpoint.load(tmp_path / "a" / "checkpoints" / "last.pt")
    rows = t.train_data.size(0)
    ck["trainer"]["pos"] = rows - 1
    ck["trainer"]["validated_at"] = -1
    torch.save(ck, tmp_path / "pending.pt")
    r = Trainer(tiny_cfg(max_steps=8), read_corpus(corpus), tmp_path / "b")
    r.resume(tmp_path / "pending.pt")
    m = r.fit()
    # validated the epoch at step 5, then went on (and validated the final weights at the stop, step 8)
    assert r.epoch == 1 and m["steps"] == 8 and {"step": 5, "epochs": 1.0} in [
        {k: c[k] for k in ("step", "epochs")} for c in m["curve"]] and m["curve"][-1]["step"] == 8


def test_format_1_trainer_state_is_upgraded():
    from wordlm.checkpoint import _upgrade_v1

    v1 = {"version": 1, "config": {"optim": {"lr": 20.0}}, "scaler": {"scale": 2.0},
          "trainer": {"step": 7, "epoch": 1, "window": 3, "best_val": 4.5, "bad_total": 1, "train_seconds": 9.0,
                      "timed_tokens": 100, "timed_seconds": 2.0, "world": 1, "columns": 4, "bptt": 8, "state": None,
                      "interval": {"sums": torch.zeros(3), "steps": 2, "tokens": 64, "bad": torch.zeros(2)},
                      "schedule": {"plateau_lr": 5.0, "total": 10}, "rng": [None]}}
    st = _upgrade_v1(v1)["trainer"]
    assert st["pos"] == 24 and st["validated_at"] == -1 and st["seconds"] == 9.0
    assert st["meter"]["steps"] == 2 and st["throughput"] == {"tokens": 100, "seconds": 2.0}
    assert st["step_fn"]["scaler"] == {"scale": 2.0} and st["schedule"]["plateau_lr"] == 5.0


def test_the_interval_meter_leaves_paused_time_out(monkeypatch):
    from wordlm.training import meters

    now = [100.0]
    monkeypatch.setattr(meters.time, "perf_counter", lambda: now[0])
    m = meters.IntervalMeter(torch.device("cpu"), Dist())
    one = torch.ones((), dtype=torch.bool)
    m.add(one, torch.tensor(2.0), torch.tensor(1.0), tokens=10)
    now[0] += 1.0  # a step
    m.pause()
    now[0] += 60.0  # a validation
    m.add(one, torch.tensor(4.0), torch.tensor(1.0), tokens=10)
    now[0] += 1.0
    r = m.read()
    assert r["loss"] == 3.0 and r["tokens_per_sec"] == 10.0 and r["ms_per_step"] == 1000.0
