"""Column batches and truncated-BPTT windows, as in the classic example."""

from __future__ import annotations

import torch

from ..config import UserError


def batchify(ids: torch.Tensor, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N,) ids -> (N // batch_size, batch_size): column j is one contiguous stretch of the text.

    The remainder that does not fill a row is dropped. The result is moved to the device once, as int64
    (corpora hold int32 ids to halve their memory; nll_loss and embeddings want int64).
    """
    n = ids.numel() // batch_size
    if n < 2:
        raise UserError(
            f"corpus too small: {ids.numel()} tokens cannot fill {batch_size} columns of at least 2 tokens; "
            f"use a smaller batch size or more text"
        )
    cols = ids[: n * batch_size].view(batch_size, n).t()  # (T, B), a strided view
    return cols.to(device=device, dtype=torch.long, memory_format=torch.contiguous_format).contiguous()


def num_windows(source: torch.Tensor, bptt: int) -> int:
    return (source.size(0) - 1 + bptt - 1) // bptt


def get_window(source: torch.Tensor, i: int, bptt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``source[i:i+n]`` and targets shifted by one, both (n, B), n = min(bptt, rest)."""
    n = min(bptt, source.size(0) - 1 - i)
    return source[i : i + n], source[i + 1 : i + 1 + n]


def shard(corpus, split: str, width: int, share: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``split`` of ``corpus`` in ``width`` columns, of which this rank holds ``share`` consecutive ones (rank r:
    columns r * share .. (r + 1) * share), on ``device``. A split too small for the columns is one line naming
    the key to lower."""
    try:
        cols = batchify(corpus.split(split), width)
    except UserError as e:
        key = "trainer.batch_size (x trainer.grad_accum)" if split == "train" else "trainer.eval_batch_size"
        raise UserError(f"{split} split: {e} (here {key}={width})") from None
    return cols[:, rank * share : (rank + 1) * share].contiguous().to(device)
