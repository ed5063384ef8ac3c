"""Word <-> id mapping, built from the training split only."""

from __future__ import annotations

from collections import Counter
from typing import Iterable, List, Optional, Sequence

UNK = "<unk>"
EOS = "<eos>"


class Vocab:
    """Ids 0 and 1 are ``<unk>`` and ``<eos>``; the rest follow by frequency (ties: first seen)."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[:2] != [UNK, EOS]:
            raise ValueError(f"a vocabulary starts with {UNK}, {EOS}; got {words[:2]}")
        self.itos: List[str] = words
        self.stoi = {w: i for i, w in enumerate(words)}
        if len(self.stoi) != len(words):
            raise ValueError("duplicate words in vocabulary")
        self.unk = 0
        self.eos = 1

    @classmethod
    def build(cls, counts: Counter, min_freq: int = 1, max_vocab: Optional[int] = None) -> "Vocab":
        # Counter preserves first-insertion order, and sorted() is stable: ties keep first-seen order.
        ranked = sorted((w for w, c in counts.items() if c >= min_freq and w not in (UNK, EOS)),
                        key=lambda w: -counts[w])
        words = [UNK, EOS] + ranked
        if max_vocab is not None:
            words = words[:max_vocab]
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, words: Iterable[str]) -> List[int]:
        get, unk = self.stoi.get, self.unk
        return [get(w, unk) for w in words]

    def decode(self, ids: Iterable[int]) -> List[str]:
        return [self.itos[i] for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos
