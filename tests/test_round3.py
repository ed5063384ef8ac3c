"""Bad and unusual input, round 3 (issue 25): each case reproduces an input that was silently wrong, lost data
or printed a traceback, and checks the one clear line (or the right result) now."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


def _tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, line", [
    (["--tokens", "0"], "--tokens 0 must be >= 1000"),
    (["--heldout", "-5"], "--heldout -5 must be >= 100"),
    (["--topics", "0"], "--topics 0 must be >= 1"),
    (["--alpha", "nan"], "--alpha nan must be a finite number > 0"),
])
def test_the_synthetic_corpus_tool_refuses_degenerate_sizes_in_one_line_and_writes_nothing(tmp_path, args, line):
    out = tmp_path / "syn"
    p = _tool("wordlm.synthetic", str(out), *args)
    assert p.returncode == 2 and line in p.stderr, p.stderr
    assert p.stderr.startswith("wordlm: error: ") and "Traceback" not in p.stderr and not out.exists()


def test_the_synthetic_corpus_tool_refuses_a_file_as_its_folder(tmp_path):
    f = tmp_path / "afile"
    f.write_text("mine\n")
    p = _tool("wordlm.synthetic", str(f))
    assert p.returncode == 2 and "is a file" in p.stderr and "Traceback" not in p.stderr
    assert f.read_text() == "mine\n"


@pytest.mark.parametrize("args, line", [
    (["--steps", "-1"], "--steps -1 must be >= 1"),
    (["--warmup", "-3"], "--warmup -3 must be >= 0"),
    (["--repeats", "0"], "--repeats 0 must be >= 1"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
    (["--tokenize", "/no/such/folder"], "--tokenize /no/such/folder: no such folder"),
    (["--to-ppl", "0.5"], "--to-ppl '0.5': give a perplexity above 1"),
])
def test_the_benchmark_refuses_impossible_flags_in_one_line(args, line):
    p = _tool("wordlm.bench", *args)
    assert p.returncode == 2 and p.stderr.startswith("wordlm: error: ") and line in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_the_benchmark_passes_on_a_childs_one_line_error(corpus_dir):
    p = _tool("wordlm.bench", "--data", str(corpus_dir), "--repeats", "1", "--steps", "1", "--warmup", "0",
              "-c", "trainer.epoch=3")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("wordlm: error: Could not override 'trainer.epoch'")
    assert "Did you mean trainer.epochs?" in p.stderr


# ---------------------------------------------------------------------------- data loss
import json  # noqa: E402
import shutil  # noqa: E402

from conftest import run_cli, train_args  # noqa: E402


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_refuses_a_finished_runs_folder_whose_last_pt_was_deleted(corpus, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "last.pt").unlink()
    before = _snapshot(run)
    p = run_cli("train.py", train_args(corpus, run, "trainer.max_steps=3"))
    assert p.returncode == 2 and "already holds a run (checkpoints/best.pt" in p.stderr, p.stderr
    assert _snapshot(run) == before  # best.pt, metrics.json, train.log: untouched (nothing appended)
    p = run_cli("train.py", train_args(corpus, run, "trainer.max_steps=3", "trainer.resume=auto"))
    assert p.returncode == 2 and "but no checkpoints/last.pt" in p.stderr and _snapshot(run) == before


def test_a_fresh_run_refuses_a_folder_of_the_users_with_metrics_json_and_hydra(corpus, tmp_path):
    mine = tmp_path / "mine"
    (mine / ".hydra").mkdir(parents=True)
    (mine / ".hydra" / "config.yaml").write_text("my: own\n")
    (mine / "metrics.json").write_text('{"mine": 1}\n')
    before = _snapshot(mine)
    p = run_cli("train.py", train_args(corpus, mine, "trainer.max_steps=3"))
    assert p.returncode == 2 and "already holds a run (metrics.json, .hydra)" in p.stderr, p.stderr
    assert _snapshot(mine) == before and not (mine / "train.log").exists()


def test_a_refused_command_leaves_no_train_log_and_no_empty_folder(corpus, tmp_path):
    new = tmp_path / "new"
    p = run_cli("train.py", train_args(corpus, new, "trainer.resume=/no/such.pt"))
    assert p.returncode == 2 and not new.exists(), p.stderr


@pytest.mark.parametrize("more", ["trainer.max_steps=14", "trainer.epochs=2"])
def test_a_resumed_run_keeps_its_best_whatever_budget_key_grows(corpus, tmp_path, more):
    run = tmp_path / "run"
    # 7 steps: a stop between epoch ends (an epoch is ~30 windows here); its validation made best.pt
    run_cli("train.py", train_args(corpus, run, "trainer.max_steps=7", "optim.lr=20"), check=True)
    first = json.loads((run / "metrics.json").read_text())
    best_before = (run / "checkpoints" / "best.pt").read_bytes()
    # Before, last.pt was written before that validation, without it: the resumed run's first validation became
    # "the best" whatever its value, and the curve lost the step-7 point.
    run_cli("train.py", train_args(corpus, run, more, "optim.lr=20", "trainer.resume=auto"), check=True)
    m = json.loads((run / "metrics.json").read_text())
    curve = [c["valid_ppl"] for c in m["curve"]]
    assert m["curve"][: len(first["curve"])] == first["curve"]  # the first run's points are kept
    assert m["best_valid_ppl"] == pytest.approx(min(curve), rel=1e-3)
    if min(curve[len(first["curve"]):]) >= first["best_valid_ppl"]:
        assert (run / "checkpoints" / "best.pt").read_bytes() == best_before
