"""Non-finite steps, unwritable or full output folders, double Ctrl-C, bad checkpoints on resume."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, train_args, write_corpus
from test_resume import tb_losses, wait_for_step


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("wordlm: error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_nan_steps_are_skipped_and_counted(corpus, tmp_path):
    run = tmp_path / "run"
    run_cli("train.py", train_args(corpus, run, "trainer.max_steps=20", "trainer.log_interval=1",
                                   "trainer.debug_nan_at_step=5", "trainer.debug_nan_steps=3"), check=True)
    m = json.loads((run / "metrics.json").read_text())
    assert m["bad_steps"] == 3 and m["steps"] == 20
    losses = tb_losses(run)
    assert sorted(set(range(1, 21)) - set(losses)) == [6, 7, 8]  # steps 6-8 (0-based 5-7) logged no loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert acc.Scalars("train/bad_steps")[-1].value == 3
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_too_many_bad_steps_stop_with_clear_error_and_keep_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    p = run_cli("train.py", train_args(corpus, run, "trainer.max_steps=40", "trainer.checkpoint_every=3",
                                       "trainer.debug_nan_at_step=7", "trainer.debug_nan_steps=100",
                                       "trainer.max_bad_steps=4"))
    msg = one_line_error(p)
    assert "non-finite steps in a row" in msg and "optim.lr" in msg
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["trainer"]["step"] in (6, 9)  # the last interval before or within the bad run
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def _make_readonly(folder: Path) -> callable:
    os.chmod(folder, 0o555)
    if os.access(folder, os.W_OK) or _writable(folder):  # root ignores modes: make it immutable instead
        os.chmod(folder, 0o755)
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        assert not _writable(folder), "could not make the folder read-only"
        return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)
    return lambda: os.chmod(folder, 0o755)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


def test_readonly_checkpoint_folder_is_a_clear_error_and_keeps_previous(corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    undo = _make_readonly(run / "checkpoints")
    try:
        p = run_cli("train.py", train_args(corpus, run, "trainer.max_steps=14", "trainer.resume=auto"))
    finally:
        undo()
    msg = one_line_error(p)
    assert "cannot write checkpoint" in msg and "previous checkpoint is kept" in msg
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_full_disk_is_a_clear_error_and_keeps_previous(corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = len(before) // 2  # any file larger than this cannot be written: the disk "fills" mid-checkpoint

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, str(ROOT / "train.py"),
                        *train_args(corpus, run, "trainer.max_steps=14", "trainer.resume=auto")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=cap)
    msg = one_line_error(p)
    assert "cannot write checkpoint" in msg
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp-*"))  # the partial temp file is removed


def test_second_sigint_stops_at_once_and_checkpoint_stays_loadable(corpus, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                          *train_args(corpus, run, "trainer.max_steps=100000", "trainer.epochs=1000",
                                      "trainer.log_interval=1", "trainer.checkpoint_every=2")],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_step(p, 10)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["trainer"]["step"] >= 10


def test_truncated_checkpoint_is_rejected_on_resume(corpus, trained, tmp_path):
    bad = tmp_path / "half.pt"
    data = (trained / "checkpoints" / "last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    msg = one_line_error(run_cli("train.py", train_args(corpus, tmp_path / "r", f"trainer.resume={bad}")))
    assert "truncated or corrupt" in msg and str(bad) in msg


def _trainer(corpus: Path, run: Path, **model):
    """An in-process Trainer with the TINY sizes (resume checks need no subprocess)."""
    from wordlm.config import Config, DataConfig, OptimConfig, TrainerConfig
    from wordlm.data import read_corpus
    from wordlm.models import model_config
    from wordlm.trainer import Trainer

    fused = model.pop("optim_fused", None)
    m = {"emsize": 16, "nhid": 16, "nlayers": 1, "dropout": 0.0, **model}
    cfg = Config(model=model_config(**m), optim=OptimConfig(fused=fused),
                 data=DataConfig(name="custom", dir=str(corpus)),
                 trainer=TrainerConfig(batch_size=4, eval_batch_size=4, bptt=8, progress=False, threads=1))
    return Trainer(cfg, read_corpus(corpus), run)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_step_leaves_weights_untouched(corpus, tmp_path, fused):
    # fused=True is the CUDA path (the optimizer skips on a found_inf flag, no host sync), run here on CPU.
    from wordlm.data import get_window

    t = _trainer(corpus, tmp_path, optim_fused=fused)
    assert t.step_fn.fused == fused
    x, y = get_window(t.train_data, 0, 8)
    t.train_step(x, y)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.cfg.trainer.debug_nan_at_step, t.step = 0, 0
    ok, _, _ = t.train_step(x, y)
    assert not bool(ok)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert int(t.step_fn.consec_bad) == 1
    t.cfg.trainer.debug_nan_at_step = None
    assert bool(t.train_step(x, y)[0]) and int(t.step_fn.consec_bad) == 0
    assert any(not torch.equal(before[k], v) for k, v in t.model.state_dict().items())


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_of_another_shape_is_rejected_on_resume(corpus, trained, tmp_path):
    from wordlm.config import UserError

    with pytest.raises(UserError, match="model.nhid: 16 in the checkpoint, 24 now.*trainer.init_from="):
        _trainer(corpus, tmp_path, nhid=24).resume(trained / "checkpoints" / "last.pt")


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_of_another_vocabulary_is_rejected_on_resume(trained, tmp_path):
    from wordlm.config import UserError

    other = write_corpus(tmp_path / "other", {"train": 120, "valid": 20, "test": 20}, vocab=40, seed=3)
    with pytest.raises(UserError, match="another vocabulary"):
        _trainer(other, tmp_path).resume(trained / "checkpoints" / "last.pt")


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_of_other_batch_columns_is_rejected_on_resume(corpus, trained, tmp_path):
    from wordlm.config import UserError

    t = _trainer(corpus, tmp_path)
    t.cfg.trainer.bptt = 9
    with pytest.raises(UserError, match="trainer.bptt: 8 in the checkpoint, 9 now"):
        t.resume(trained / "checkpoints" / "last.pt")


def test_pickled_checkpoint_is_refused_on_resume(corpus, tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": "wordlm-checkpoint", "x": _Evil(str(marker))}, evil)
    msg = one_line_error(run_cli("train.py", train_args(corpus, tmp_path / "r", f"trainer.resume={evil}")))
    assert "pickled" in msg
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_fresh_run_refuses_to_overwrite_another_runs_checkpoints(corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    msg = one_line_error(run_cli("train.py", train_args(corpus, run, "trainer.max_steps=3")))
    assert "already holds a run (checkpoints/" in msg and "trainer.resume=auto" in msg
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


def test_impossible_optimizer_values_are_refused():
    from wordlm.config import Config, OptimConfig, UserError, validate

    for kw, key in [({"momentum": -1}, "optim.momentum"), ({"betas": [0.9, 1.5]}, "optim.betas"),
                    ({"weight_decay": -0.1}, "optim.weight_decay"), ({"eps": 0}, "optim.eps"),
                    ({"min_lr_ratio": 2}, "optim.min_lr_ratio")]:
        with pytest.raises(UserError, match=key):
            validate(Config(optim=OptimConfig(**kw)))
