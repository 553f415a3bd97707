"""Ring attention over the zigzag layout (streamattn.zigzag): load-balanced causal attention.

Rank r holds chunks r and 2P-1-r of the sequence. K/V rotate around the ring of every rank (rank
order) as in ring.py; each step attends the (query chunk, key chunk) pairs that are not entirely
in the future, with global-position causal masks, merging partials by the LSE. Every rank does
about the same work at every step. No joint tokens (causal attention refuses them).
"""
from __future__ import annotations

import torch

from .. import tags
from ..kernels import attention_with_lse
from ..merge import empty_accumulator, update_out_and_lse

TAG_STEP = tags.ZIGZAG_STEP


def local_segments(problem, rank) -> list:
    """[(start in the shard, global offset, length)] of rank's tokens."""
    out, start = [], 0
    for off, n in problem.segments(rank):
        out.append((start, off, n))
        start += n
    return out


def zigzag_ring_attention(transport, problem, q, k, v, joint=None, with_lse=False):
    """q: [B, S_local, H, D], k, v: [B, S_local, Hk, D] (this rank's zigzag shard, bshd).
    Returns (out [B, S_local, H, D] in q's dtype, None) and with_lse also (lse [B, H, S_local],
    None)."""
    if joint is not None:
        raise ValueError("streamattn: the zigzag layout is for causal attention, without joint tokens")
    P, me = transport.size, transport.rank
    B, Sq, H, D = q.shape
    Hk = k.shape[2]
    causal = problem.causal
    qb = q.transpose(1, 2)
    out, lse = empty_accumulator(B, H, Sq, D, q.dtype, q.device)
    mine = local_segments(problem, me)
    kv = torch.stack([k, v])
    nxt, prv = (me + 1) % P, (me - 1) % P
    for t in range(P):
        src = (me - t) % P
        pending = None
        if t < P - 1:
            incoming = torch.empty(2, B, problem.seq_lens[(me - t - 1) % P], Hk, D, dtype=kv.dtype,
                                   device=kv.device)
            pending = transport.exchange([(nxt, kv)], [(prv, incoming)], TAG_STEP + t)
        kb, vb = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
        for qs, qo, qn in mine:
            for ks, ko, kn in local_segments(problem, src):
                if qn == 0 or kn == 0 or (causal and ko > qo + qn - 1):
                    continue
                o, l = attention_with_lse(qb[:, :, qs : qs + qn], kb[:, :, ks : ks + kn],
                                          vb[:, :, ks : ks + kn], scale=problem.scale,
                                          causal=causal, q_offset=qo, k_offset=ko)
                update_out_and_lse(out[:, :, qs : qs + qn], lse[:, :, qs : qs + qn], o, l)
        if pending is not None:
            pending.wait()
            kv = incoming
    res = out.transpose(1, 2).to(q.dtype)
    return (res, None, lse, None) if with_lse else (res, None)
