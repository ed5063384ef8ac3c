"""Sampling text from a model: temperature, top-k, top-p, prompts.

Models that return a recurrent state carry it token by token (the past is never
re-run). A model that decodes incrementally (``model.incremental``: the transformer) is fed one
token at a time through a key/value cache until it holds ``context`` tokens; then the cache
starts again from the last half of the window (one forward pass of ``context // 2`` tokens), so
each word sees between ``context // 2`` and ``context`` words of history at a cost independent of
the context. Other models that return ``None`` are re-run over a sliding window of the last
``context`` tokens with the same causal mask they trained with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .data.vocab import EOS, Vocab

PROMPT_CHUNK = 256  # a long prompt reaches a stateful model in pieces: (T, 1, V) log-probs stay small


def filter_logits(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(V,) log-probs -> (V,) logits with everything outside top-k / the top-p nucleus at -inf.

    Order as in common practice: temperature, then top-k, then top-p over what is left.
    """
    logp = logp.float()
    # Shift so the best word sits at 0: a tiny temperature then gives 0 and -inf (greedy), never NaN. The
    # division is done in float64, where a temperature like 1e-300 is not 0 (in float32 it would be: 0/0).
    shifted = logp - logp.max()
    # At temperature 1 the float64 round trip is exact, so it is skipped (the same bits, two passes fewer).
    logits = shifted if temperature == 1.0 else (shifted.double() / temperature).float()
    V = logits.numel()
    if top_k and top_k < V:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a word when the mass before it already does.
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


