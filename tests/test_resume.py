"""Exact resume after SIGINT, SIGTERM and SIGKILL, with real subprocesses and real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, train_args

STEPS = 60

pytestmark = pytest.mark.slow  # real signals and several full runs each: run with -m slow (CI does)


def tb_losses(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def steps_per_epoch(corpus: Path, batch_size: int = 4, bptt: int = 8) -> int:
    from wordlm.data import read_corpus

    rows = read_corpus(corpus).train.numel() // batch_size
    return -(-(rows - 1) // bptt)


def args(corpus: Path, run: Path, *extra: str) -> list:
    # dropout on, so the RNG state must be restored too; an epoch is 32 steps, so resumes cross epochs.
    return train_args(corpus, run, "model.dropout=0.2", "trainer.log_interval=1", f"trainer.max_steps={STEPS}",
                      "trainer.epochs=10", "trainer.sample_words=0", *extra)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("ref")
    run_cli("train.py", args(corpus, run), check=True)
    losses = tb_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def start(corpus: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(corpus, run, *extra)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_step(p: subprocess.Popen, step: int) -> None:
    """Read the run's log lines until it reports ``step`` (or later)."""
    deadline = time.monotonic() + 60
    for line in p.stdout:
        if " | step " in line and int(line.split(" | step ")[1].split()[0]) >= step:
            return
        assert time.monotonic() < deadline, "run did not reach the step in time"
    raise AssertionError(f"run ended before step {step}: {p.stderr.read()[-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_then_resume_matches_uninterrupted(corpus, reference, tmp_path, sig):
    run = tmp_path / "run"
    p = start(corpus, run)
    wait_for_step(p, 12)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    assert "Resume with:" in err and "trainer.resume=" in err and "Traceback" not in err
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    stopped = ck["trainer"]["step"]
    assert 12 <= stopped < STEPS
    hint = err.strip().splitlines()[-1]
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["stop_reason"] == "signal" and m["steps"] == stopped
    assert hint.split("wordlm: ", 1)[1] in (run / "train.log").read_text()  # the resume command, in train.log too

    r = run_cli("train.py", args(corpus, run, "trainer.resume=auto"), check=True)
    assert f"resumed from {run / 'checkpoints' / 'last.pt'} at step {stopped}" in r.stdout
    got = tb_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def test_sigkill_loses_at_most_one_interval(corpus, reference, tmp_path):
    run = tmp_path / "run"
    p = start(corpus, run, "trainer.checkpoint_every=7")
    wait_for_step(p, 30)
    p.kill()
    p.communicate(timeout=30)
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # complete, never half-written
    saved = ck["trainer"]["step"]
    spe = steps_per_epoch(corpus)
    assert saved > 0 and (saved % 7 == 0 or saved % spe == 0), (saved, spe)  # an interval save or an epoch end

    run_cli("train.py", args(corpus, run, "trainer.checkpoint_every=7", "trainer.resume=auto"), check=True)
    assert not list((run / "checkpoints").glob(".*.tmp-*"))  # a temp file the kill left behind is cleared
    got = tb_losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # points the killed run logged past the checkpoint are purged
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
