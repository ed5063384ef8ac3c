"""Nothing lost, nothing silently wrong: outf safety, the run lock, the run record, strict resume, exact resume
for every way a run stops, checkpoint versions, degenerate vocabularies, OOV reporting, and one line (no
traceback) for the inputs that used to crash.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, train_args, write_corpus
from test_resume import tb_losses, wait_for_step

from wordlm import checkpoint


def evaluate_cli(args: list, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "wordlm.evaluate", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert not check or p.returncode == 0, p.stderr[-3000:]
    return p


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("wordlm: error:")]
    assert len(errors) == 1 and len(lines) == 1, p.stderr
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A real 512 KiB file system (tmpfs): writes fail with ENOSPC as on a full disk."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(folder: Path, leave: int) -> None:
    """Fill ``folder``'s file system until about ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    (folder / "ballast").write_bytes(b"\0" * max(0, free - leave))


# ---------------------------------------------------------------------------- 1. generate never destroys a file
def test_outf_never_replaces_the_checkpoint_or_an_existing_file(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.pt"
    before = ckpt.read_bytes()
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={ckpt}", f"outf={ckpt}", "words=5"]))
    assert "is the checkpoint itself" in msg and ckpt.read_bytes() == before
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={ckpt}", f"outf={tmp_path / 'x.pt'}", "words=5"]))
    assert ".pt" in msg and not (tmp_path / "x.pt").exists()
    out = tmp_path / "notes.txt"
    out.write_text("my notes\n")
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={ckpt}", f"outf={out}", "words=5"]))
    assert "already exists" in msg and "overwrite=true" in msg and out.read_text() == "my notes\n"
    run_cli("generate.py", [f"checkpoint={ckpt}", f"outf={out}", "words=5", "overwrite=true"], check=True)
    assert out.read_text() != "my notes\n" and len(out.read_text().split()) <= 5


def test_outf_on_a_full_disk_is_one_line_and_keeps_the_old_file(trained, small_disk):
    out = small_disk / "sample.txt"
    out.write_text("old\n")
    fill(small_disk, 0)
    p = run_cli("generate.py", [f"checkpoint={trained / 'checkpoints' / 'best.pt'}", f"outf={out}",
                                "words=50000", "overwrite=true", "progress=false"])
    msg = one_line_error(p)
    assert "disk is full" in msg and out.read_text() == "old\n"
    assert sorted(x.name for x in small_disk.iterdir()) == ["ballast", "sample.txt"]  # no temp file left


# ---------------------------------------------------------------------------- 2-3. one run per folder; its record
def _start(args: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_stops_at_once_and_a_killed_holder_leaves_no_stale_lock(corpus, tmp_path):
    run = tmp_path / "run"
    long = train_args(corpus, run, "trainer.epochs=1000", "trainer.log_interval=1", "trainer.sample_words=0")
    first = _start(long)
    try:
        wait_for_step(first, 3)
        record = (run / ".hydra" / "config.yaml").read_text()
        t = time.monotonic()
        p = run_cli("train.py", train_args(corpus, run, "trainer.max_steps=5", "trainer.seed=7"))
        msg = one_line_error(p)
        assert time.monotonic() - t < 30
        assert f"another wordlm run is using {run}" in msg and f"pid {first.pid}" in msg
        assert (run / ".hydra" / "config.yaml").read_text() == record  # the refused run changed nothing
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate(timeout=30)
    # SIGKILL: the kernel dropped the lock; the folder can be resumed at once.
    r = run_cli("train.py", [*long[:-3], "trainer.max_steps=3", "trainer.resume=auto", "trainer.epochs=1000",
                             "trainer.sample_words=0"])
    assert r.returncode == 0 or "already" in r.stderr, r.stderr  # resumable (or past max_steps already)
    assert "another wordlm run" not in r.stderr


def test_a_refused_command_leaves_the_run_record_alone(trained, corpus, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    one_line_error(run_cli("train.py", train_args(corpus, run, "trainer.max_steps=3")))  # would overwrite a run
    one_line_error(run_cli("train.py", train_args(corpus, run, "trainer.resume=auto", "optim.lr=1")))  # conflicts
    one_line_error(run_cli("train.py", train_args(corpus, run, "trainer.bptt=0")))  # a bad value
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == record


# ---------------------------------------------------------------------------- 4. strict resume
def test_resume_refuses_run_defining_changes_and_applies_the_others(trained, corpus, tmp_path):
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    msg = one_line_error(run_cli("train.py", train_args(corpus, run, "trainer.resume=auto", "optim.lr=1",
                                                        "trainer.seed=5", "model.dropout=0.5")))
    assert "optim.lr: 20.0 in the checkpoint, 1.0 now" in msg and "trainer.seed: 1111 in the checkpoint, 5 now" in msg
    assert "model.dropout" in msg and "trainer.init_from=" in msg
    # Keys a resume may change are applied, and the record says what was used.
    run_cli("train.py", train_args(corpus, run, "trainer.resume=auto", "trainer.max_steps=14",
                                   "trainer.log_interval=2", "trainer.eval_every=3"), check=True)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 14
    used = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert used["trainer"]["max_steps"] == 14 and used["trainer"]["eval_every"] == 3


@pytest.mark.usefixtures("one_thread")
def test_the_optimizer_implementation_follows_this_run_not_the_checkpoint(corpus, tmp_path):
    # A CPU checkpoint (foreach) resumed where fused kernels are used, and back: the flags are this run's.
    from test_core import tiny_cfg

    from wordlm.config import OptimConfig
    from wordlm.data import read_corpus
    from wordlm.trainer import Trainer

    for saved, now in ((False, True), (True, False)):
        src = tmp_path / f"src-{saved}"
        Trainer(tiny_cfg(optim=OptimConfig(fused=saved, momentum=0.9), max_steps=3), read_corpus(corpus), src).fit()
        t = Trainer(tiny_cfg(optim=OptimConfig(fused=now, momentum=0.9), max_steps=6), read_corpus(corpus),
                    tmp_path / f"r-{saved}")
        t.resume(src / "checkpoints" / "last.pt")
        g = t.optimizer.param_groups[0]
        assert bool(g.get("fused")) == now and bool(g.get("foreach")) == (not now) and t.step_fn.fused == now
        assert t.optimizer.state  # the momentum buffers etc. did come back
        t.fit()


# ---------------------------------------------------------------------------- 5. exact resume, every stop
def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _same_run(ref: Path, run: Path) -> None:
    want, got = tb_losses(ref), tb_losses(run)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    a, b = _metrics(ref), _metrics(run)
    assert a["test_loss"] == b["test_loss"] and a["best_valid_loss"] == b["best_valid_loss"]
    wa, wb = checkpoint.load(ref / "checkpoints" / "last.pt"), checkpoint.load(run / "checkpoints" / "last.pt")
    assert all(torch.equal(v, wb["model"][k]) for k, v in wa["model"].items())


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [
    (["trainer.max_steps=13"], ["trainer.max_steps=70"]),  # max_steps mid-epoch, mid-interval
    (["trainer.epochs=1"], ["trainer.epochs=3"]),  # after epoch 1: the plateau schedule sees the same validations
], ids=["max_steps-mid-epoch", "after-epoch-1"])
def test_resume_after_any_stop_reproduces_the_uninterrupted_run(corpus, tmp_path, first, then):
    common = ["model.dropout=0.2", "trainer.log_interval=3", "trainer.sample_words=0", "optim.lr=40",
              "trainer.eval_every=4"]  # many validations: the plateau schedule divides the lr at some
    base = ["trainer.epochs=3", "trainer.max_steps=70"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_cli("train.py", train_args(corpus, ref, *common, *base), check=True)
    assert _metrics(ref)["steps"] == 70
    run_cli("train.py", train_args(corpus, run, *common, *base, *first), check=True)
    run_cli("train.py", train_args(corpus, run, *common, *base, *then, "trainer.resume=auto"), check=True)
    _same_run(ref, run)
    lrs = [e.value for e in _scalars(ref, "train/lr")]
    assert len(set(lrs)) > 1  # the plateau schedule did divide the lr within the run: its decisions were tested


def _scalars(run: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return acc.Scalars(tag)


# ---------------------------------------------------------------------------- 6. checkpoint versions
def test_a_future_or_foreign_checkpoint_is_refused_not_rebuilt_from_defaults(trained, tmp_path):
    ck = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    future = tmp_path / "future.pt"
    torch.save({**ck, "version": 99}, future)
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={future}", "words=3"]))
    assert "format version 99" in msg
    partial = tmp_path / "partial.pt"
    model = dict(ck["config"]["model"])
    del model["nhid"]
    torch.save({**ck, "config": {**ck["config"], "model": model}}, partial)
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={partial}", "words=3"]))
    assert "model.nhid" in msg and "without guessing" in msg


# ---------------------------------------------------------------------------- 8. evaluate says when it is all <unk>
def test_evaluate_reports_the_oov_rate_and_warns(trained, tmp_path):
    other = write_corpus(tmp_path / "other", {"train": 10, "valid": 10, "test": 10}, vocab=20)
    for split in ("train", "valid", "test"):  # words the checkpoint never saw
        text = (other / f"{split}.txt").read_text().replace("w", "zz")
        (other / f"{split}.txt").write_text(text)
    p = evaluate_cli([f"checkpoint={trained / 'checkpoints' / 'best.pt'}", "data=custom", f"data.dir={other}",
                      "progress=false"])
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["oov_rate"] > 0.8 and out["oov_tokens"] > 0
    assert "not in the checkpoint's vocabulary" in p.stderr
    p = evaluate_cli([f"checkpoint={trained / 'checkpoints' / 'best.pt'}", "progress=false"])
    assert json.loads(p.stdout.strip().splitlines()[-1])["oov_rate"] == 0.0 and "warning" not in p.stderr


@pytest.mark.slow
# ---------------------------------------------------------------------------- 9. one line where a traceback was
def test_full_disk_while_training_is_one_line(corpus, small_disk):
    run = small_disk / "run"
    p = run_cli("train.py", train_args(corpus, run, "model.emsize=64", "model.nhid=64", "trainer.max_steps=40",
                                       "trainer.checkpoint_every=5", "trainer.log_interval=1"))
    msg = one_line_error(p)
    assert "disk is full" in msg or "No space left" in msg
    checkpoint.load(run / "checkpoints" / "last.pt")  # the last complete checkpoint is intact


@pytest.mark.slow
def test_unwritable_run_folder_and_unreadable_corpus_are_one_line(corpus, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    subprocess.run(["chattr", "+i", str(parent)], check=True)
    try:
        msg = one_line_error(run_cli("train.py", train_args(corpus, parent / "run", "trainer.max_steps=2")))
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert str(parent / "run") in msg and "hydra.run.dir" in msg

    # root reads anything: drop the capabilities that let it, as an ordinary user would be.
    (corpus / "valid.txt").chmod(0o000)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all",
                            sys.executable, str(ROOT / "train.py"),
                            *train_args(corpus, tmp_path / "r2", "trainer.max_steps=2", "data.cache=false")],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    finally:
        (corpus / "valid.txt").chmod(0o644)
    msg = one_line_error(p)
    assert f"cannot read {corpus / 'valid.txt'}" in msg and "Permission denied" in msg


def test_a_model_too_large_for_memory_is_refused_before_allocating(corpus, tmp_path):
    t = time.monotonic()
    msg = one_line_error(run_cli("train.py", train_args(corpus, tmp_path / "r", "model.emsize=100000",
                                                        "model.nhid=100000")))
    assert time.monotonic() - t < 60
    assert "does not fit in memory" in msg and "GiB" in msg and "available" in msg


@pytest.mark.slow
def test_bf16_rnns_train_and_evaluate_on_any_cpu(corpus, tmp_path):
    for name in ("lstm", "gru"):
        run = tmp_path / name
        run_cli("train.py", train_args(corpus, run, f"model={name}", "trainer.max_steps=4", "trainer.precision=bf16",
                                       "trainer.eval_precision=bf16"), check=True)
        assert math.isfinite(_metrics(run)["test_loss"])
        p = evaluate_cli([f"checkpoint={run / 'checkpoints' / 'best.pt'}", "precision=bf16", "progress=false"],
                         check=True)
        assert math.isfinite(json.loads(p.stdout.strip().splitlines()[-1])["loss"])


def test_ctrl_c_during_imports_is_one_line(corpus, tmp_path):
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(corpus, tmp_path / "r")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until torch's library is mapped (the entry point is importing it, inside its Ctrl-C handler), not a fixed
    # second: on a loaded machine the interpreter itself can take longer than that to start.
    maps, deadline = Path(f"/proc/{p.pid}/maps"), time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None and "libtorch" not in maps.read_text(errors="replace"):
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().startswith("wordlm: interrupted by Ctrl-C"), err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_home_paths_work_in_overrides(corpus, tmp_path):
    home = tmp_path / "home"
    (home / "x").mkdir(parents=True)
    import shutil

    shutil.copytree(corpus, home / "x" / "corpus")
    env = {"HOME": str(home)}
    p = run_cli("train.py", ["data=custom", "data.dir=~/x/corpus", *train_args(corpus, tmp_path / "r")[2:],
                             "trainer.max_steps=2"], env=env)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.slow
# ---------------------------------------------------------------------------- 10. wording
def test_misleading_messages_now_say_what_is_wrong(trained, corpus, tmp_path):
    msg = one_line_error(run_cli("generate.py", [f"checkpoint={trained}", "words=3"]))
    assert "is a folder, not a checkpoint file" in msg and "checkpoints/best.pt" in msg
    folder = write_corpus(tmp_path / "c2")
    (folder / "train.txt").unlink()
    (folder / "train.txt").mkdir()
    msg = one_line_error(run_cli("train.py", train_args(folder, tmp_path / "r")))
    assert "train.txt is a folder, not a text file" in msg
    p = run_cli("generate.py", [f"checkpoint={trained / 'checkpoints' / 'best.pt'}", "words=3", "temperature=1e-300",
                                "context=5"], check=True)
    assert "context=5 is ignored" in p.stderr and "non-finite" not in p.stderr  # greedy, not the weights' fault
    small = write_corpus(tmp_path / "c3", {"train": 120, "valid": 1, "test": 20})
    msg = one_line_error(run_cli("train.py", train_args(small, tmp_path / "r3", "trainer.eval_batch_size=40")))
    assert "valid split" in msg and "trainer.eval_batch_size=40" in msg
