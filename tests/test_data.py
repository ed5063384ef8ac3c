"""Vocabulary, corpus reading, batchify and BPTT windows."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from wordlm.config import UserError
from wordlm.data import EOS, UNK, Vocab, batchify, get_window, num_windows, read_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def write(folder: Path, train: str, valid: str = "a\n", test: str = "a\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------- vocabulary
def test_vocab_order_specials_first_then_frequency_ties_first_seen():
    counts = Counter(["c", "a", "b", "a", "c", "d", "a"])  # a:3, c:2, b:1, d:1 ; first seen: c a b d
    v = Vocab.build(counts)
    assert v.itos == [UNK, EOS, "a", "c", "b", "d"]
    assert (v.unk, v.eos) == (0, 1)
    assert v.stoi["a"] == 2 and len(v) == 6
    assert "a" in v and "zzz" not in v
    assert v.encode(["a", "zzz", EOS, "d"]) == [2, 0, 1, 5]
    assert v.decode([2, 0, 1]) == ["a", UNK, EOS]


def test_vocab_min_freq_and_max_vocab():
    counts = Counter({"x": 5, "y": 3, "z": 2, "w": 1})
    assert Vocab.build(counts, min_freq=2).itos == [UNK, EOS, "x", "y", "z"]
    assert Vocab.build(counts, min_freq=3).itos == [UNK, EOS, "x", "y"]
    assert Vocab.build(counts, min_freq=6).itos == [UNK, EOS]
    # max_vocab counts the specials and keeps the most frequent words.
    assert Vocab.build(counts, max_vocab=4).itos == [UNK, EOS, "x", "y"]
    assert Vocab.build(counts, max_vocab=3).itos == [UNK, EOS, "x"]
    assert Vocab.build(counts, max_vocab=100).itos == [UNK, EOS, "x", "y", "z", "w"]
    assert Vocab.build(counts, min_freq=2, max_vocab=4).itos == [UNK, EOS, "x", "y"]


def test_vocab_specials_in_the_text_are_not_duplicated():
    # PTB writes <unk> in its text: it must map to id 0, not get a second entry.
    v = Vocab.build(Counter([UNK, UNK, UNK, "a", EOS]))
    assert v.itos == [UNK, EOS, "a"]


def test_vocab_rejects_malformed_word_lists():
    with pytest.raises(ValueError):
        Vocab(["a", UNK, EOS])
    with pytest.raises(ValueError):
        Vocab([UNK, EOS, "a", "a"])
    assert Vocab([UNK, EOS, "a"]) == Vocab([UNK, EOS, "a"])
    assert Vocab([UNK, EOS, "a"]) != Vocab([UNK, EOS, "b"])


# ---------------------------------------------------------------------------- corpus
def test_read_corpus_eos_at_each_line_end_and_vocab_from_train_only(tmp_path):
    folder = write(
        tmp_path / "c",
        train="the cat sat\n\n  the   dog\tsat  \nthe end",  # blank line; odd spacing; no final newline
        valid="the bird sat\nbird bird\n",  # 'bird' is frequent in valid but never in train
        test="a cat\n",
    )
    c = read_corpus(folder)
    assert c.vocab.itos == [UNK, EOS, "the", "sat", "cat", "dog", "end"]
    assert "bird" not in c.vocab and "a" not in c.vocab

    def words(ids):
        return c.vocab.decode(ids.tolist())

    assert words(c.train) == ["the", "cat", "sat", EOS, EOS, "the", "dog", "sat", EOS, "the", "end", EOS]
    # Words train lacks are <unk> in valid and test.
    assert words(c.valid) == ["the", UNK, "sat", EOS, UNK, UNK, EOS]
    assert words(c.test) == [UNK, "cat", EOS]
    for split in ("train", "valid", "test"):
        t = c.split(split)
        assert t.dtype in (torch.int32, torch.int64) and t.dim() == 1
        assert batchify(t, 1).dtype == torch.long  # what embeddings and nll_loss take
    with pytest.raises(UserError):
        c.split("dev")


def test_read_corpus_min_freq_and_max_vocab_apply_to_every_split(tmp_path):
    folder = write(tmp_path / "c", train="a a a b b c\n", valid="c b a\n", test="c\n")
    c = read_corpus(folder, min_freq=2)
    assert c.vocab.itos == [UNK, EOS, "a", "b"]
    assert c.vocab.decode(c.train.tolist()) == ["a", "a", "a", "b", "b", UNK, EOS]
    assert c.vocab.decode(c.valid.tolist()) == [UNK, "b", "a", EOS]
    c = read_corpus(folder, max_vocab=3)
    assert c.vocab.itos == [UNK, EOS, "a"]
    assert c.vocab.decode(c.valid.tolist()) == [UNK, UNK, "a", EOS]


def test_read_corpus_vocab_ignores_valid_and_test_counts(tmp_path):
    a = read_corpus(write(tmp_path / "a", train="x y y\n", valid="x x x z\n", test="z z z\n"))
    b = read_corpus(write(tmp_path / "b", train="x y y\n", valid="q\n", test="q\n"))
    assert a.vocab == b.vocab
    assert a.vocab.itos == [UNK, EOS, "y", "x"]


def test_read_corpus_missing_empty_and_non_utf8_files(tmp_path):
    folder = write(tmp_path / "c", train="a b\n")
    (folder / "test.txt").unlink()
    with pytest.raises(UserError, match="test.txt"):
        read_corpus(folder)
    (folder / "test.txt").write_text("")
    with pytest.raises(UserError, match="test.txt.*empty"):
        read_corpus(folder)
    (folder / "test.txt").write_bytes(b"ok\nbad \xff byte\n")
    with pytest.raises(UserError, match=r"test.txt.*line 2"):
        read_corpus(folder)


# ---------------------------------------------------------------------------- batchify
def test_batchify_columns_are_contiguous_and_the_remainder_is_dropped():
    ids = torch.arange(23)
    b = batchify(ids, 4)
    assert b.shape == (5, 4)  # 23 // 4 = 5 rows; the last 3 tokens are dropped
    for j in range(4):
        assert b[:, j].tolist() == list(range(5 * j, 5 * j + 5))
    assert b.is_contiguous()
    assert 20 not in b and 22 not in b
    # An exact fit keeps everything.
    assert batchify(torch.arange(12), 3).t().reshape(-1).tolist() == list(range(12))
    assert batchify(torch.arange(12), 1).shape == (12, 1)


def test_batchify_too_small_is_a_user_error():
    assert batchify(torch.arange(8), 4).shape == (2, 4)
    with pytest.raises(UserError, match="too small"):
        batchify(torch.arange(7), 4)  # one row only: no (input, target) pair
    with pytest.raises(UserError):
        batchify(torch.arange(3), 4)


# ---------------------------------------------------------------------------- windows
@pytest.mark.parametrize("rows,bptt", [(2, 1), (2, 5), (10, 3), (10, 9), (10, 10), (10, 35), (37, 8), (36, 7)])
def test_windows_cover_the_stream_exactly_with_targets_shifted_by_one(rows, bptt):
    source = torch.arange(rows * 3).view(3, rows).t().contiguous()  # (rows, 3) like batchify's output
    n = num_windows(source, bptt)
    # The trainer walks windows w * bptt for w < num_windows; evaluate walks range(0, rows - 1, bptt).
    starts = list(range(0, rows - 1, bptt))
    assert n == len(starts) and n >= 1
    xs, ys = [], []
    for w in range(n):
        x, y = get_window(source, w * bptt, bptt)
        assert x.shape == y.shape and 1 <= x.size(0) <= bptt and x.size(1) == 3
        assert torch.equal(y, source[w * bptt + 1 : w * bptt + 1 + x.size(0)])  # targets = inputs shifted by one
        assert torch.equal(y[:-1], x[1:])
        xs.append(x)
        ys.append(y)
    # Every token is an input once (but the last) and a target once (but the first): nothing lost, no overlap.
    assert torch.equal(torch.cat(xs), source[:-1])
    assert torch.equal(torch.cat(ys), source[1:])


def test_corpus_to_windows_end_to_end(tmp_path):
    folder = write(tmp_path / "c", train="".join(f"w{i % 7} w{i % 5}\n" for i in range(40)))
    c = read_corpus(folder)
    data = batchify(c.train, 4)  # 120 tokens -> (30, 4)
    assert data.shape == (30, 4)
    assert torch.equal(data[:, 1], c.train[30:60])
    _, y = get_window(data, 0, 8)
    assert torch.equal(y[:, 2], c.train[61:69])
