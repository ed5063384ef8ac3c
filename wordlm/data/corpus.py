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


def check_folder(folder: Path, hint: str = "", splits=SPLITS) -> dict[str, Path]:
    """The split files of ``folder`` (all three unless ``splits`` says which are needed), or a UserError naming the
    folder and the files expected."""
    if not folder.is_dir():
        raise UserError(f"corpus folder {folder} does not exist" + (f" ({hint})" if hint else "; check data.dir"))
    files = {s: folder / f"{s}.txt" for s in splits}
    for p in files.values():
        if p.is_dir():
            raise UserError(f"{p} is a folder, not a text file: the corpus folder {folder} must hold train.txt, "
                            f"valid.txt and test.txt as files" + (f" ({hint})" if hint else ""))
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(
            f"corpus folder {folder} lacks {', '.join(missing)}: it must hold "
            f"{', '.join(s + '.txt' for s in splits)}"
            + (f" ({hint})" if hint else "")
        )
    for p in files.values():
        if p.stat().st_size == 0:
            raise UserError(f"corpus file {p} is empty: put text in it (one sentence or paragraph per line)")
    return files


def iter_lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file; bad bytes are a UserError giving file, line and byte offset."""
    offset = 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; make it readable (e.g. chmod a+r) or point "
                        f"data.dir elsewhere") from None
    with f:
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


def literal_count(path: Path, word: str) -> int:
    """How often ``word`` itself occurs in ``path`` (e.g. WikiText's own ``<unk>`` tokens, which are not OOV)."""
    return sum(words.count(word) for words in tokenize(path))


MIN_WORDS = 10  # a vocabulary with fewer real words (besides <unk> and <eos>) is not worth training on
MAX_UNK = 0.5  # nor a training split whose tokens are mostly <unk>


def check_trainable(corpus: Corpus, min_freq: int = 1, max_vocab: int | None = None) -> None:
    """Refuse a vocabulary or training split that would train to a meaningless "best" perplexity."""
    real = len(corpus.vocab) - 2
    if max_vocab is not None and real < MIN_WORDS:
        cause = f"data.max_vocab={max_vocab} keeps {real} real word{'s' if real != 1 else ''}: raise it"
    elif min_freq > 1 and real < MIN_WORDS:
        cause = f"data.min_freq={min_freq} leaves {real} real word{'s' if real != 1 else ''}: lower it"
    elif real < MIN_WORDS:
        cause = f"train.txt has {real} distinct word{'s' if real != 1 else ''}: give it real text"
    else:
        n = corpus.train.numel()
        unk = int((corpus.train == corpus.vocab.unk).sum()) if n else 0
        rate = unk / n if n else 0.0
        if rate <= MAX_UNK:
            return
        knob = ("data.max_vocab" if max_vocab is not None else "data.min_freq" if min_freq > 1 else None)
        cause = (f"{rate:.0%} of the training tokens are <unk>"
                 + (f": raise {knob}" if knob == "data.max_vocab" else f": lower {knob}" if knob else
                    ": the text is mostly <unk> itself"))
    raise UserError(f"the vocabulary is too poor to train on ({cause}); at least {MIN_WORDS} real words and at "
                    f"most {MAX_UNK:.0%} <unk> are needed")


def read_corpus(folder: os.PathLike, min_freq: int = 1, max_vocab: int | None = None) -> Corpus:
    """Tokenise ``folder``/{train,valid,test}.txt; the vocabulary comes from train.txt alone."""
    files = check_folder(Path(folder))
    vocab = Vocab.build(count_words(files["train"]), min_freq, max_vocab)
    return Corpus(vocab, *(encode_file(files[s], vocab) for s in SPLITS))
