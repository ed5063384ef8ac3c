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

# Where the checkout has no ../shared beside it, the bench runs against this classic loop instead: the same
# command-line interface and JSON ``curve``, a real (small) training program in a subprocess.
CLASSIC_LOOP = """
import argparse, json, math, time
import torch, torch.nn as nn, torch.nn.functional as F
ap = argparse.ArgumentParser()
for k in ("--data", "--model"): ap.add_argument(k)
for k in ("--emsize", "--nhid", "--nlayers", "--batch-size", "--bptt", "--epochs", "--seed"):
    ap.add_argument(k, type=int)
for k in ("--dropout", "--lr", "--clip"): ap.add_argument(k, type=float)
ap.add_argument("--tied", action="store_true")
a = ap.parse_args()
torch.manual_seed(a.seed)
words, splits = {}, {}
for s in ("train", "valid", "test"):
    ids = [words.setdefault(w, len(words)) for line in open(f"{a.data}/{s}.txt") for w in line.split() + ["<eos>"]]
    splits[s] = torch.tensor(ids)
cols = lambda t, b: t[: t.numel() // b * b].view(b, -1).t().contiguous()
V, train, valid = len(words), cols(splits["train"], a.batch_size), cols(splits["valid"], 10)
emb, rnn, dec = nn.Embedding(V, a.emsize), nn.LSTM(a.emsize, a.nhid, a.nlayers), nn.Linear(a.nhid, V)
params = [*emb.parameters(), *rnn.parameters(), *dec.parameters()]
def nll(data, train_mode):
    total, h = 0.0, None
    for i in range(0, data.size(0) - 1, a.bptt):
        x, y = data[i:i + a.bptt], data[i + 1:i + 1 + a.bptt]
        x = x[: y.size(0)]
        out, h = rnn(emb(x), h)
        h = tuple(t.detach() for t in h)
        loss = F.cross_entropy(dec(out).view(-1, V), y.reshape(-1))
        if train_mode:
            for p in params: p.grad = None
            loss.backward()
            nn.utils.clip_grad_norm_(params, a.clip)
            with torch.no_grad():
                for p in params: p.add_(p.grad, alpha=-a.lr)
        total += loss.item() * y.numel()
    return total / (data.size(0) - 1) / data.size(1)
t0, curve = time.perf_counter(), []
for e in range(a.epochs):
    nll(train, True)
    with torch.no_grad():
        v = nll(valid, False)
    curve.append({"epoch": e + 1, "valid_ppl": round(math.exp(v), 3), "seconds": round(time.perf_counter() - t0, 2)})
print(json.dumps({"curve": curve}))
"""


def classic_example(tmp_path):
    if BASELINE.exists():
        return BASELINE
    path = tmp_path / "classic_loop.py"
    path.write_text(CLASSIC_LOOP)
    return path


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
    baseline = classic_example(tmp_path)
    tiny = " ".join(t for t in TINY if not t.startswith("trainer.epochs"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "wordlm.bench", "--to-ppl", "1000", "--data", str(corpus_dir),
                        "--baseline", str(baseline), "--baseline-epochs", "2", "--repeats", "1", "--limit-minutes",
                        "2", "-c", f"{tiny} trainer.epochs=3 trainer.eval_every=10"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["target_ppl"] == 1000 and row["seconds_to_target"] == row["curve"][0]["seconds"]
    assert row["baseline_seconds_to_target"] == row["baseline_curve"][0]["seconds"]  # its first epoch is below 1000
    # (time_ratio is rounded to 3 decimals: at a ratio near 0.03 that alone is 1.5 %)
    assert row["time_ratio"] == pytest.approx(row["seconds_to_target"] / row["baseline_seconds_to_target"], rel=0.01,
                                              abs=5e-4)
    assert len(row["baseline_curve"]) == 2 and row["runs_process_seconds"][0] >= row["seconds_to_target"]

    bad = subprocess.run([sys.executable, "-m", "wordlm.bench", "--to-ppl", "low", "--baseline", str(baseline)],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--to-ppl 'low': give a perplexity" in bad.stderr


def test_synthetic_corpus_is_zipfian_deterministic_and_never_overwrites(tmp_path):
    from collections import Counter

    from wordlm.synthetic import make

    a = make(tmp_path / "a", 60_000, 25_000, 5_000, topics=20, alpha=1.0, seed=3)
    make(tmp_path / "b", 60_000, 25_000, 5_000, topics=20, alpha=1.0, seed=3)
    assert (tmp_path / "a" / "train.txt").read_bytes() == (tmp_path / "b" / "train.txt").read_bytes()
    words = (tmp_path / "a" / "train.txt").read_text().split()
    lines = (tmp_path / "a" / "train.txt").read_text().count("\n")
    assert a["tokens"]["train"] == len(words) + lines and abs(a["tokens"]["train"] - 60_000) < 40
    counts = Counter(words)
    assert counts.most_common(1)[0][0] in {"w0", "w1"} and counts["w0"] > 20 * counts.get("w999", 1)
    assert len(counts) > 5_000  # a long tail
    from wordlm.config import UserError

    with pytest.raises(UserError, match="exists: pick an empty folder"):
        make(tmp_path / "a", 1000, 25_000, 100, topics=2, alpha=1.0, seed=0)
    assert (tmp_path / "a" / "train.txt").read_bytes() == (tmp_path / "b" / "train.txt").read_bytes()


def test_profile_says_where_the_step_time_goes(corpus_dir, one_thread):
    from wordlm.bench import profile_one

    out = profile_one(["data=custom", f"data.dir={corpus_dir}", *TINY], steps=3, warmup=1, top=8)
    ops = [t["op"] for t in out["top"]]
    assert len(ops) == 8 and out["ms_per_step"] > 0 and out["device"] == "cpu"
    assert 0 < sum(t["share"] for t in out["top"]) <= 1.0001
    assert any("mm" in op or "rnn" in op for op in ops), ops  # the recurrence and matmuls are where it goes


@pytest.mark.slow
def test_generate_bench_times_every_config_in_its_own_process(tmp_path, corpus_dir):
    env = {**os.environ, "WORDLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "wordlm.bench", "--generate", "40", "--repeats", "2", "--data", str(corpus_dir),
           "-c", "model=lstm model.emsize=16 model.nhid=16 trainer.threads=1",
           "-c", "model=transformer model.emsize=16 model.nhid=16 trainer.threads=1 trainer.bptt=12"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["model"] for r in rows] == ["lstm", "transformer"]
    for r in rows:
        assert len(r["runs_words_per_sec"]) == 2 and r["words_per_sec"] > 0 and r["threads"] == 1
        assert sorted(r["runs_words_per_sec"])[0] <= r["words_per_sec"] <= sorted(r["runs_words_per_sec"])[1]
    assert rows[1]["context"] == 12 and rows[0]["vocab"] == rows[1]["vocab"] > 10

    prof = subprocess.run([*cmd[:5], "--profile", *cmd[7:11]], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert prof.returncode == 0, prof.stderr[-2000:]
    row = json.loads(prof.stdout.splitlines()[-1])
    assert row["us_per_word"] > 0 and any("mm" in t["op"] or "lstm" in t["op"] for t in row["top"]), row["top"]
    bad = subprocess.run([*cmd[:4], "0"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "--generate 0: give the number of words" in bad.stderr
