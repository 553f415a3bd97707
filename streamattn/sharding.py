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


def group_lengths(seq_lens, groups) -> list:
    """Tokens each Ulysses group holds (the ring's blocks): the sum of its members' shard lengths."""
    return [sum(seq_lens[m] for m in g) for g in groups]


def ring_runs(seg_lens, chunks: int) -> int:
    """Token runs each ring step's block is cut into when `chunks` are asked for: at most the
    shortest block's length (no empty runs), 1 = unchunked. Same on every rank (seg_lens are)."""
    return max(1, min(chunks, min(seg_lens))) if seg_lens else 1


def shard(x: torch.Tensor, lens, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of the full sequence x (sequence along `dim`) split by `lens` (a view)."""
    start, stop = shard_rows(lens, rank)
    return x.narrow(dim, start, stop - start)


def shard_rows(lens, rank: int) -> tuple:
    """(start, stop): the sequence rows rank `rank` holds when the sequence is split by `lens`."""
    start = sum(lens[:rank])
    return start, start + lens[rank]


# Joint (text) tokens folded into the sequence (streamattn.algorithms.joint_fold): which rows each
# rank takes, and the joint-free problem that results.
def can_fold(problem) -> bool:
    """The joint tokens can be folded into the sequence: there are some, and the attention is
    neither causal nor in the zigzag layout (both order the keys)."""
    return problem.joint_len > 0 and not problem.causal and not problem.zigzag


def fold_lengths(problem) -> list:
    """Text rows rank r takes: T split as evenly as possible, the extra rows on the last ranks (the
    contiguous image split gives its extra tokens to the first ones)."""
    return split_lengths(problem.joint_len, problem.world_size)[::-1]


def folded_problem(problem):
    """The joint-free problem the folded schedule runs: rank r holds seq_lens[r] + fold_lengths[r]
    tokens."""
    import dataclasses

    return dataclasses.replace(problem, joint_len=0, seq_lens=tuple(
        s + t for s, t in zip(problem.seq_lens, fold_lengths(problem))))
