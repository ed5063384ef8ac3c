"""Evaluation from a checkpoint: equals the trainer's numbers, uses the checkpoint's vocabulary, clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, write_corpus
from test_generate import ONE_THREAD, one_thread, trained_run  # noqa: F401 (one_thread: autouse fixture)

from wordlm.config import DataConfig, EvaluateConfig, UserError
from wordlm.evaluation.command import run as evaluate_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)  # the same tiny LSTM run test_generate.py uses


@pytest.fixture(scope="module")
def metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return run_dir / "checkpoints" / "best.pt"


def evaluate_cli(args, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m wordlm.evaluate args`` from ``cwd`` (the package found through PYTHONPATH, as after pip install)."""
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "wordlm.evaluate", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env, check=False)


def test_cli_equals_the_trainers_test_loss(ckpt, metrics, tmp_path):
    # TINY trains with eval_batch_size=4 and bptt=8; evaluate defaults to the checkpoint's own settings.
    p = evaluate_cli([f"checkpoint={ckpt}", "device=cpu"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["split"] == "test"
    assert out["loss"] == pytest.approx(metrics["test_loss"], rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    assert out["bits_per_word"] == pytest.approx(out["loss"] / math.log(2), rel=1e-12)
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra, no log file


def test_valid_split_of_an_explicit_data_set_equals_the_trainers_valid_loss(ckpt, metrics, run_dir):
    corpus = run_dir.parent / "corpus"
    out = evaluate_run(EvaluateConfig(checkpoint=str(ckpt), data=DataConfig(name="custom", dir=str(corpus)),
                                      split="valid", batch_size=4, device="cpu", progress=False))
    assert out["loss"] == pytest.approx(metrics["best_valid_loss"], rel=1e-6)


def test_rnn_loss_does_not_depend_on_bptt(ckpt):
    # The state is carried across windows, so for an RNN the window length only changes the arithmetic.
    a = evaluate_run(EvaluateConfig(checkpoint=str(ckpt), batch_size=4, bptt=3, progress=False))
    b = evaluate_run(EvaluateConfig(checkpoint=str(ckpt), batch_size=4, bptt=50, progress=False))
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["tokens"] == b["tokens"]


def test_other_text_is_encoded_with_the_checkpoints_vocabulary(ckpt, tmp_path):
    # A corpus with a larger vocabulary would rebuild a different one (and a model of another shape);
    # evaluation keeps the checkpoint's, and words it lacks become <unk>.
    other = write_corpus(tmp_path / "other", {"train": 50, "valid": 20, "test": 20}, vocab=60, seed=3)
    out = evaluate_run(EvaluateConfig(checkpoint=str(ckpt), data=DataConfig(name="custom", dir=str(other)),
                                      batch_size=2, progress=False))
    assert math.isfinite(out["loss"]) and out["tokens"] > 0


@pytest.mark.parametrize("override, needle", [
    ({"split": "dev"}, "split='dev'"), ({"batch_size": 0}, "batch_size=0"), ({"bptt": 0}, "bptt=0"),
    ({"device": "tpu"}, "device='tpu'"), ({"precision": "fp8"}, "precision='fp8'"),
    ({"checkpoint": None}, "checkpoint=PATH is required"), ({"checkpoint": "/no/such.pt"}, "does not exist"),
])
def test_errors(ckpt, override, needle):
    values = {"checkpoint": str(ckpt), "progress": False, **override}
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        evaluate_run(EvaluateConfig(**values))


def test_data_keys_without_a_data_set_are_one_line(ckpt, tmp_path, monkeypatch, capsys):
    from wordlm.evaluation.command import main

    monkeypatch.setattr(sys, "argv", ["wordlm-evaluate", f"checkpoint={ckpt}", f"data.dir={tmp_path}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("wordlm: error: data.<key>=... needs a data set") and len(err.splitlines()) == 1
