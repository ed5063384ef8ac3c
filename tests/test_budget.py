"""What a time- or step-budgeted run gets at its end (issue 27): weight averaging that starts at a share of the
budget, the final weights competing for best.pt, and the adapted test scores beside the static one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config

from wordlm import checkpoint
from wordlm.config import OptimConfig, UserError, validate
from wordlm.data import read_corpus
from wordlm.tracking import Tracker
from wordlm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(optim=None, **trainer):
    return tiny_config("lstm", optim or OptimConfig(lr=5.0, schedule="constant"), **{"epochs": 3, **trainer})


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_average_from_outside_0_1_is_refused(value):
    with pytest.raises(UserError, match=rf"optim.average_from={value} must be in \[0, 1\)"):
        validate(_cfg(optim=OptimConfig(average_from=value)))


def test_final_eval_unknown_is_refused():
    with pytest.raises(UserError, match="trainer.final_eval='dyn': use static|cache|dynamic|both"):
        validate(_cfg(final_eval="dyn"))


def test_averaging_starts_at_its_share_of_the_step_budget_and_validation_uses_the_average(corpus, tmp_path):
    t = Trainer(_cfg(optim=OptimConfig(lr=5.0, schedule="constant", average_from=0.5), max_steps=20),
                read_corpus(corpus), tmp_path)
    m = t.fit()
    (avg,) = t.callbacks
    assert avg.switched_at == 10 and avg.count == 11  # from step 10 of 20: the mean of the iterates 10 to 20
    loaded = checkpoint.load_model(tmp_path / "checkpoints" / "last.pt")
    assert loaded.weights.startswith("averaged")
    assert m["best_valid_ppl"] == pytest.approx(min(c["valid_ppl"] for c in m["curve"]), rel=1e-3)


def test_averaging_from_a_share_of_the_time_budget_when_it_runs_out_first(corpus, tmp_path):
    cfg = _cfg(optim=OptimConfig(lr=5.0, schedule="constant", average_from=0.0), max_minutes=10.0)
    t = Trainer(cfg, read_corpus(corpus), tmp_path)
    t.schedule.time_frac = 0.0
    t.cfg.trainer.max_steps = 3
    t.fit()
    assert t.callbacks[0].switched_at == 1  # 0 % of the budget: from the first step


def test_the_final_weights_of_a_budget_stop_compete_for_best_pt(corpus, tmp_path):
    # The stop lands mid-epoch, after the scheduled validations at steps 10 and 20 (an epoch is ~30 steps).
    t = Trainer(_cfg(max_steps=25, eval_every=10), read_corpus(corpus), tmp_path)
    m = t.fit()
    steps = [c["step"] for c in m["curve"]]
    assert steps == [10, 20, 25]
    best = min(m["curve"], key=lambda c: c["valid_ppl"])
    assert m["best_valid_ppl"] == pytest.approx(best["valid_ppl"], rel=1e-3)
    if best["step"] == 25:  # the final weights won: they are best.pt, and the test scored them
        ck = checkpoint.load(tmp_path / "checkpoints" / "best.pt")
        assert all(torch.equal(ck["model"][k], v.cpu()) for k, v in t.model.state_dict().items())
        assert ck["trainer"]["step"] == 25


def test_final_eval_scores_the_test_split_with_the_adapted_methods_and_records_them(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Trainer(_cfg(max_steps=12, final_eval="both"), read_corpus(corpus), tmp_path, Tracker(tmp_path))
    m = t.fit()
    t.tracker.close()
    for k in ("test_ppl_cache", "test_ppl_dynamic", "test_ppl_both"):
        assert math.isfinite(m[k]) and m[k] > 1
    assert m["final_eval_seconds"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["test_ppl_dynamic"] == m["test_ppl_dynamic"]
    ea = EventAccumulator(str(tmp_path / "tb" / "hparams"))
    ea.Reload()
    assert {"test/ppl", "test/ppl_cache", "test/ppl_dynamic", "test/ppl_both"} <= set(ea.Tags()["scalars"])
    # the same figure as wordlm-evaluate's stream scoring of best.pt at its defaults
    from wordlm.config import CacheConfig, DataConfig, DynamicConfig, EvaluateConfig
    from wordlm.evaluation.command import run as evaluate_run

    best = str(tmp_path / "checkpoints" / "best.pt")
    for method, kw in (("dynamic", dict(dynamic=DynamicConfig(enabled=True))),
                       ("cache", dict(cache=CacheConfig(enabled=True)))):
        out = evaluate_run(EvaluateConfig(checkpoint=best, device="cpu", progress=False,
                                          data=DataConfig(name="custom", dir=str(corpus)), **kw))
        assert out["perplexity"] == pytest.approx(m[f"test_ppl_{method}"], rel=1e-5)


def test_final_eval_uses_the_runs_cache_and_dynamic_settings(corpus, tmp_path):
    """cache.* and dynamic.* set how trainer.final_eval scores (evaluate.py's keys): the figures equal
    evaluate.py's with the same settings, and differ from the defaults'."""
    from wordlm.config import CacheConfig, DataConfig, DynamicConfig, EvaluateConfig
    from wordlm.evaluation.command import run as evaluate_run

    cfg = _cfg(max_steps=12, final_eval="both")
    cfg.cache = CacheConfig(window=20, lam=0.3)
    cfg.dynamic = DynamicConfig(segment=8, lr=2e-3)
    m = Trainer(cfg, read_corpus(corpus), tmp_path).fit()
    best = str(tmp_path / "checkpoints" / "best.pt")
    data = DataConfig(name="custom", dir=str(corpus))
    for method, kw in (("dynamic", dict(dynamic=DynamicConfig(enabled=True, segment=8, lr=2e-3))),
                       ("cache", dict(cache=CacheConfig(enabled=True, window=20, lam=0.3)))):
        out = evaluate_run(EvaluateConfig(checkpoint=best, device="cpu", progress=False, data=data, **kw))
        assert out["perplexity"] == pytest.approx(m[f"test_ppl_{method}"], rel=1e-5)
        default = evaluate_run(EvaluateConfig(checkpoint=best, device="cpu", progress=False, data=data,
                                              **{method: type(kw[method])(enabled=True)}))
        assert default["perplexity"] != pytest.approx(m[f"test_ppl_{method}"], rel=1e-3)


def test_final_eval_tuned_on_valid_equals_evaluate_tune(corpus, tmp_path):
    """tune=true: trainer.final_eval tunes each method's settings on the first tune_tokens of valid, as
    wordlm-evaluate tune=true does, and records what it chose."""
    from wordlm.config import CacheConfig, DataConfig, DynamicConfig, EvaluateConfig
    from wordlm.evaluation.command import run as evaluate_run

    cfg = _cfg(max_steps=12, final_eval="both")
    cfg.tune, cfg.tune_tokens = True, 150
    t = Trainer(cfg, read_corpus(corpus), tmp_path, Tracker(tmp_path))
    m = t.fit()
    t.tracker.close()
    assert m["final_eval_tried"] > 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["final_eval_settings"] == m["final_eval_settings"]
    best = str(tmp_path / "checkpoints" / "best.pt")
    tried = {}
    for method, kw in (("dynamic", dict(dynamic=DynamicConfig(enabled=True))),
                       ("cache", dict(cache=CacheConfig(enabled=True))),
                       ("both", dict(cache=CacheConfig(enabled=True), dynamic=DynamicConfig(enabled=True)))):
        out = evaluate_run(EvaluateConfig(checkpoint=best, device="cpu", progress=False, tune=True, tune_tokens=150,
                                          data=DataConfig(name="custom", dir=str(corpus)), **kw))
        tried[method] = out["tried"]
        assert out["perplexity"] == pytest.approx(m[f"test_ppl_{method}"], rel=1e-5)
        used = m["final_eval_settings"][method]
        for part in ("cache", "dynamic"):
            assert (out[part] is None) == (part not in used)
            if out[part] is not None:
                assert out[part] == used[part]
    # "both" reuses the cache settings tuned for "cache" alone: the cache's grid is searched once, not twice
    assert m["final_eval_tried"] == tried["dynamic"] + tried["both"]


def test_tune_without_an_adapted_final_eval_is_refused():
    cfg = _cfg(final_eval="static")
    cfg.tune = True
    with pytest.raises(UserError, match=r"tune=true tunes trainer.final_eval's cache or dynamic evaluation on valid: "
                                        r"add trainer.final_eval=cache\|dynamic\|both"):
        validate(cfg)


@pytest.mark.parametrize("section, values, message", [
    ("dynamic", dict(enabled=True), "dynamic.enabled is evaluate.py's switch: in training, trainer.final_eval="
                                    "dynamic|both scores the test with dynamic evaluation"),
    ("cache", dict(enabled=True), "cache.enabled is evaluate.py's switch: in training, trainer.final_eval=cache|both"),
    ("dynamic", dict(segment=0), "dynamic.segment=0 must be >= 1"),
    ("dynamic", dict(lr=-1.0), "dynamic.lr=-1.0 and dynamic.decay=None must be finite and >= 0"),
    ("cache", dict(lam=1.5), r"cache.lam=1.5 must be in \[0, 1\)"),
])
def test_final_eval_settings_that_cannot_work_are_refused_in_one_line(section, values, message):
    from wordlm.config import CacheConfig, DynamicConfig

    cfg = _cfg(final_eval="both")
    setattr(cfg, section, (CacheConfig if section == "cache" else DynamicConfig)(**values))
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_a_dynamic_segment_longer_than_a_window_is_refused_before_training(corpus, tmp_path):
    from wordlm.config import DynamicConfig

    cfg = _cfg(final_eval="dynamic")  # bptt 8
    cfg.dynamic = DynamicConfig(segment=9)
    with pytest.raises(UserError, match=r"dynamic.segment=9 is longer than the 8 tokens a window scores"):
        Trainer(cfg, read_corpus(corpus), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    cfg.trainer.final_eval = "cache"  # (the setting does nothing then: the cache alone is scored at the end)
    cfg.trainer.max_steps = 2
    m = Trainer(cfg, read_corpus(corpus), tmp_path).fit()
    assert math.isfinite(m["test_ppl_cache"]) and "final_eval_error" not in m


def test_final_eval_settings_act_only_with_their_method():
    from wordlm import record

    flat = {"trainer.final_eval": "dynamic", "dynamic.segment": 35, "cache.window": 100, "dynamic.enabled": False}
    assert record.acts("dynamic.segment", flat) and not record.acts("cache.window", flat)
    assert not record.acts("dynamic.enabled", flat)
    flat["trainer.final_eval"] = "static"
    assert not record.acts("dynamic.segment", flat)
    assert record.run_name(None, ["dynamic.segment=35", "trainer.seed=3"], flat) == "trainer.seed=3"


def test_a_run_resumed_after_a_budget_stop_takes_the_uninterrupted_runs_decisions(corpus, tmp_path):
    """The stop's validation competes for best.pt but the schedule never judges by it: with plateau divisions
    around the stop, the resumed run's weights, lr and best equal the uninterrupted run's."""
    def cfg(max_steps):
        return _cfg(optim=OptimConfig(lr=20.0, schedule="plateau", anneal=4.0), max_steps=max_steps, eval_every=3,
                    epochs=5, clip=0.25)

    ref = Trainer(cfg(40), read_corpus(corpus), tmp_path / "ref")
    m_ref = ref.fit()
    assert ref.schedule.lr < 20.0  # the plateau schedule divided the lr (so decisions were taken)
    sched = [c["valid_ppl"] for c in m_ref["curve"] if c["step"] % 3 == 0]
    for stop in (7, 10, 13, 16, 20, 25, 28, 31):  # off the every-3 schedule: each stop is validated
        first = Trainer(cfg(stop), read_corpus(corpus), tmp_path / f"run{stop}")
        first.fit()
        resumed = Trainer(cfg(40), read_corpus(corpus), tmp_path / f"resumed{stop}")
        resumed.resume(tmp_path / f"run{stop}" / "checkpoints" / "last.pt")
        m = resumed.fit()
        assert resumed.schedule.lr == ref.schedule.lr, stop
        for k, v in ref.model.state_dict().items():
            assert torch.equal(resumed.model.state_dict()[k], v), (stop, k)
        assert resumed.state.scheduled_best == pytest.approx(ref.state.scheduled_best)
        assert m["best_valid_ppl"] <= min(sched) + 1e-3  # the resumed run's best also counts its stop


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_eval_from_outside_0_1_is_refused(value):
    with pytest.raises(UserError, match=rf"trainer.eval_from={value} must be in \[0, 1\)"):
        validate(_cfg(eval_from=value))


def test_eval_from_with_a_target_perplexity_is_refused():
    with pytest.raises(UserError, match="trainer.target_ppl is checked at validations, and trainer.eval_from=0.5"):
        validate(_cfg(eval_from=0.5, target_ppl=100.0))


def test_validation_starts_at_its_share_of_the_budget_and_the_final_weights_are_always_validated(corpus, tmp_path):
    t = Trainer(_cfg(epochs=4, eval_from=0.5), read_corpus(corpus), tmp_path / "epochs")
    m = t.fit()
    spe = t.steps_per_epoch
    assert [c["epochs"] for c in m["curve"]] == [2.0, 3.0, 4.0]  # epoch 1 ends at 25 % of the budget: skipped
    assert [c["step"] for c in m["curve"]] == [2 * spe, 3 * spe, 4 * spe]
    assert m["epochs_completed"] == 4 and math.isfinite(m["test_ppl"])
    # a budget that ends before eval_from: no scheduled validation, but the stop's validation makes best.pt
    t = Trainer(_cfg(max_steps=spe + 3, eval_from=0.99), read_corpus(corpus), tmp_path / "steps")
    m = t.fit()
    assert [c["step"] for c in m["curve"]] == [spe + 3]
    assert checkpoint.load(tmp_path / "steps" / "checkpoints" / "best.pt")["trainer"]["step"] == spe + 3


def test_a_run_resumed_past_a_skipped_validation_continues_exactly(corpus, tmp_path):
    import shutil

    from wordlm.training.callbacks import Callback

    class Snapshot(Callback):  # last.pt as it is mid-way through the second epoch, kept aside
        def __init__(self, at):
            self.at = at

        def on_step_end(self, trainer):
            if trainer.step == self.at:
                trainer.tick()
                trainer.save_checkpoint("last")
                shutil.copy(trainer.ckpt.last, tmp_path / "snap.pt")

    def cfg():
        return _cfg(optim=OptimConfig(lr=20.0, schedule="plateau"), epochs=4, eval_from=0.4)

    ref = Trainer(cfg(), read_corpus(corpus), tmp_path / "ref")
    snap = ref.steps_per_epoch + 5
    ref.callbacks.append(Snapshot(snap))
    m_ref = ref.fit()
    resumed = Trainer(cfg(), read_corpus(corpus), tmp_path / "resumed")
    resumed.callbacks.append(Snapshot(None))  # the same callbacks as the run it continues
    resumed.resume(tmp_path / "snap.pt")
    m = resumed.fit()
    assert [c["step"] for c in m["curve"]] == [c["step"] for c in m_ref["curve"]]
    for k, v in ref.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert m["test_ppl"] == pytest.approx(m_ref["test_ppl"], rel=1e-6)
