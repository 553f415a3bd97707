"""Gradient tasks the RankPool runs on every rank: streamattn's backward against float64 autograd
of the whole sequence (the same inputs on every rank from a seed), plus the error paths."""
from __future__ import annotations

import torch

import streamattn
from streamattn.testing.cases import make_inputs, split_lengths


def requires_grad_error(rank, world_size, *, seq=12, heads=4):
    """Calls streamattn.attention with q requiring grad; returns the error text (or None)."""
    lens = split_lengths(seq, world_size)
    q, k, v, _ = make_inputs(seed=0, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    start = sum(lens[:rank])
    q, k, v = (x[:, start : start + lens[rank]].clone() for x in (q, k, v))
    q.requires_grad_()
    try:
        streamattn.attention(q, k, v)
    except NotImplementedError as exc:
        return str(exc)
    return None
