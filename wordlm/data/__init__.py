"""Vocabulary, corpora, data sets and batching."""

from .batching import batchify, get_window, num_windows, shard
from .corpus import SPLITS, Corpus, read_corpus
from .vocab import EOS, UNK, Vocab

__all__ = ["EOS", "SPLITS", "UNK", "Corpus", "Vocab", "batchify", "get_window", "num_windows", "read_corpus", "shard"]
