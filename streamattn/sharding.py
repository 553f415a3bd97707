"""How a sequence is split over the ranks in the contiguous layout (the zigzag layout builds on it:
streamattn.zigzag). Rank r holds the r-th slice; slices are as even as possible and the first ranks
take one token more: 4097 tokens on 4 ranks are 1025/1024/1024/1024."""
from __future__ import annotations

import torch


def split_lengths(total: int, world: int) -> list:
    """Tokens per rank (or per chunk): `world` integers summing to `total`, the first
    total % world of them one larger."""
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def shard(x: torch.Tensor, lens, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of the full sequence x (sequence along `dim`) split by `lens` (a view)."""
    return x.narrow(dim, sum(lens[:rank]), lens[rank])
