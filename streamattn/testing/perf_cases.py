"""Rank-pool tasks for the performance paths (issue 12): the collective all-to-all's timeout."""
from __future__ import annotations

import os
import time

import streamattn

from ..sharding import shard, shard_rows, split_lengths
from .cases import make_inputs


def collective_silent_peer(rank, world_size, *, silent_rank, seq=32, heads=4):
    """STREAMATTN_ALLTOALL=collective: every rank makes one Ulysses call (plan and metadata agreed);
    then silent_rank skips the second call and the others must time out in the collective
    all-to-all naming it."""
    q, k, v, _ = make_inputs(seed=4, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    streamattn.attention(ql, kl, vl, algorithm="ulysses")
    if rank == silent_rank:
        time.sleep(float(os.environ.get("STREAMATTN_TIMEOUT_S", "3")) + 2)
        return {"type": None, "error": None, "peer": None}
    try:
        streamattn.attention(ql, kl, vl, algorithm="ulysses")
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "peer": getattr(exc, "peer", None)}
    return {"type": None, "error": None, "peer": None}


def comm_dtype_call(rank, world_size, *, wire_ranks, seq=32, heads=4, dtype="float32", algorithm="ring"):
    """Ranks in `wire_ranks` pass comm_dtype=torch.bfloat16, the others None (exact). Returns the
    error type and text, or the relative error against float64 when the call succeeds."""
    import torch

    from streamattn.reference import reference_attention

    q, k, v, _ = make_inputs(seed=5, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8, dtype=dtype)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    wire = torch.bfloat16 if rank in wire_ranks else None
    try:
        out = streamattn.attention(ql, kl, vl, algorithm=algorithm, comm_dtype=wire)
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc)}
    ref = reference_attention(q, k, v, rows=shard_rows(lens, rank))
    return {"type": None, "err": float((out.double() - ref).abs().max() / ref.abs().max())}
