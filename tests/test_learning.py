"""Learning works: small models reach the true perplexity of a known random source.

The corpus is sampled from a first-order Markov chain over 20 symbols, one of which is
the newline. Tokenised with ``<eos>`` at each line end, the token stream *is* the chain,
so its entropy rate (computed exactly from the stationary distribution) gives the best
perplexity any model can reach: exp(H). A model that learns reaches it; a model that
peeks at the future (a broken causal mask) goes below it; one that does not learn stays
near the unigram baseline.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from wordlm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig
from wordlm.data import read_corpus
from wordlm.models import model_config
from wordlm.trainer import Trainer

N_SYMBOLS = 20  # symbol 0 is the newline, the others are words
SUCCESSORS = 6  # each symbol can be followed by this many others (keeps the source predictable)
TOKENS = {"train": 24_000, "valid": 6_000, "test": 6_000}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_chain(seed: int = 0) -> torch.Tensor:
    """A random (N, N) transition matrix, float64: sparse rows with uneven weights, irreducible."""
    rng = random.Random(seed)
    P = torch.zeros(N_SYMBOLS, N_SYMBOLS, dtype=torch.float64)
    for i in range(N_SYMBOLS):
        # (i + 1) % N among the successors makes the chain one cycle through every state: irreducible.
        succ = {(i + 1) % N_SYMBOLS} | set(rng.sample(range(N_SYMBOLS), SUCCESSORS - 1))
        for j in succ:
            P[i, j] = rng.uniform(0.2, 1.0) ** 2
    return P / P.sum(dim=1, keepdim=True)


def stationary(P: torch.Tensor) -> torch.Tensor:
    """pi with pi P = pi, sum(pi) = 1, solved exactly (not by iteration)."""
    n = P.size(0)
    A = torch.cat([(P.T - torch.eye(n, dtype=P.dtype)), torch.ones(1, n, dtype=P.dtype)])
    b = torch.zeros(n + 1, dtype=P.dtype)
    b[-1] = 1.0
    pi = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    return pi


def entropy_rate(P: torch.Tensor) -> float:
    """H = -sum_i pi_i sum_j P_ij log P_ij, in nats per token."""
    pi = stationary(P)
    logP = torch.where(P > 0, P.log(), torch.zeros_like(P))
    return float(-(pi.unsqueeze(1) * P * logP).sum())


def sample_chain(P: torch.Tensor, n: int, rng: random.Random, start: int) -> list[int]:
    cum = [torch.cumsum(row, 0).tolist() for row in P]
    out, s = [], start
    for _ in range(n):
        s = min(bisect.bisect_right(cum[s], rng.random()), N_SYMBOLS - 1)
        out.append(s)
    return out


def symbols_to_text(seq: list[int]) -> str:
    """Symbol 0 -> newline; others -> space-separated words. Ends at the last newline, so that the
    tokenised file is exactly the symbol sequence (each newline is one <eos>)."""
    seq = seq[: len(seq) - seq[::-1].index(0)]
    parts, line = [], []
    for s in seq:
        if s == 0:
            parts.append(" ".join(line) + "\n")
            line = []
        else:
            line.append(f"s{s}")
    return "".join(parts)


def write_markov_corpus(folder: Path, P: torch.Tensor, seed: int = 0) -> dict:
    """Train/valid/test drawn from the chain, each starting from its stationary distribution."""
    rng = random.Random(seed)
    pi = stationary(P).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    seqs = {}
    for split, n in TOKENS.items():
        start = rng.choices(range(N_SYMBOLS), weights=pi)[0]
        seq = sample_chain(P, n, rng, start)
        text = symbols_to_text(seq)
        (folder / f"{split}.txt").write_text(text)
        seqs[split] = seq[: len(seq) - seq[::-1].index(0)]
    return seqs


@pytest.fixture(scope="module")
def markov(tmp_path_factory) -> tuple[Path, torch.Tensor, dict]:
    P = make_chain(seed=0)
    folder = tmp_path_factory.mktemp("markov")
    seqs = write_markov_corpus(folder, P, seed=1)
    return folder, P, seqs


def test_chain_is_a_proper_source(markov):
    """Sanity of the yardstick itself: stationary, and the tokenised stream is the chain."""
    folder, P, seqs = markov
    pi = stationary(P)
    assert torch.allclose(pi @ P, pi, atol=1e-12) and abs(float(pi.sum()) - 1) < 1e-12
    assert float(pi.min()) > 0
    H = entropy_rate(P)
    unigram_H = float(-(pi * pi.log()).sum())
    assert 0.8 < H < unigram_H - 0.5  # predictable from context, far from the unigram

    corpus = read_corpus(folder)
    assert len(corpus.vocab) == N_SYMBOLS + 1  # <unk>, <eos> (= newline) and 19 words
    ids = {0: corpus.vocab.eos, **{s: corpus.vocab.stoi[f"s{s}"] for s in range(1, N_SYMBOLS)}}
    for split in ("train", "valid", "test"):
        assert corpus.split(split).tolist() == [ids[s] for s in seqs[split]]

    # The true chain's own NLL on the valid sample is close to the entropy rate: the sample is big enough
    # for a 10 % tolerance to mean something.
    v = seqs["valid"]
    nll = -sum(math.log(P[a, b]) for a, b in itertools.pairwise(v)) / (len(v) - 1)
    assert abs(nll - H) < 0.03


def unigram_ppl(corpus) -> float:
    """Perplexity on valid of add-one unigram counts from train."""
    counts = Counter(corpus.train.tolist())
    V, N = len(corpus.vocab), corpus.train.numel()
    logp = {i: math.log((counts.get(i, 0) + 1) / (N + V)) for i in range(V)}
    v = corpus.valid.tolist()
    return math.exp(-sum(logp[i] for i in v) / len(v))


def train_on(folder: Path, tmp_path: Path, model: ModelConfig, trainer: TrainerConfig, lr: float):
    cfg = Config(
        model=model,
        data=DataConfig(name="custom", dir=str(folder)),
        optim=OptimConfig(name="adamw", lr=lr, weight_decay=0.01, schedule="cosine", warmup_steps=10,
                          min_lr_ratio=0.05),
        trainer=trainer,
    )
    corpus = read_corpus(folder)
    t0 = time.perf_counter()
    metrics = Trainer(cfg, corpus, tmp_path / "run").fit()
    return corpus, metrics, time.perf_counter() - t0


CASES = {
    "lstm": (
        model_config(name="lstm", emsize=32, nhid=64, nlayers=1, dropout=0.0),
        TrainerConfig(epochs=8, batch_size=16, eval_batch_size=10, bptt=25, clip=1.0, log_interval=1000,
                      device="cpu", sample_words=0, progress=False, seed=3),
        1e-2,
    ),
    "transformer": (
        model_config(name="transformer", emsize=32, nhid=64, nlayers=1, nhead=2, dropout=0.0),
        TrainerConfig(epochs=10, batch_size=32, eval_batch_size=10, bptt=64, clip=1.0, log_interval=1000,
                      device="cpu", sample_words=0, progress=False, seed=3),
        1e-2,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reaches_source_perplexity(markov, tmp_path, name):
    folder, P, _ = markov
    model, trainer, lr = CASES[name]
    corpus, metrics, seconds = train_on(folder, tmp_path, model, trainer, lr)
    true_ppl = math.exp(entropy_rate(P))
    uni = unigram_ppl(corpus)
    ppl = metrics["best_valid_ppl"]
    print(f"{name}: valid ppl {ppl:.3f}, source ppl {true_ppl:.3f}, unigram ppl {uni:.3f}, "
          f"test ppl {metrics['test_ppl']:.3f}, {metrics['steps']} steps, {seconds:.1f} s")
    # Within 10 % of the source, from either side: below it would mean the model sees the future
    # (the valid sample's own NLL under the source is within 3 % of exp(H), see above).
    assert ppl > 0.95 * true_ppl, f"{name} beats the source itself: it sees the tokens it predicts"
    assert abs(ppl / true_ppl - 1) < 0.10, (ppl, true_ppl)
    assert abs(metrics["test_ppl"] / true_ppl - 1) < 0.10, (metrics["test_ppl"], true_ppl)
    # And clearly better than what word frequencies alone give.
    assert ppl < 0.6 * uni, (ppl, uni)
