"""Bad and unusual input, round 3 (issue 25): each case reproduces an input that was silently wrong, lost data
or printed a traceback, and checks the one clear line (or the right result) now."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, tiny_config


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


@pytest.mark.slow
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


# ---------------------------------------------------------------------------- silently wrong: in-process checks
import math  # noqa: E402
import zipfile  # noqa: E402

import torch  # noqa: E402

from wordlm import checkpoint  # noqa: E402
from wordlm.config import (  # noqa: E402
    DynamicConfig,
    EvaluateConfig,
    OptimConfig,
    UserError,
    validate,
)
from wordlm.data import read_corpus  # noqa: E402
from wordlm.models import build_model, model_config  # noqa: E402
from wordlm.trainer import Trainer  # noqa: E402


def _cfg(name="lstm", optim=None, **trainer):
    return tiny_config(name, optim, dropout=0.0, **{"epochs": 1, **trainer})


@pytest.mark.parametrize("cfg, line", [
    (_cfg(optim=OptimConfig(name="adamw", lr=30.0)), "optim.lr=30 with AdamW diverges"),
    (_cfg(optim=OptimConfig(name="adamw", lr=1e-3, ntasgd=True)), "optim.ntasgd=true averages SGD's iterates"),
    (_cfg(seed=2 ** 64), "trainer.seed=18446744073709551616 must be in [0, 2**63)"),
    (_cfg(seed=-1), "trainer.seed=-1 must be in [0, 2**63)"),
    (_cfg(bptt=1, variable_bptt=True), "it needs trainer.bptt >= 5"),
])
def test_settings_that_cannot_work_are_refused_before_training(cfg, line):
    with pytest.raises(UserError, match=re.escape(line)):
        validate(cfg)


import re  # noqa: E402


@pytest.mark.parametrize("change, line", [
    (dict(lr=float("nan")), "must be finite and >= 0"),
    (dict(decay=float("inf")), "must be finite and >= 0"),
    (dict(eps=float("nan")), "finite and > 0"),
    (dict(stat_batches=0), "dynamic.stat_batches=0 must be >= 1 or null"),
    (dict(stat_batches=-2), "dynamic.stat_batches=-2 must be >= 1 or null"),
])
def test_evaluate_refuses_dynamic_settings_that_cannot_work(change, line):
    from wordlm.evaluation.command import validate as evaluate_validate

    with pytest.raises(UserError, match=re.escape(line)):
        evaluate_validate(EvaluateConfig(checkpoint="x.pt", dynamic=DynamicConfig(enabled=True, **change)))


@pytest.mark.parametrize("tokens", [0, -5])
def test_evaluate_refuses_tune_tokens_that_tune_on_nothing(tokens):
    from wordlm.evaluation.command import validate as evaluate_validate

    with pytest.raises(UserError, match=f"tune_tokens={tokens} must be >= 1 or null"):
        evaluate_validate(EvaluateConfig(checkpoint="x.pt", tune=True, tune_tokens=tokens,
                                         dynamic=DynamicConfig(enabled=True)))


def test_a_run_whose_validation_is_not_finite_fails_and_is_never_completed(corpus, tmp_path, one_thread):
    from wordlm.tracking import Tracker

    t = Trainer(_cfg(optim=OptimConfig(lr=1e30, schedule="constant"), max_steps=6, eval_every=3, clip=None),
                read_corpus(corpus), tmp_path, Tracker(tmp_path))
    with pytest.raises(UserError, match=r"the validation loss is \S+ at step 3: training diverged; lower optim"):
        t.fit()
    assert t.stop_reason == "diverged" and not (tmp_path / "checkpoints" / "best.pt").exists()


def _flip_a_tensor_byte(src, dst):
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 17] ^= 0x40
    dst.write_bytes(bytes(data))
    return info.filename


def test_a_checkpoint_whose_bytes_changed_is_refused_naming_the_file(trained, tmp_path):
    bad = tmp_path / "flipped.pt"
    member = _flip_a_tensor_byte(trained / "checkpoints" / "best.pt", bad)
    for load in (checkpoint.load, checkpoint.load_model):
        with pytest.raises(UserError, match=re.escape(f"{bad} is damaged: {member} no longer matches the checksum")):
            load(bad)
    model = build_model(model_config("lstm", emsize=16, nhid=16, nlayers=1), 10)
    with pytest.raises(UserError, match="is damaged"):
        checkpoint.init_from(model, None, bad)


def test_init_from_names_the_model_keys_that_differ(trained):
    loaded = checkpoint.load_model(trained / "checkpoints" / "best.pt")
    other = loaded.config.model.__class__(**{**vars(loaded.config.model), "name": "rnn_relu"})
    model = build_model(other, len(loaded.vocab))
    with pytest.raises(UserError, match=r"holds another model \(model.name: 'lstm' there, 'rnn_relu' here\)"):
        checkpoint.init_from(model, loaded.vocab, trained / "checkpoints" / "best.pt")


def test_init_from_a_folder_says_it_is_a_folder(trained):
    with pytest.raises(UserError, match="is a folder, not a checkpoint file: pass the .pt file itself, e.g. .*best.pt"):
        checkpoint.load(trained)


def test_last_pt_of_an_averaging_run_holds_the_averaged_weights_it_validated(corpus, trained, tmp_path, one_thread):
    from wordlm.evaluation.scoring import nll

    cfg = _cfg(optim=OptimConfig(lr=5.0, finetune=True), max_steps=7,
               init_from=str(trained / "checkpoints" / "best.pt"))
    t = Trainer(cfg, read_corpus(corpus), tmp_path)
    m = t.fit()
    loaded = checkpoint.load_model(tmp_path / "checkpoints" / "last.pt")
    assert loaded.weights.startswith("averaged") and "validated_model" in loaded.raw
    raw = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(raw[k], v) for k, v in loaded.model.state_dict().items())
    val = nll(loaded.model, t.eval_data["valid"], 8, torch.device("cpu"))
    assert math.exp(val) == pytest.approx(m["curve"][-1]["valid_ppl"], rel=1e-4)  # what the run validated


def test_dynamic_evaluation_that_diverges_stops_naming_the_setting(trained, one_thread):
    from wordlm.evaluation import stream

    loaded = checkpoint.load_model(trained / "checkpoints" / "best.pt")
    data = torch.randint(0, len(loaded.vocab), (200, 1))
    ms = stream.gradient_stats(loaded.model, data.reshape(-1), 5, torch.device("cpu"), "fp32", batch_size=2)
    dyn = stream.Dynamic(loaded.model, DynamicConfig(lr=1e8, decay=0.0, eps=1e-12), ms)
    with pytest.raises(UserError, match=r"dynamic evaluation diverged at segment \d+ .* dynamic.lr \(now 1e\+08\)"):
        stream.token_nll(loaded.model, data, 5, torch.device("cpu"), dynamic=dyn)
    before = checkpoint.load_model(trained / "checkpoints" / "best.pt").model.state_dict()
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())  # restored


def test_generate_refuses_a_seed_beyond_63_bits():
    from wordlm.config import GenerateConfig
    from wordlm.generate import validate as generate_validate

    with pytest.raises(UserError, match=re.escape("seed=18446744073709551616 must be in [0, 2**63)")):
        generate_validate(GenerateConfig(checkpoint="x.pt", seed=2 ** 64))


def test_evaluate_reads_only_the_splits_it_needs_and_never_prints_nan(trained, corpus, tmp_path):
    from wordlm.config import DataConfig
    from wordlm.evaluation.command import run as evaluate_run

    only_valid = tmp_path / "only_valid"
    only_valid.mkdir()
    shutil.copy(corpus / "valid.txt", only_valid / "valid.txt")
    out = evaluate_run(EvaluateConfig(checkpoint=str(trained / "checkpoints" / "best.pt"), split="valid",
                                      data=DataConfig(name="custom", dir=str(only_valid), cache=False),
                                      progress=False, device="cpu"))
    assert math.isfinite(out["perplexity"]) and out["weights"] == "trained"
    ck = torch.load(trained / "checkpoints" / "best.pt", weights_only=True)
    ck["model"]["encoder.weight"][:] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(UserError, match=r"nan.pt scores test to a loss of nan: its weights are not finite \(encoder"):
        evaluate_run(EvaluateConfig(checkpoint=str(tmp_path / "nan.pt"), progress=False, device="cpu",
                                    data=DataConfig(name="custom", dir=str(corpus), cache=False)))


def test_a_resume_may_change_eval_context_where_the_model_carries_state():
    from wordlm.compose import resume_conflicts
    from wordlm.config import to_dict

    rnn = _cfg()
    saved = to_dict(rnn)
    rnn.trainer.eval_context = 3
    assert resume_conflicts(saved, rnn) == []
    tr = _cfg()
    tr.model = model_config("transformer", emsize=16, nhid=16, nlayers=1, nhead=2)
    saved = to_dict(tr)
    tr.trainer.eval_context = 3
    assert [k for k, _, _ in resume_conflicts(saved, tr)] == ["trainer.eval_context"]


# ---------------------------------------------------------------------------- through the real command line
def test_another_optimizer_group_under_a_preset_brings_its_own_defaults(corpus, tmp_path):
    run = tmp_path / "run"
    p = run_cli("train.py", train_args(corpus, run, "experiment=awd_lstm_small", "optim=adamw", "model.emsize=16",
                                       "model.nhid=16", "model.last_nhid=16", "trainer.max_steps=2"))
    assert p.returncode == 0, p.stderr
    log = (run / "train.log").read_text()
    assert "optim=adamw: the preset's optimizer settings optim.lr=30.0" in log
    used = json.loads((run / "metrics.json").read_text())["config"]
    assert used["optim.name"] == "adamw" and used["optim.lr"] == 1e-3


def test_keys_that_do_nothing_are_named_once_and_stay_out_of_the_run_name(corpus, tmp_path):
    run = tmp_path / "run"
    p = run_cli("train.py", train_args(corpus, run, "optim.betas=[0.8,0.9]", "trainer.max_steps=2"))
    assert p.returncode == 0, p.stderr
    assert "optim.betas does nothing with this run's other settings" in (run / "train.log").read_text()
    assert "betas" not in json.loads((run / "metrics.json").read_text())["run_name"]


def test_finetuning_with_nothing_to_start_from_is_refused(corpus, tmp_path):
    p = run_cli("train.py", train_args(corpus, tmp_path / "ft", "experiment=awd_lstm_wt2_finetune",
                                       "trainer.resume=auto", "model.emsize=16", "model.nhid=16",
                                       "model.last_nhid=16", "trainer.max_steps=2"))
    assert p.returncode == 2 and "optim.finetune=true finetunes a trained model" in p.stderr, p.stderr
    assert not (tmp_path / "ft").exists()


def test_the_cutoffs_hint_no_longer_claims_a_key_of_every_type(corpus, tmp_path):
    p = run_cli("train.py", train_args(corpus, tmp_path / "r", "model.cutoffs=2000"))
    assert p.returncode == 2 and "is a setting of model=" not in p.stderr and "cutoffs" in p.stderr, p.stderr


@pytest.mark.slow
def test_a_quoted_tilde_in_the_run_folder_is_the_home_folder(corpus, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    p = run_cli("train.py", [*train_args(corpus, tmp_path / "unused", "trainer.max_steps=2")[:-0 or None],
                             'hydra.run.dir="~/runs/y"'], cwd=tmp_path, env={"HOME": str(home)})
    assert p.returncode == 0, p.stderr
    assert (home / "runs" / "y" / "metrics.json").is_file() and not (tmp_path / "~").exists()


@pytest.mark.slow
def test_ctrl_c_during_generate_says_what_it_stopped(trained, tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), f"checkpoint={trained}/checkpoints/best.pt",
                             "words=100000000", f"outf={tmp_path / 'out.txt'}", "progress=false"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted by Ctrl-C; generate stopped (a file given as outf=" in err, err
    assert "before training started" not in err and not (tmp_path / "out.txt").exists()