class Sampler:
    """Feeds tokens to a model and gives the next-word log-probs after each feed.

    Stateful models (RNNs) get only the new tokens plus their carried state; stateless ones
    (the transformer) get the last ``context`` tokens, so any length can be generated.
    """

    def __init__(self, model: torch.nn.Module, device, context: int):
        self.model, self.device, self.context = model, torch.device(device), max(1, int(context))
        self.state = None
        self.window: list[int] = []
        self.stateful: bool | None = None
        self.incremental = bool(getattr(model, "incremental", False))
        self.cache = None  # incremental decoding: the model's key/value cache of the window's last tokens

    def _run(self, tokens: Sequence[int], state) -> torch.Tensor:
        x = torch.tensor(list(tokens), dtype=torch.long, device=self.device).unsqueeze(1)  # (T, 1)
        logp, self.state = self.model(x, state)  # (T, 1, V)
        return logp[-1, 0]  # (V,)

    @torch.no_grad()
    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Condition on ``tokens`` (at least one); return the (V,) log-probs of the word that follows."""
        tokens = list(tokens)
        if not tokens:
            raise ValueError("feed() needs at least one token")
        self.model.eval()
        if self.incremental:
            return self._decode(tokens)
        logp = None
        if self.stateful is None:
            # Probe with one token: a model that hands back a state carries it from now on. Probing with
            # one token (not the whole prompt) keeps a long prompt from reaching a transformer unwindowed.
            logp = self._run(tokens[:1], None)
            self.stateful = self.state is not None
            self.window = tokens[:1]
            tokens = tokens[1:]
            if not tokens:
                return logp
        if self.stateful:
            for i in range(0, len(tokens), PROMPT_CHUNK):
                logp = self._run(tokens[i : i + PROMPT_CHUNK], self.state)
            return logp
        self.window = (self.window + tokens)[-self.context :]
        return self._run(self.window, None)


    def _decode(self, tokens: list[int]) -> torch.Tensor:
        self.window = (self.window + tokens)[-self.context :]
        if self.cache is not None and self.cache["len"] + len(tokens) <= self.context:
            new = tokens
        else:  # the first feed, or a full window: start the cache again from the window's end
            keep = len(self.window) if self.cache is None else min(len(self.window),
                                                                   max(len(tokens), self.context // 2, 1))
            new = self.window[-keep:]
            self.cache = self.model.init_cache()
        x = torch.tensor(new, dtype=torch.long, device=self.device).unsqueeze(1)  # (t, 1)
        return self.model.decode(x, self.cache)[-1, 0]

    @property
    def history(self) -> list[int]:
        """The tokens the next word is conditioned on (what the cache or the window holds)."""
        if self.incremental and self.cache is not None:
            return self.window[-self.cache["len"]:]
        return list(self.window)


def draw(logp: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None = None) -> int:
    """One word id from (V,) log-probs after temperature / top-k / top-p.

    Inverse-CDF sampling (one uniform draw, a cumulative sum and a binary search) gives the same
    distribution as torch.multinomial at a fraction of its cost on a large vocabulary.
    """
    probs = torch.softmax(filter_logits(logp, temperature, top_k, top_p), dim=-1)  # (V,)
    cdf = torch.cumsum(probs, dim=0, dtype=torch.float64)  # (V,), flat across words of probability 0
    u = torch.rand(1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[-1]
    # right=True: the first word whose cdf exceeds u, so never a word of probability 0; the minimum with
    # the last word of positive probability guards u rounding up to the total.
    i = torch.minimum(torch.searchsorted(cdf, u, right=True), torch.searchsorted(cdf, cdf[-1:], right=False))
    word, total = torch.cat([i.double(), cdf[-1:]]).tolist()  # one host sync per word
    if not math.isfinite(total) or total <= 0:
        raise ValueError("probability tensor contains NaN or inf: the model's log-probs are not finite")
    return int(word)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: Sequence[int], n_words: int, device, *, start: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, context: int = 35,
             generator: torch.Generator | None = None,
             on_token: Callable[[int], None] | None = None,
             on_logp: Callable[[torch.Tensor], None] | None = None) -> list[int]:
    """Sample ``n_words`` ids after ``prompt`` (or after ``start`` when the prompt is empty).

    ``on_token(id)`` is called after each word; ``on_logp(logp)`` with the (V,) log-probs each word is
    drawn from (before temperature and filtering), which is what the parity tests compare.
    """
    sampler = Sampler(model, device, context)
    logp = sampler.feed(list(prompt) or [start])
    out: list[int] = []
    for i in range(n_words):
        if on_logp:
            on_logp(logp)
        tok = draw(logp, temperature, top_k, top_p, generator)
        out.append(tok)
        if on_token:
            on_token(tok)
        if i + 1 < n_words:  # the last word needs no forward pass after it
            logp = sampler.feed([tok])
    return out


def prompt_words(text: str, eos: str = EOS) -> list[str]:
    """Prompt text -> words, by the corpus rule: whitespace words, ``<eos>`` where a line ends.

    A trailing line break gives a trailing ``<eos>``; no line break means the line goes on.
    """
    lines = text.split("\n")
    words: list[str] = []
    for i, line in enumerate(lines):
        words.extend(line.split())
        if i < len(lines) - 1:
            words.append(eos)
    return words


def encode_prompt(text: str, vocab: Vocab) -> tuple[list[str], list[int], list[str]]:
    """Prompt text -> (words, ids, distinct unknown words in order); unknown words become ``<unk>``."""
    words = prompt_words(text, vocab.itos[vocab.eos])
    ids = vocab.encode(words)
    unk = vocab.itos[vocab.unk]
    unknown = list(dict.fromkeys(w for w, i in zip(words, ids, strict=True) if i == vocab.unk and w != unk))
    return words, ids, unknown


class TextWriter:
    """Streams words as text: a space between words, a new line at each ``<eos>`` (like :func:`join_words`)."""

    def __init__(self, write: Callable[[str], object], eos: str = EOS):
        self.write, self.eos = write, eos
        self.line_open = False  # words written on the current line

    def word(self, w: str) -> None:
        if w == self.eos:
            self.write("\n")
            self.line_open = False
        else:
            self.write((" " if self.line_open else "") + w)
            self.line_open = True

    def end(self) -> None:
        if self.line_open:
            self.write("\n")
            self.line_open = False


def join_words(words: Sequence[str], eos: str = "<eos>") -> str:
    """Words -> text: a new line at each <eos>."""
    lines, cur = [], []
    for w in words:
        if w == eos:
            lines.append(" ".join(cur))
            cur = []
        else:
            cur.append(w)
    text = "\n".join(lines)
    if cur:
        text = (text + "\n" if lines else "") + " ".join(cur)
    elif lines:
        text += "\n"
    return text


def sample_text(model: torch.nn.Module, vocab: Vocab, n_words: int, device, seed: int = 1111,
                context: int = 35, temperature: float = 1.0) -> str:
    """A short sample from a fixed seed, drawn with a private generator (training RNG untouched)."""
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    was = model.training
    try:
        ids = generate(model, [], n_words, device, start=vocab.eos, temperature=temperature, context=context,
                       generator=gen)
    finally:
        model.train(was)
    return join_words(vocab.decode(ids))
