"""A synthetic corpus with a Zipfian vocabulary, for benchmarks at sizes the shared data does not reach.

    python -m wordlm.synthetic OUT_DIR --tokens 103000000 --vocab 267735     # WikiText-103-sized
    python -m wordlm.synthetic OUT_DIR --tokens 2000000 --vocab 40000        # a >= 33k-word vocabulary

Writes ``OUT_DIR/{train,valid,test}.txt`` (valid and test: ``--heldout`` tokens each). Words are ``w<rank>``;
each line is a "sentence" of 5-30 words about one of ``--topics`` topics. A word is drawn from the global
Zipf(``--alpha``) distribution over the whole vocabulary with probability 1/2, else from the sentence's topic:
a Zipf distribution over that topic's own 2,000 words (a fixed random choice among the 20,000 most frequent).
So the unigram distribution has Zipf's long tail (what an adaptive softmax is for), and there is context to
learn (the topic), so a language model's perplexity falls well below the unigram one. Deterministic given
``--seed``; written in chunks, so memory stays small whatever ``--tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from .cli import die
from .config import UserError

TOPIC_WORDS = 2000
TOPIC_POOL = 20000


def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    c = np.cumsum(p)
    return c / c[-1]


def write_split(path: Path, n_tokens: int, vocab: int, rng: np.random.Generator, topics: np.ndarray,
                alpha: float, chunk: int = 2_000_000) -> int:
    """Write about ``n_tokens`` tokens (``<eos>`` included: one per line) to ``path``; returns the exact count."""
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    g_cdf, t_cdf = _zipf_cdf(vocab, alpha), _zipf_cdf(topics.shape[1], alpha)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_tokens:
            lengths = rng.integers(5, 31, size=max(1, chunk // 18))
            lengths = lengths[: max(1, np.searchsorted(np.cumsum(lengths + 1), n_tokens - written) + 1)]
            n = int(lengths.sum())
            topic = np.repeat(rng.integers(0, topics.shape[0], size=lengths.size), lengths)
            glob = np.minimum(np.searchsorted(g_cdf, rng.random(n)), vocab - 1)
            local = topics[topic, np.minimum(np.searchsorted(t_cdf, rng.random(n)), topics.shape[1] - 1)]
            ids = np.where(rng.random(n) < 0.5, glob, local)
            toks = words[ids]
            ends = np.cumsum(lengths)
            starts = ends - lengths
            f.write("\n".join(" ".join(toks[s:e]) for s, e in zip(starts, ends, strict=True)) + "\n")
            written += n + lengths.size
    return written


def check(out: Path, tokens: int, vocab: int, heldout: int, topics: int, alpha: float) -> None:
    """One line per impossible setting, before anything is written."""
    if vocab < TOPIC_POOL:
        raise UserError(f"--vocab {vocab}: at least {TOPIC_POOL} words (the topics draw from the top {TOPIC_POOL})")
    for flag, value, least in (("--tokens", tokens, 1000), ("--heldout", heldout, 100), ("--topics", topics, 1)):
        if value < least:
            raise UserError(f"{flag} {value} must be >= {least}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise UserError(f"--alpha {alpha} must be a finite number > 0 (1.0 is Zipf's law)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder to write train.txt, valid.txt and test.txt into")
    existing = [p for p in (out / f"{s}.txt" for s in ("train", "valid", "test")) if p.exists()]
    if existing:
        raise UserError(f"{existing[0]} exists: pick an empty folder (nothing is overwritten)")


def make(out: Path, tokens: int, vocab: int, heldout: int, topics: int, alpha: float, seed: int) -> dict:
    check(out, tokens, vocab, heldout, topics, alpha)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write(out, tokens, vocab, heldout, topics, alpha, seed)
    except OSError as e:
        raise UserError(f"cannot write in {out}: {e.strerror or e}; choose a writable folder") from None


def _write(out: Path, tokens: int, vocab: int, heldout: int, topics: int, alpha: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    table = np.stack([rng.choice(TOPIC_POOL, size=TOPIC_WORDS, replace=False) for _ in range(topics)])
    t0 = time.perf_counter()
    counts = {s: write_split(out / f"{s}.txt", n, vocab, rng, table, alpha)
              for s, n in (("train", tokens), ("valid", heldout), ("test", heldout))}
    return {"folder": str(out), "tokens": counts, "vocab": vocab, "seconds": round(time.perf_counter() - t0, 1)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="training tokens (<eos> included)")
    ap.add_argument("--vocab", type=int, default=40_000)
    ap.add_argument("--heldout", type=int, default=200_000, help="tokens of valid.txt and of test.txt")
    ap.add_argument("--topics", type=int, default=100)
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> None:
    a = parser().parse_args(argv)
    try:
        print(json.dumps(make(a.out.expanduser(), a.tokens, a.vocab, a.heldout, a.topics, a.alpha, a.seed)))
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
