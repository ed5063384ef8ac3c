"""train.py end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, train_args, write_corpus

from wordlm.checkpoint import load_model
from wordlm.data import batchify, read_corpus
from wordlm.evaluation.scoring import nll as evaluate

METRIC_KEYS = ("best_valid_ppl", "test_ppl", "train_tokens_per_sec", "steps", "epochs", "params", "seconds")
TRAIN_TAGS = ("train/loss", "train/ppl", "train/lr", "train/grad_norm", "train/tokens_per_sec")
EVAL_TAGS = ("valid/loss", "valid/ppl", "test/ppl")
MODELS = ("lstm", "gru", "rnn_tanh", "rnn_relu", "transformer")
ONE_THREAD = "trainer.threads=1"  # tiny models: one thread is fastest, and robust on a shared CPU


pytestmark = pytest.mark.usefixtures("one_thread")


def read_scalars(tb_dir: Path) -> dict:
    """tag -> [(step, value)] from every events file under tb_dir (the curves and the hparams run), read back with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict = {}
    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events in {tb_dir}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def tokens_per_column(corpus_dir: Path, batch_size: int = 4) -> int:
    return read_corpus(corpus_dir).train.numel() // batch_size


def steps_per_epoch(corpus_dir: Path, batch_size: int = 4, bptt: int = 8) -> int:
    rows = tokens_per_column(corpus_dir, batch_size)
    return (rows - 1 + bptt - 1) // bptt


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One real two-epoch run through train.py (shared by the tests that read its outputs)."""
    base = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(base / "corpus")
    run_dir = base / "run"
    p = run_cli("train.py", train_args(corpus, run_dir, "trainer.epochs=2", ONE_THREAD, "run_name=test-run"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    return corpus, run_dir, p


def test_run_writes_checkpoints_metrics_and_log(full_run):
    corpus, run_dir, p = full_run
    for f in ("checkpoints/best.pt", "checkpoints/last.pt", "metrics.json", "train.log", ".hydra/config.yaml"):
        assert (run_dir / f).is_file(), f
    assert not list(run_dir.rglob("*.tmp*")), "temporary files left behind"

    m = json.loads((run_dir / "metrics.json").read_text())
    for k in METRIC_KEYS:
        assert k in m, k
    spe = steps_per_epoch(corpus)
    assert m["steps"] == 2 * spe
    assert m["epochs"] == 2
    assert isinstance(m["params"], int) and m["params"] > 0
    assert m["seconds"] > 0
    assert m["train_tokens_per_sec"] is not None and m["train_tokens_per_sec"] > 0
    assert 1 < m["best_valid_ppl"] < 200 and math.isfinite(m["best_valid_ppl"])
    assert 1 < m["test_ppl"] < 200 and math.isfinite(m["test_ppl"])

    # Hydra's log file holds the per-interval lines (log_interval=5) and the per-epoch lines.
    log = (run_dir / "train.log").read_text()
    for step in (5, 10, spe, (spe // 5 + 1) * 5, 2 * spe):  # every 5 steps, and each epoch's tail
        assert re.search(rf"\| step {step} \|.*\| loss [\d.]+ \| ppl [\d.]+ \|", log), step
    assert re.search(rf"end of epoch 1 \| step {spe} \| valid loss [\d.]+ \| valid ppl [\d.]+", log)
    assert re.search(rf"end of epoch 2 \| step {2 * spe} \| valid loss", log)
    assert "test ppl" in log
    # The console shows the same lines.
    assert "end of epoch 2" in p.stdout


def test_tensorboard_scalars_read_back(full_run):
    corpus, run_dir, _ = full_run
    m = json.loads((run_dir / "metrics.json").read_text())
    scalars = read_scalars(run_dir / "tb")
    for tag in TRAIN_TAGS + EVAL_TAGS:
        assert scalars.get(tag), f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), tag
    spe = steps_per_epoch(corpus)
    # One point per log interval (5) plus each epoch's tail; one valid point per epoch; one test point.
    train_steps = [s for s, _ in scalars["train/loss"]]
    assert train_steps == sorted(train_steps) and {5, 10, spe, 2 * spe} <= set(train_steps)
    assert [s for s, _ in scalars["valid/ppl"]] == [spe, 2 * spe]
    assert [s for s, _ in scalars["test/ppl"]] == [2 * spe]
    assert scalars["test/ppl"][0][1] == pytest.approx(m["test_ppl"], rel=1e-5)
    assert min(v for _, v in scalars["valid/ppl"]) == pytest.approx(m["best_valid_ppl"], rel=1e-5)
    for (_, loss), (_, ppl) in zip(scalars["valid/loss"], scalars["valid/ppl"], strict=True):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert all(v == pytest.approx(20.0) for s, v in scalars["train/lr"] if s <= spe)  # sgd preset, epoch 1


def test_checkpoint_loads_safely_and_rebuilds_the_model(full_run):
    corpus, run_dir, _ = full_run
    m = json.loads((run_dir / "metrics.json").read_text())
    c = read_corpus(corpus)
    for name in ("best", "last"):
        ck = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert isinstance(ck["model"], dict) and all(isinstance(v, torch.Tensor) for v in ck["model"].values())
        cfg = ck["config"]
        scalars = {"run_name": str, "tune": bool, "tune_tokens": int}  # the rest are plain dicts (sections)
        assert type(cfg) is dict and all(type(v) is (scalars.get(k) or dict) for k, v in cfg.items())
        assert cfg["run_name"] == "test-run"
        assert cfg["model"]["name"] == "lstm" and cfg["model"]["emsize"] == 16
        assert cfg["trainer"]["epochs"] == 2 and cfg["data"]["dir"] == str(corpus)
        assert "hydra" not in cfg
        assert type(ck["vocab"]) is list and all(type(w) is str for w in ck["vocab"])
        assert ck["vocab"] == c.vocab.itos
        assert isinstance(ck["trainer"], dict) and "step" in ck["trainer"]
        assert {"state", "param_groups"} <= set(ck["optimizer"])
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["step"] == m["steps"]

    # best.pt alone rebuilds the model, and that model is the one the test perplexity was measured with.
    loaded = load_model(run_dir / "checkpoints" / "best.pt")
    test = batchify(c.test, 4)
    loss = evaluate(loaded.model, test, 8, torch.device("cpu"))
    assert math.exp(loss) == pytest.approx(m["test_ppl"], rel=1e-4)


def test_max_steps_stops_early_and_multirun_writes_one_dir_per_job(tmp_path, corpus_dir):
    sweep = tmp_path / "sweep"
    args = train_args(corpus_dir, tmp_path / "unused", "trainer.epochs=3", "trainer.max_steps=3,7",
                      f"hydra.sweep.dir={sweep}", ONE_THREAD)
    p = run_cli("train.py", ["--multirun", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    # Each job's folder is named by its number and what its overrides change (max_steps here).
    assert [d.name.split("_")[0] for d in jobs] == ["0", "1"]
    assert jobs[0].name.endswith("max_steps-3") and jobs[1].name.endswith("max_steps-7")
    assert not (tmp_path / "unused").exists()
    spe = steps_per_epoch(corpus_dir)
    for job, max_steps in zip(jobs, (3, 7), strict=True):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"trainer.max_steps={max_steps}" in overrides
        m = json.loads((job / "metrics.json").read_text())
        assert m["steps"] == max_steps  # stopped early: far short of 3 epochs
        assert m["epochs"] == pytest.approx(max_steps * 8 / (tokens_per_column(corpus_dir) - 1))  # bptt 8
        assert m["epochs"] < 1 and max_steps < spe and m["stop_reason"] == "max_steps"
        assert math.isfinite(m["test_ppl"]) and math.isfinite(m["best_valid_ppl"])  # still evaluates and tests
        assert (job / "checkpoints" / "best.pt").is_file() and (job / "checkpoints" / "last.pt").is_file()
        ck = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        assert ck["trainer"]["step"] == max_steps
        assert ck["config"]["trainer"]["max_steps"] == max_steps
        log = (job / "train.log").read_text()
        assert f"- epoch 1 | step {max_steps} | valid loss" in log and "end of epoch 1" not in log
        assert "end of epoch 2" not in log
        assert list((job / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_every_model_type_trains_through_the_cli(tmp_path, corpus_dir):
    sweep = tmp_path / "sweep"
    args = train_args(corpus_dir, tmp_path / "unused", "trainer.max_steps=2", f"model={','.join(MODELS)}",
                      "model.tied=false,true", f"hydra.sweep.dir={sweep}", ONE_THREAD)
    p = run_cli("train.py", ["--multirun", *args])
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = [d for d in sweep.iterdir() if d.is_dir()]
    assert len(jobs) == 2 * len(MODELS)
    seen = set()
    for job in jobs:
        ck = torch.load(job / "checkpoints" / "last.pt", weights_only=True)
        mc = ck["config"]["model"]
        seen.add((mc["name"], mc["tied"]))
        assert mc["emsize"] == 16 and mc["nhid"] == 16  # the preset's 200 overridden by the command line
        m = json.loads((job / "metrics.json").read_text())
        assert m["steps"] == 2
        assert math.isfinite(m["best_valid_ppl"]) and math.isfinite(m["test_ppl"])
        # Tied: one matrix, saved under both names; untied: two different ones.
        assert torch.equal(ck["model"]["encoder.weight"], ck["model"]["decoder.weight"]) == mc["tied"]
        if mc["tied"]:
            loaded = load_model(job / "checkpoints" / "last.pt")
            assert loaded.model.decoder.weight is loaded.model.encoder.weight
    assert seen == {(n, t) for n in MODELS for t in (False, True)}
