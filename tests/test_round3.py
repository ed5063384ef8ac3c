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
