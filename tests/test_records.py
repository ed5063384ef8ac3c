"""What a run says about itself, read where users read it: the real TensorBoard server's HPARAMS, the event
files, train.log and metrics.json; and the run's name in its folder."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_cli, write_corpus

STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs in one outputs/ folder, named by their overrides (no hydra.run.dir): an LSTM at the default
    optim.lr and a transformer at another; as a user would start them, from their own folder."""
    home = tmp_path_factory.mktemp("user")
    corpus = write_corpus(home / "corpus", {"train": 120, "valid": 20, "test": 20})
    common = ["data=custom", f"data.dir={corpus}", *TINY]
    lstm = run_cli("train.py", [*common, "model=lstm"], cwd=home, check=True)
    time.sleep(1.1)  # the run folders are named to the second
    tr = run_cli("train.py", [*common, "model=transformer", "optim.lr=5"], cwd=home, check=True)
    runs = sorted((home / "outputs").glob("*/*"))
    assert len(runs) == 2, runs
    return home, runs[0], runs[1], lstm, tr


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_the_run_folder_and_metrics_carry_the_run_name(two_runs, tmp_path, corpus):
    home, lstm, tr, _, _ = two_runs
    # model=lstm is the default: not part of the name; the transformer's differing overrides are.
    assert "model" not in lstm.name and lstm.name.split("_", 1)[1].startswith("data-custom_dir-corpus")
    assert "model-transformer" in tr.name and tr.name.endswith("lr-5")
    m = _metrics(tr)
    assert m["run_name"].startswith("data=custom,data.dir=corpus,") and "model=transformer" in m["run_name"]
    assert m["run_name"].endswith(",model=transformer,optim.lr=5") and m["config"]["run_name"] == m["run_name"]
    # An explicit name.
    p = run_cli("train.py", ["data=custom", f"data.dir={corpus}", *TINY, "trainer.max_steps=2", "run_name=my baseline"],
                cwd=tmp_path, check=True)
    (run,) = (tmp_path / "outputs").glob("*/*")
    assert run.name.endswith("_my_baseline") and _metrics(run)["run_name"] == "my baseline"
    assert "run my baseline |" in (run / "train.log").read_text() and str(run) in p.stdout


