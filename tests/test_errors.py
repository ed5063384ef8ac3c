"""Each bad input: one clear line on stderr, no traceback, a non-zero exit, and no run files lost.

Every case points hydra.run.dir at the folder of an earlier run; whatever the mistake, that
run's checkpoints, metrics, TensorBoard events and log must come out of it intact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY, run_cli, train_args, write_corpus

PREFIX = "wordlm: error:"
SLOW = pytest.mark.slow  # the same code path as a fast case: CI runs it with -m slow


class ExtraStderrLines(AssertionError):
    """The error line was right, but stderr held more than that one line."""


def earlier_run(run_dir: Path) -> dict:
    """Files of a previous run in run_dir; returns {relative path: bytes}."""
    files = {
        "checkpoints/best.pt": b"best weights",
        "checkpoints/last.pt": b"last weights",
        "metrics.json": b'{"test_ppl": 1.0}\n',
        "tb/events.out.tfevents.1.host.0": b"events",
        "train.log": b"[earlier run] end of epoch 1\n",
    }
    for rel, data in files.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(data)
    return files


# Each case: (args for train.py given (corpus folder, run dir, tmp_path)), words the message must hold).
Args = Callable[[Path, Path, Path], list[str]]


def custom(*extra: str) -> Args:
    return lambda corpus, run, tmp: train_args(corpus, run, *extra)


def missing_file(corpus, run, tmp):
    (corpus / "test.txt").unlink()
    return train_args(corpus, run)


def empty_file(corpus, run, tmp):
    (corpus / "valid.txt").write_text("")
    return train_args(corpus, run)


def blank_train(corpus, run, tmp):
    (corpus / "train.txt").write_text("\n" * 400)
    return train_args(corpus, run)


def tiny_train(corpus, run, tmp):
    (corpus / "train.txt").write_text("just five words here\n")  # 5 tokens: not 4 columns of 2
    return train_args(corpus, run)


def tiny_valid(corpus, run, tmp):
    (corpus / "valid.txt").write_text("two words\n")  # 3 tokens: not 4 columns of 2
    return train_args(corpus, run)


def no_wikitext(corpus, run, tmp):
    root = tmp / "data_root"
    root.mkdir()
    # data.url: a port nothing listens on, so an automatic download fails at once, offline or not.
    return [*TINY, "data=wikitext2", f"data.root={root}", "data.url=http://127.0.0.1:9/none", f"hydra.run.dir={run}"]


def words_missing_file(corpus, tmp):
    return [str(corpus), "test.txt"]


def words_empty_file(corpus, tmp):
    return [str(corpus / "valid.txt"), "empty"]


def words_wikitext(corpus, tmp):
    return [str(tmp / "data_root" / "wikitext-2"), "train.txt", "valid.txt", "test.txt"]


def fixed(*words: str):
    return lambda corpus, tmp: list(words)


CASES = [
    pytest.param(missing_file, words_missing_file, id="missing_corpus_file"),
    pytest.param(empty_file, words_empty_file, id="empty_corpus_file", marks=SLOW),
    pytest.param(custom("model=foo"), fixed("foo", "lstm", "transformer"), id="unknown_model"),
    pytest.param(custom("model.tied=true", "model.nhid=20"), fixed("model.tied", "model.emsize", "model.nhid"),
                 id="tied_emsize_ne_nhid", marks=SLOW),
    pytest.param(custom("model=transformer", "model.nhead=3"), fixed("model.nhead=3", "model.emsize=16"),
                 id="nhead_does_not_divide_emsize", marks=SLOW),
    pytest.param(custom("model.nhid=0"), fixed("model.nhid=0", ">= 1"), id="nhid_zero", marks=SLOW),
    pytest.param(custom("model.nhead=4"), fixed("model.nhead", "model=transformer"),
                 id="nhead_for_an_lstm", marks=SLOW),
    pytest.param(custom("trainer.eval_every=0"), fixed("trainer.eval_every=0", ">= 1"),
                 id="eval_every_zero", marks=SLOW),
    pytest.param(custom("experiment=nope"), fixed("experiment/nope", "classic_medium"),
                 id="unknown_preset", marks=SLOW),
    pytest.param(custom("trainer.batch_size=0"), fixed("trainer.batch_size=0", ">= 1"),
                 id="batch_size_zero", marks=SLOW),
    pytest.param(tiny_train, fixed("too small"), id="corpus_too_small"),
    pytest.param(tiny_valid, fixed("too small", "valid"), id="valid_split_too_small", marks=SLOW),
    pytest.param(custom("trainer.epoch=3"), fixed("trainer.epoch"), id="unknown_key_trainer_epoch"),
    pytest.param(custom("model.emsiz=10"), fixed("model.emsiz"), id="unknown_key_model_emsiz", marks=SLOW),
    pytest.param(custom("trainer.epochs=abc"), fixed("trainer.epochs", "abc"), id="wrong_type"),
    pytest.param(no_wikitext, words_wikitext, id="wikitext2_folder_missing", marks=SLOW),
    pytest.param(blank_train, fixed("train.txt has 0 distinct words"), id="blank_training_text"),
    pytest.param(custom("data.min_freq=100000"), fixed("data.min_freq=100000", "lower it"), id="min_freq_too_high"),
    pytest.param(custom("data.max_vocab=3"), fixed("data.max_vocab=3", "raise it"), id="max_vocab_3", marks=SLOW),
]


@pytest.mark.parametrize("make_args,words", CASES)
def test_bad_input_is_one_clear_line(tmp_path, make_args, words):
    corpus = write_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    before = earlier_run(run_dir)
    args = make_args(corpus, run_dir, tmp_path)
    p = run_cli("train.py", args, timeout=60)

    assert p.returncode != 0, f"exit 0 on a bad input:\n{p.stdout[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(PREFIX)]
    assert len(errors) == 1, f"want one '{PREFIX}' line, stderr was:\n{p.stderr}"
    msg = errors[0]
    for w in words(corpus, tmp_path):
        assert w in msg, f"{w!r} not in: {msg}"

    # The earlier run's files are all still there, unchanged (the log may only have grown).
    for rel, data in before.items():
        now = (run_dir / rel).read_bytes()
        assert (now.startswith(data) if rel == "train.log" else now == data), f"{rel} lost or changed"

    if len(lines) != 1:
        raise ExtraStderrLines(f"stderr should be the one line {msg!r}, but was:\n{p.stderr}")
