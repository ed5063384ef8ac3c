"""``tune=true``: a grid search on valid whose grid widens where its best value lies on an edge.

The grid is tried whole first. Then, for each setting whose best value is the grid's first or last, the search
steps past that edge (:data:`STEPS`: a value further out, the other settings at their best) for as long as that
improves the score, at most ``rounds`` steps each way. So a grid is where the search starts, not a bound on what
it can find: the cache's lambda 0.2, the old grid's edge, is no longer the largest value it can return.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..config import UserError

Point = Dict[str, float]


# Each setting's step past the grid's upper and lower edge (None: no further value).
STEPS: Dict[str, Tuple[Callable[[float], Optional[float]], Callable[[float], Optional[float]]]] = {
    "window": (lambda v: int(v) * 2, lambda v: int(v) // 2 if int(v) >= 2 else None),
    "theta": (lambda v: v * 1.5, lambda v: v / 1.5),
    "lam": (lambda v: (v + 1) / 2 if v * 1.5 >= 1 else v * 1.5, lambda v: v / 2),  # stays in (0, 1)
    "lr": (lambda v: v * 1.5, lambda v: v / 1.5),
    "decay": (lambda v: v * 1.5, lambda v: v / 1.5),
}


def search(grid: Dict[str, Sequence[float]], loss: Callable[[Point], float], rounds: int = 4,
           limits: Optional[Dict[str, float]] = None) -> Tuple[Point, float, List[Point]]:
    """The point of lowest ``loss`` over ``grid`` (its product), widened past its edges; returns the best point, its
    loss and every point tried (with its loss under ``"loss"``). ``limits``: an upper bound per setting (e.g. the
    cache's window, by the tokens it could hold). A point whose loss is not finite, or whose scoring diverges (a
    UserError, e.g. dynamic evaluation blowing up), counts as infinitely bad and the search goes on."""
    keys = list(grid)
    tried: List[Point] = []

    def score(point: Point) -> float:
        try:
            value = float(loss(point))
        except UserError:
            value = math.inf
        value = value if math.isfinite(value) else math.inf
        tried.append({**point, "loss": value})
        return value

    best, best_loss = None, math.inf
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        value = score(point)
        if best is None or value < best_loss:
            best, best_loss = point, value
    assert best is not None
    if not math.isfinite(best_loss):
        raise UserError("tune=true: every setting of the grid diverged or scored a non-finite loss; check the "
                        "checkpoint with a plain evaluation first")
    for k in keys:
        edges = sorted(grid[k])
        for direction, edge in ((0, edges[-1]), (1, edges[0])):
            if len(edges) < 2 or best[k] != edge:
                continue
            for _ in range(rounds):
                nxt = STEPS[k][direction](best[k])
                nxt = nxt if nxt is None or k == "window" else float(f"{nxt:.6g}")  # 0.3, not 0.30000000000000004
                if nxt is None or (limits and k in limits and nxt > limits[k]) or nxt == best[k]:
                    break
                point = {**best, k: nxt}
                value = score(point)
                if not value < best_loss:
                    break
                best, best_loss = point, value
    return best, best_loss, tried
