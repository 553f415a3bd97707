"""The zigzag (load-balanced causal) sequence layout, as in yunchang, torch context parallel and
TransformerEngine.

With causal attention and the contiguous layout, rank P-1's queries see every key and rank 0's
only its own: the last rank does P times the work of the first. Zigzag cuts the sequence into 2P
chunks (as even as possible; chunk c has split_lengths(S, 2P)[c] tokens) and gives rank r chunks
r and 2P-1-r, so every rank holds one early and one late chunk and the work is balanced.

    shard = zigzag_shard(x, rank, world_size, dim=1)   # x: the full sequence on every rank
    full = zigzag_unshard([shard_0, ..., shard_{P-1}], dim=1)
    out = streamattn.attention(q_shard, k_shard, v_shard, group, causal=True, seq_layout="zigzag")
"""
from __future__ import annotations

import torch

from .sharding import split_lengths


def zigzag_segments(total: int, world_size: int, rank: int) -> list:
    """[(global offset, length), (global offset, length)]: rank's two chunks, in the order its
    shard holds them (chunk rank, then chunk 2P-1-rank)."""
    chunks = split_lengths(total, 2 * world_size)
    starts = [sum(chunks[:c]) for c in range(2 * world_size)]
    a, b = rank, 2 * world_size - 1 - rank
    return [(starts[a], chunks[a]), (starts[b], chunks[b])]


def zigzag_lengths(total: int, world_size: int) -> list:
    """Tokens each rank holds in the zigzag layout of `total` tokens."""
    return [sum(n for _, n in zigzag_segments(total, world_size, r)) for r in range(world_size)]


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag shard of the full sequence x (sequence along `dim`), contiguous."""
    total = x.shape[dim]
    return torch.cat([x.narrow(dim, off, n) for off, n in zigzag_segments(total, world_size, rank)],
                     dim).contiguous()


def zigzag_unshard(shards, dim: int = 1) -> torch.Tensor:
    """The full sequence in natural order from every rank's zigzag shard (in rank order)."""
    P = len(shards)
    total = sum(s.shape[dim] for s in shards)
    pieces = {}
    for r, s in enumerate(shards):
        segs = zigzag_segments(total, P, r)
        if s.shape[dim] != segs[0][1] + segs[1][1]:
            raise ValueError(f"zigzag_unshard: rank {r}'s shard has {s.shape[dim]} tokens, the "
                             f"zigzag layout of {total} tokens on {P} ranks gives it "
                             f"{segs[0][1] + segs[1][1]}")
        pieces[segs[0][0]] = s.narrow(dim, 0, segs[0][1])
        pieces[segs[1][0]] = s.narrow(dim, segs[0][1], segs[1][1])
    return torch.cat([pieces[o] for o in sorted(pieces)], dim)
