"""Reading a three-split corpus folder into id tensors.

Memory: the vocabulary is built by counting words line by line, then each split is encoded
line by line into a growing ``array('i')`` (4 bytes a token), never a Python list of ints
(~36 bytes a token). WikiText-103's 103M training tokens take ~0.4 GB as ids this way.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch

from ..config import UserError
from .vocab import EOS, Vocab

SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    vocab: Vocab
    train: torch.Tensor  # (N,) int32 token ids (batchify turns windows into int64)
    valid: torch.Tensor
    test: torch.Tensor

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise UserError(f"unknown split '{name}': use one of {', '.join(SPLITS)}")
        return getattr(self, name)


def check_folder(folder: Path, hint: str = "") -> dict[str, Path]:
    """The three split files of ``folder``, or a UserError naming the folder and the files expected."""
    files = {s: folder / f"{s}.txt" for s in SPLITS}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"corpus folder {folder} lacks {', '.join(missing)}: it must hold train.txt, valid.txt and test.txt"
            + (f" ({hint})" if hint else "")
        )
    for p in files.values():
        if p.stat().st_size == 0:
            raise UserError(f"corpus file {p} is empty: put text in it (one sentence or paragraph per line)")
    return files


def iter_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file; bad bytes are a UserError giving file, line and byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{path} is not UTF-8: line {lineno}, byte offset {offset + e.start} "
                    f"(byte 0x{raw[e.start]:02x}); convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(raw)


def tokenize(path: Path) -> Iterator[list[str]]:
    """Whitespace words of each line, with <eos> at each line end (the classic example's rule)."""
    for line in iter_lines(path):
        words = line.split()
        words.append(EOS)
        yield words


def count_words(path: Path) -> Counter:
    counts: Counter = Counter()
    for words in tokenize(path):
        counts.update(words)
    return counts


def encode_file(path: Path, vocab: Vocab) -> torch.Tensor:
    """(N,) int32 ids of ``path``; words outside the vocabulary become ``<unk>``."""
    ids = array("i")
    get, unk = vocab.stoi.get, repeat(vocab.unk)
    for words in tokenize(path):
        ids.extend(map(get, words, unk))
    return ids_tensor(ids)


def ids_tensor(ids: array) -> torch.Tensor:
    """An ``array('i')`` as a 1-D int32 tensor sharing its memory (no copy)."""
    if len(ids) == 0:
        return torch.zeros(0, dtype=torch.int32)
    assert ids.itemsize == 4, "array('i') is not 4 bytes on this platform"
    return torch.frombuffer(ids, dtype=torch.int32)


def read_corpus(folder: os.PathLike, min_freq: int = 1, max_vocab: int | None = None) -> Corpus:
    """Tokenise ``folder``/{train,valid,test}.txt; the vocabulary comes from train.txt alone."""
    files = check_folder(Path(folder))
    vocab = Vocab.build(count_words(files["train"]), min_freq, max_vocab)
    return Corpus(vocab, *(encode_file(files[s], vocab) for s in SPLITS))