def test_metrics_json_explains_the_run(two_runs):
    home, lstm, _, _, _ = two_runs
    m = _metrics(lstm)
    assert m["status"] == "completed" and m["stop_reason"] == "epochs" and m["error"] is None
    assert m["epochs"] == 1.0 and m["epochs_completed"] == 1 and m["steps"] > 0
    # Seconds: training, evaluation and checkpoint writes, apart; together the whole.
    assert m["train_seconds"] > 0 and m["eval_seconds"] > 0 and m["checkpoint_seconds"] > 0
    assert m["train_seconds"] + m["eval_seconds"] + m["checkpoint_seconds"] == pytest.approx(m["seconds"], abs=0.01)
    ck = torch.load(lstm / "checkpoints" / "best.pt", weights_only=True)
    assert m["vocab_size"] == len(ck["vocab"]) == m["config"]["data.vocab_size"]
    assert (m["steps"] - 1) * 4 * 8 < m["tokens"] <= m["steps"] * 4 * 8  # batch 4 x bptt 8, a last short window
    # What ran, resolved: not "auto"; keys that do nothing for this run are left out.
    c = m["config"]
    assert c["trainer.device"] == "cpu" and c["trainer.precision"] in ("fp32", "bf16")
    assert c["trainer.compile"] is False and c["trainer.threads"] == 1 and c["model.params"] == m["params"]
    assert c["model.dropouti"] == c["model.dropout"] == 0.0 and "model.dropouth" not in c  # one layer
    assert "optim.momentum" in c and "optim.betas" not in c and "optim.warmup_steps" not in c  # sgd, plateau
    tr = _metrics(two_runs[2])["config"]
    assert tr["model.name"] == "transformer" and "model.nhead" in tr and "model.dropouti" not in tr
    assert tr["trainer.eval_context"] == 4 and c["trainer.eval_context"] == 0  # bptt 8: half; an LSTM has state
    # Where it came from.
    v = m["versions"]
    assert v["torch"] == torch.__version__ and v["python"] == sys.version.split()[0] and v["hydra-core"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert m["git"]["commit"] == head and isinstance(m["git"]["dirty"], bool)
    else:
        assert m["git"] is None


def test_train_log_says_when_evaluation_and_checkpoints_start_and_end_and_why_it_stopped(two_runs):
    _, lstm, _, _, _ = two_runs
    log = (lstm / "train.log").read_text()
    steps = _metrics(lstm)["steps"]
    order = [
        rf"validation at step {steps}: scoring the valid split \(\d+ tokens\)",
        rf"end of epoch 1 \| step {steps} \| valid loss [\d.]+ \| valid ppl [\d.]+ \| best \| [\d.]+ s",
        r"checkpoint: writing checkpoints/best\.pt",
        r"checkpoint: wrote checkpoints/best\.pt \([\d.]+ MB in [\d.]+ s\)",
        r"checkpoint: writing checkpoints/last\.pt",
        r"checkpoint: wrote checkpoints/last\.pt",
        rf"stopping at step {steps} \(epoch 1\.00\): trainer\.epochs=1 completed",
        r"test: scoring the test split \(\d+ tokens\) with the best validated weights",
        r"test loss [\d.]+ \| test ppl [\d.]+ \| best valid ppl [\d.]+ \| [\d.]+ s",
        r"done: \d+ steps, 1\.00 epochs in [\d.]+ min \(training [\d.]+, evaluation [\d.]+, checkpoints [\d.]+\); "
        r"stopped by epochs",
    ]
    at = 0
    for pattern in order:
        m = re.compile(pattern).search(log, at)
        assert m, f"{pattern!r} not found after position {at} of:\n{log[at:at + 3000]}"
        at = m.end()


def test_a_failed_run_writes_its_error_line_into_train_log_and_metrics(corpus, tmp_path):
    run = tmp_path / "r"
    p = run_cli("train.py", ["data=custom", f"data.dir={corpus}", f"hydra.run.dir={run}", *TINY,
                             "trainer.debug_nan_at_step=3", "trainer.debug_nan_steps=100", "trainer.max_bad_steps=4"])
    assert p.returncode == 2
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("wordlm: error: 4 non-finite steps in a row"), p.stderr
    message = line[len("wordlm: error: "):]
    log = (run / "train.log").read_text()
    assert re.search(r"\[ERROR\] - run failed at step \d+: " + re.escape(message), log), log[-2000:]
    m = _metrics(run)
    assert m["status"] == "failed" and m["stop_reason"] == "bad_steps" and m["error"] == message
    assert m["test_ppl"] is None and m["steps"] >= 4


def test_tensorboard_scalars_config_and_sample(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, lstm, _, _, _ = two_runs
    m = _metrics(lstm)
    acc = EventAccumulator(str(lstm / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/epoch", "train/tokens", "train/ms_per_step", "train/mfu", "train/peak_mem_mb"} <= tags
    assert not any(t.startswith(("hparam", "test/")) for t in tags), tags  # no step-0 duplicates, no test curves
    epochs = [e.value for e in acc.Scalars("train/epoch")]
    assert epochs == sorted(epochs) and 0 < epochs[0] < 1 and epochs[-1] == pytest.approx(1.0)
    tokens = [(e.step, e.value) for e in acc.Scalars("train/tokens")]
    assert all(v == s * 4 * 8 for s, v in tokens[:-1]) and tokens[-1][1] == m["tokens"]
    assert all(0 < e.value < 1 for e in acc.Scalars("train/mfu"))
    assert all(e.value > 10 for e in acc.Scalars("train/peak_mem_mb"))  # MB of this process: torch alone is more
    assert all(e.value > 0 for e in acc.Scalars("train/ms_per_step"))
    text = {t: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    config = text[next(t for t in text if t.startswith("config"))]
    assert "trainer.device: cpu" in config and "trainer.precision: auto" not in config and "optim.betas" not in config
    sample = text[next(t for t in text if t.startswith("sample"))]
    assert re.search(r"5 words sampled at step \d+ \(epoch 1\.00\), seed 1111, temperature 1", sample), sample


def _tensorboard(logdir: Path):
    """The real TensorBoard server on 127.0.0.1 (a free port), as `tensorboard --logdir` starts it."""
    p = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                          "--port", "0", "--load_fast", "false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    base = None
    for line in p.stdout:
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if m:
            base = m.group(1)
            break
    assert base, "TensorBoard did not start"
    return p, base


def _post(base: str, route: str, body: dict) -> dict:
    req = urllib.request.Request(f"{base}/data/plugin/hparams/{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def test_tensorboard_hparams_marks_what_differs_and_shows_the_results(two_runs):
    home, lstm, tr, _, _ = two_runs
    server, base = _tensorboard(home / "outputs")
    try:
        deadline = time.monotonic() + 60
        while True:  # the server answers before its first read of the logdir has finished
            groups = _post(base, "session_groups", {"experimentName": "", "allowedStatuses": STATUSES,
                                                    "colParams": [], "startIndex": 0, "sliceSize": 100})
            if groups.get("totalSize") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        exp = _post(base, "experiment", {"experimentName": "", "hparamsLimit": 1000})
    finally:
        server.terminate()
        server.wait(timeout=30)
    infos = {h["name"]: h for h in exp["hparamInfos"]}
    differs = {name for name, h in infos.items() if h.get("differs")}
    # One experiment, inferred from both runs: what the two commands changed is marked as differing, and so
    # are the values that follow from it (parameters; run name); the shared settings are not.
    assert {"model.name", "optim.lr", "run_name", "model.params"} <= differs, differs
    assert not differs & {"data.name", "data.dir", "trainer.bptt", "optim.name", "trainer.device"}, differs
    # TensorBoard's HPARAMS shows the differing ones first (its default columns).
    first = [h["name"] for h in exp["hparamInfos"]][: len(differs)]
    assert set(first) == differs
    assert infos["model.tied"]["type"] == "DATA_TYPE_BOOL" and infos["trainer.compile"]["type"] == "DATA_TYPE_BOOL"
    assert infos["data.max_vocab"]["domainDiscrete"] == ["none"]  # null is shown, as "none"
    assert infos["trainer.precision"]["domainDiscrete"] in (["fp32"], ["bf16"])  # resolved, not "auto"
    assert infos["model.nhead"]["type"] == "DATA_TYPE_FLOAT64"  # the transformer's own key, missing in the LSTM's
    # The metric columns are the results, read from the runs' real scalar tags.
    assert {m["name"]["tag"] for m in exp["metricInfos"]} == {"valid/best_ppl", "test/ppl", "test/loss"}
    assert groups["totalSize"] == 2
    for group in groups["sessionGroups"]:
        (session,) = group["sessions"]
        run = lstm if session["name"].startswith(lstm.parent.name + "/" + lstm.name) else tr
        m = _metrics(run)
        values = {v["name"]["tag"]: v["value"] for v in session["metricValues"]}
        assert values["test/ppl"] == pytest.approx(m["test_ppl"], rel=1e-5)
        assert values["valid/best_ppl"] == pytest.approx(m["best_valid_ppl"], rel=1e-5)
        assert session["status"] == "STATUS_SUCCESS"
        assert group["hparams"]["model.name"] == ("lstm" if run == lstm else "transformer")
        assert math.isclose(group["hparams"]["optim.lr"], 20.0 if run == lstm else 5.0)
