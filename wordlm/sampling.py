"""Sampling text from a model: temperature, top-k, top-p, prompts.

Models that return a recurrent state carry it token by token (the past is never
re-run); models that return ``None`` (the transformer) are re-run over a sliding
window of the last ``context`` tokens with the same causal mask they trained with.
Neither path asks what kind of model it holds.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .data.vocab import Vocab


def filter_logits(logp: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(V,) log-probs -> (V,) logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logp.float() / temperature
    if top_k and top_k < logits.numel():
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
    """Feeds tokens to a model one at a time and gives the next-word log-probs after each."""

    def __init__(self, model: torch.nn.Module, device: torch.device, context: int):
        self.model, self.device, self.context = model, torch.device(device), max(1, context)
        self.state = None
        self.window: List[int] = []
        self.stateful: Optional[bool] = None

    def _run(self, tokens: Sequence[int], state) -> torch.Tensor:
        x = torch.tensor(list(tokens), dtype=torch.long, device=self.device).unsqueeze(1)  # (T, 1)
        logp, self.state = self.model(x, state)  # (T, 1, V)
        return logp[-1, 0]

    @torch.no_grad()
    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Condition on ``tokens``; return the (V,) log-probs of the word that follows them."""
        tokens = list(tokens)
        self.model.eval()
        if self.stateful is None:  # first call: learn whether the model carries a state
            logp = self._run(tokens, None)
            self.stateful = self.state is not None
            self.window = tokens[-self.context :]
            if self.stateful or len(tokens) <= self.context:
                return logp
            return self._run(self.window, None)
        if self.stateful:
            return self._run(tokens, self.state)
        self.window = (self.window + tokens)[-self.context :]
        return self._run(self.window, None)


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: Sequence[int], n_words: int, device, *, start: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, context: int = 35,
             generator: Optional[torch.Generator] = None,
             on_token: Optional[Callable[[int], None]] = None) -> List[int]:
    """Sample ``n_words`` ids after ``prompt`` (or after ``start`` when the prompt is empty)."""
    sampler = Sampler(model, device, context)
    logp = sampler.feed(list(prompt) or [start])
    out: List[int] = []
    for _ in range(n_words):
        logits = filter_logits(logp, temperature, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        tok = int(torch.multinomial(probs, 1, generator=generator).item())
        out.append(tok)
        if on_token:
            on_token(tok)
        logp = sampler.feed([tok])
    return out


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
    gen = torch.Generator(device=torch.device(device).type).manual_seed(seed)
    was = model.training
    try:
        ids = generate(model, [], n_words, device, start=vocab.eos, temperature=temperature, context=context,
                       generator=gen)
    finally:
        model.train(was)
    return join_words(vocab.decode(ids))
