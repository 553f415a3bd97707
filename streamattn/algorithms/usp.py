"""USP (yunchang / xDiT): Ulysses inside groups of u consecutive ranks, Ring across the r groups.

The plan names the Ulysses groups (default: consecutive ranks, rank g*u + j is member j of group g
and member g of ring j). After the Ulysses all-to-all, ring j carries group g's tokens for head
slice j.
"""
from __future__ import annotations

from ..sharding import run_starts
from .ring import ArrivingBlock, ring_core
from .ulysses import gather_heads, lse_to_sequence, own_kv, post_scatter, slice_joint


def usp_attention(transport, problem, q, k, v, joint=None, *, plan, with_lse=False, chunks=None,
                  joint_all=None):
    """q: [B, S_local, H, D], k, v: [B, S_local, Hk, D]; joint: None or (jq, jk, jv) replicated.
    plan: a Plan (its Ulysses groups; rings join member j of every group, in group order).
    Returns (out [B, S_local, H, D], joint_out [B, T, H, D] or None) in q's dtype; with_lse: also
    the final LSEs, [B, H, S_local] and [B, H, T] or None. chunks: token runs per ring step
    (ring.ring_core; default plan.chunks). joint_all: every ring member attends all joint
    queries (ring.ring_core; default plan.joint_all)."""
    chunks = plan.chunks if chunks is None else chunks
    joint_all = plan.joint_all if joint_all is None else joint_all
    groups = plan.ulysses_groups()
    uly_members = plan.ulysses_group(transport.rank)
    ring_members = plan.ring_group(transport.rank)
    j = uly_members.index(transport.rank)
    g = ring_members.index(transport.rank)
    seq = problem.seq_lens
    lens = [seq[m] for m in uly_members]
    seg_lens = [sum(seq[m] for m in grp) for grp in groups]
    # Global start of each group's tokens; meaningful for causal, which requires consecutive groups.
    seg_offsets = [problem.offsets[grp[0]] for grp in groups]
    H, Hk = problem.heads, problem.kv_heads

    pending, assemble = post_scatter(transport, uly_members, j, q, k, v, lens, H, Hk, stack_kv=True)
    jh = slice_joint(joint, H, Hk, len(uly_members), j) if joint is not None else None
    # My own tokens of my heads are at hand before the all-to-all lands: the ring's runs that hold
    # only those (each block is read from member j's tokens on, sharding.run_starts) go on the wire
    # meanwhile.
    first, lead = run_starts(seq, groups, j, problem.causal)
    mine = own_kv(k, v, H, Hk, len(uly_members), j)
    arriving = ArrivingBlock(mine, sum(lens[:j]), lambda: scatter_landed(pending, assemble))
    out, jout, lse, jlse = ring_core(transport, ring_members, g, None, None, None,
                                     arriving=arriving, run_first=first, run_lead=lead,
                                     seg_lens=seg_lens,
                                     seg_offsets=seg_offsets, scale=problem.scale,
                                     causal=problem.causal, joint=jh,
                                     joint_strategy=problem.joint_strategy, with_lse=True,
                                     chunks=chunks, joint_all=joint_all)
    out = out.transpose(1, 2).to(q.dtype)
    if jout is None:
        out = gather_heads(transport, uly_members, j, out, lens, H)
    else:
        out, jout = gather_heads(transport, uly_members, j, out, lens, H,
                                 joint_out=jout.transpose(1, 2).to(q.dtype))
    if not with_lse:
        return out, jout
    return (out, jout) + lse_to_sequence(transport, uly_members, j, lse, jlse, lens, H)


def scatter_landed(pending, assemble):
    """(q, kv) of the Ulysses all-to-all once it has landed (post_scatter with stack_kv)."""
    pending.wait()
    return assemble()
