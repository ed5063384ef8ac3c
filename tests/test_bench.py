"""Time to a perplexity: ``trainer.target_ppl`` and ``python -m wordlm.bench --to-ppl`` beside the real classic
example (``../shared/bench/seed_baseline.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_cli, train_args

BASELINE = ROOT.parent / "shared" / "bench" / "seed_baseline.py"


def test_target_ppl_stops_at_the_first_validation_that_reaches_it(tmp_path, corpus_dir):
    run = tmp_path / "run"
    run_cli("train.py", train_args(corpus_dir, run, "trainer.epochs=5", "trainer.eval_every=10",
                                   "trainer.target_ppl=1000"), check=True)
    m = json.loads((run / "metrics.json").read_text())
    assert m["stop_reason"] == "target" and m["steps"] == 10  # the first validation is below 1000 for 31 words
    assert len(m["curve"]) == 1 and m["curve"][0]["step"] == 10 and m["curve"][0]["valid_ppl"] <= 1000
    assert m["seconds_to_target"] == m["curve"][0]["seconds"] <= m["seconds"]
    assert "the validation perplexity reached trainer.target_ppl=1000" in (run / "train.log").read_text()

    run2 = tmp_path / "run2"  # a target never reached: the run ends as it would have, and says so
    run_cli("train.py", train_args(corpus_dir, run2, "trainer.epochs=2", "trainer.target_ppl=1.5"), check=True)
    m2 = json.loads((run2 / "metrics.json").read_text())
    assert m2["stop_reason"] == "epochs" and m2["seconds_to_target"] is None and m2["target_ppl"] == 1.5
    assert [c["step"] for c in m2["curve"]] == sorted(c["step"] for c in m2["curve"]) and len(m2["curve"]) == 2


@pytest.mark.slow
def test_bench_to_ppl_times_both_programs_to_the_target(tmp_path, corpus_dir):
    assert BASELINE.exists(), f"the classic example is missing: {BASELINE}"
    tiny = " ".join(t for t in TINY if not t.startswith("trainer.epochs"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "wordlm.bench", "--to-ppl", "1000", "--data", str(corpus_dir),
                        "--baseline", str(BASELINE), "--baseline-epochs", "2", "--repeats", "1", "--limit-minutes",
                        "2", "-c", f"{tiny} trainer.epochs=3 trainer.eval_every=10"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["target_ppl"] == 1000 and row["seconds_to_target"] == row["curve"][0]["seconds"]
    assert row["baseline_seconds_to_target"] == row["baseline_curve"][0]["seconds"]  # its first epoch is below 1000
    assert row["time_ratio"] == pytest.approx(row["seconds_to_target"] / row["baseline_seconds_to_target"], rel=0.01)
    assert len(row["baseline_curve"]) == 2 and row["runs_process_seconds"][0] >= row["seconds_to_target"]

    bad = subprocess.run([sys.executable, "-m", "wordlm.bench", "--to-ppl", "low", "--baseline", str(BASELINE)],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--to-ppl 'low': give a perplexity" in bad.stderr
