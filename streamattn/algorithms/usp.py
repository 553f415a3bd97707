"""USP (yunchang / xDiT): Ulysses inside groups of u consecutive ranks, Ring across the r groups.

Rank g*u + j is member j of Ulysses group g and member g of ring j. After the Ulysses all-to-all,
ring j carries group g's tokens (contiguous global positions) for head slice j.
"""
from __future__ import annotations

from .ring import ring_core
from .ulysses import allgather_heads, gather_heads, scatter_heads, slice_joint


def usp_attention(transport, problem, q, k, v, joint=None, *, ulysses_degree: int):
    """q: [B, S_local, H, D], k, v: [B, S_local, Hk, D]; joint: None or (jq, jk, jv) replicated.
    Returns (out [B, S_local, H, D], joint_out [B, T, H, D] or None) in q's dtype."""
    u = ulysses_degree
    r = transport.size // u
    g, j = divmod(transport.rank, u)
    uly_members = [g * u + i for i in range(u)]
    ring_members = [i * u + j for i in range(r)]
    seq = problem.seq_lens
    lens = [seq[m] for m in uly_members]
    seg_lens = [sum(seq[i * u : (i + 1) * u]) for i in range(r)]
    seg_offsets = [problem.offsets[i * u] for i in range(r)]
    H, Hk = problem.heads, problem.kv_heads

    qh, kh, vh = scatter_heads(transport, uly_members, j, q, k, v, lens, H, Hk)
    jh = slice_joint(joint, H, Hk, u, j) if joint is not None else None
    out, jout = ring_core(transport, ring_members, g, qh, kh, vh, seg_lens=seg_lens,
                          seg_offsets=seg_offsets, scale=problem.scale, causal=problem.causal,
                          joint=jh, joint_strategy=problem.joint_strategy)
    out = gather_heads(transport, uly_members, j, out.transpose(1, 2).to(q.dtype), lens, H)
    if jout is not None:
        jout = allgather_heads(transport, uly_members, j, jout.transpose(1, 2).to(q.dtype))
    return out, jout
