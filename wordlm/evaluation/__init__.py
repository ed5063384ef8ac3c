"""Evaluation, in one place.

- :mod:`.scoring` — static scoring: the token-weighted mean NLL of a split (what validation and the test use);
- :mod:`.cache` — the neural cache (Grave et al. 2017);
- :mod:`.dynamic` — dynamic evaluation (Krause et al. 2018);
- :mod:`.stream` — one stream scored with the cache and/or dynamic evaluation;
- :mod:`.command` — ``python evaluate.py`` / ``wordlm-evaluate``: a checkpoint scored on a split.
"""

from .scoring import eval_context, nll, ppl

__all__ = ["eval_context", "nll", "ppl"]
