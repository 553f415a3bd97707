"""The backward pass as a ring (ring-flash-attention's schedule), the one exact backward of every
forward algorithm.

The gradient of attention depends only on (q, k, v, dout) and the final (out, lse) of each query
row, not on how the forward was scheduled: every rank keeps its query block, dout, out and lse,
and the K/V blocks rotate around the ring once more. Each block's dK/dV accumulator travels with
it one step behind (sent after the step's compute), and after the last step it arrives home at
its owner. Only the block in hand, the incoming one and their two gradient accumulators are ever
alive, so memory grows with the local shard, not with the ring size.

Joint text tokens (replicated on every rank; the forward's joint output is identical everywhere):
the gradient contract is that the incoming joint output gradient `djout` is the full gradient
(identical on every rank, as it is when everything after the attention is replicated), and the
returned djq, djk, djv are the full gradients, identical on every rank. Each rank computes the
pairs it owns (its queries vs the joint keys; the joint queries vs its key block; member 0 the
joint queries vs the joint keys) and the partials are summed over the ring in member order
(sum_over_members: reduce-scatter then all-gather on rings of three or more).
"""
from __future__ import annotations

import torch

from .. import tags
from ..kernels_backward import attention_block_backward
from ..merge import acc_dtype
from ..sharding import shard, split_lengths
from .ring import alternating_buffers

TAG_KV, TAG_DKV = tags.RING_BWD_KV, tags.RING_BWD_DKV
TAG_JOINT, TAG_JOINT_SUM = tags.RING_BWD_JOINT, tags.RING_BWD_JOINT_SUM


def ring_backward(transport, problem, dout, q, k, v, out, lse, joint=None, members=None):
    """dout, q, out: [B, S_local, H, D]; k, v: [B, S_local, Hk, D] (bshd views are fine);
    lse: [B, H, S_local], the forward's final LSE of this rank's query rows.
    joint: None or (djout, jq, jk, jv, jout, jlse), replicated: djout, jq, jout [B, T, H, D],
    jk, jv [B, T, Hk, D], jlse [B, H, T].
    members: the ring in sequence order (default: every rank in rank order; the shards are laid
    out at problem.segments(rank): rank order, or the zigzag layout). Returns (dq, dk, dv, (djq, djk, djv) or None) in q's dtype, bshd."""
    members = list(range(transport.size)) if members is None else list(members)
    me = members.index(transport.rank)
    r = len(members)
    lens = [problem.seq_lens[m] for m in members]
    # (start in the shard, global offset, length) of each member's tokens: one segment, or the
    # two chunks of the zigzag layout
    segs = []
    for m in members:
        start, mine = 0, []
        for off, n in problem.segments(m):
            mine.append((start, off, n))
            start += n
        segs.append(mine)
    scale, causal = problem.scale, problem.causal
    bh = lambda x: x.transpose(1, 2)  # noqa: E731  bshd <-> bhsd views
    qb, dob, ob = bh(q), bh(dout), bh(out)
    B, H, Sq, D = qb.shape
    Hk = k.shape[2]
    adt = acc_dtype(q.dtype)
    dq = torch.zeros(B, H, Sq, D, dtype=adt, device=q.device)

    jd = None
    if joint is not None:
        djout, jq, jk, jv, jout, jlse = joint
        jd = {"q": torch.zeros(B, H, jq.shape[1], D, dtype=adt, device=q.device),
              "k": torch.zeros(B, Hk, jk.shape[1], D, dtype=adt, device=q.device),
              "v": torch.zeros(B, Hk, jk.shape[1], D, dtype=adt, device=q.device)}
        jqb, jkb, jvb, jdo, jo = bh(jq), bh(jk), bh(jv), bh(djout), bh(jout)
        # my queries vs the joint keys (the joint keys are unmasked: causal is refused with joint)
        a, b, c = attention_block_backward(dob, qb, jkb, jvb, ob, lse, scale=scale)
        dq += a
        jd["k"] += b
        jd["v"] += c
        if me == 0:  # the joint queries vs the joint keys, counted once
            a, b, c = attention_block_backward(jdo, jqb, jkb, jvb, jo, jlse, scale=scale)
            jd["q"] += a
            jd["k"] += b
            jd["v"] += c

    # My own block's accumulator starts here (with the joint queries' share of my keys).
    dkv = torch.zeros(2, B, Hk, lens[me], D, dtype=adt, device=q.device)
    if joint is not None:
        a, b, c = attention_block_backward(jdo, jqb, bh(k), bh(v), jo, jlse, scale=scale)
        jd["q"] += a
        dkv[0] += b
        dkv[1] += c

    kv = torch.stack([k, v])  # [2, B, S, Hk, D]: one message per step, as in the forward
    nxt, prv = members[(me + 1) % r], members[(me - 1) % r]
    arriving = alternating_buffers(kv, [(2, B, lens[(me - t - 1) % r], Hk, D) for t in range(r - 1)])
    # the accumulator of block (me - t) % r leaves in step t and that of the block before it arrives
    coming_home = alternating_buffers(dkv, [(2, B, Hk, lens[(me - t - 1) % r], D)
                                            for t in range(r if r > 1 else 0)])
    for t in range(r):
        src = (me - t) % r
        pending = None
        if t < r - 1:
            incoming = arriving[t]
            pending = transport.exchange([(nxt, kv)], [(prv, incoming)], TAG_KV + t)
        kb, vb = bh(kv[0]), bh(kv[1])
        for qs, qo, qn in segs[me]:
            for ks, ko, kn in segs[src]:
                if qn == 0 or kn == 0 or (causal and ko > qo + qn - 1):
                    continue  # every key of the pair lies in the future
                a, b, c = attention_block_backward(
                    dob[:, :, qs : qs + qn], qb[:, :, qs : qs + qn], kb[:, :, ks : ks + kn],
                    vb[:, :, ks : ks + kn], ob[:, :, qs : qs + qn], lse[:, :, qs : qs + qn],
                    scale=scale, causal=causal, q_offset=qo, k_offset=ko)
                dq[:, :, qs : qs + qn] += a
                dkv[0][:, :, ks : ks + kn] += b
                dkv[1][:, :, ks : ks + kn] += c
        # The accumulator of block src moves on to the next rank, which holds block src next step;
        # after the last step that is the block's owner.
        if r > 1:
            dkv_in = coming_home[t]
            transport.exchange([(nxt, dkv)], [(prv, dkv_in)], TAG_DKV + t).wait()
            dkv = dkv_in
        if pending is not None:
            pending.wait()
            kv = incoming
    # dkv now holds my own block's gradient, home after r hops.

    dq, dk, dv = (x.transpose(1, 2).to(q.dtype) for x in (dq, dkv[0], dkv[1]))
    if jd is None:
        return dq, dk, dv, None
    flat = torch.cat([jd["q"].reshape(-1), jd["k"].reshape(-1), jd["v"].reshape(-1)])
    total = sum_over_members(transport, members, me, flat)
    nq, nk = jd["q"].numel(), jd["k"].numel()
    djq = total[:nq].view(jd["q"].shape)
    djk = total[nq : nq + nk].view(jd["k"].shape)
    djv = total[nq + nk :].view(jd["v"].shape)
    return dq, dk, dv, tuple(x.transpose(1, 2).to(q.dtype) for x in (djq, djk, djv))


def sum_over_members(transport, members, me, flat):
    """The sum of every member's `flat` (1-D, same length everywhere), added in member order, so
    it is bit-identical on every member. Two members all-gather their partials (one message
    each); more reduce-scatter then all-gather (chunk j summed by member j): 2(r-1)/r partials
    sent per member instead of r-1 (ring 8: 1.75 instead of 7)."""
    r = len(members)
    if r <= 2:
        parts = transport.all_gather(flat, members, TAG_JOINT)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total
    lens = split_lengths(flat.numel(), r)
    got = [shard(flat, lens, me, 0) if j == me else flat.new_empty(lens[me]) for j in range(r)]
    sends = [(members[j], shard(flat, lens, j, 0)) for j in range(r) if j != me and lens[j]]
    recvs = [(members[j], got[j]) for j in range(r) if j != me and lens[me]]
    transport.exchange(sends, recvs, TAG_JOINT).wait()
    total = flat.new_empty(flat.numel())
    mine = shard(total, lens, me, 0)
    mine.copy_(got[0])
    for g in got[1:]:
        mine += g
    sends = [(members[j], mine) for j in range(r) if j != me and lens[me]]
    recvs = [(members[j], shard(total, lens, j, 0)) for j in range(r) if j != me and lens[j]]
    transport.exchange(sends, recvs, TAG_JOINT_SUM).wait()
    return total


def local_backward(dout, q, k, v, out, lse, *, scale, causal=False, joint=None,
                   joint_strategy="front"):
    """The backward on one rank (no communication): the whole sequence is one block. Arguments
    and returns as ring_backward (bshd; joint as (djout, jq, jk, jv, jout, jlse))."""
    bh = lambda x: x.transpose(1, 2)  # noqa: E731
    T = 0
    if joint is not None:
        djout, jq, jk, jv, jout, jlse = joint
        T = jq.shape[1]

        def cat(a, b, dim=1):
            return torch.cat([b, a] if joint_strategy == "front" else [a, b], dim)

        dout, q, k, v, out = cat(dout, djout), cat(q, jq), cat(k, jk), cat(v, jv), cat(out, jout)
        lse = cat(lse, jlse.to(lse.dtype), dim=2)
    dq, dk, dv = (bh(x).to(q.dtype) for x in attention_block_backward(
        bh(dout), bh(q), bh(k), bh(v), bh(out), lse, scale=scale, causal=causal))
    if joint is None:
        return dq, dk, dv, None
    n = q.shape[1] - T

    def split(x):
        return (x[:, T:], x[:, :T]) if joint_strategy == "front" else (x[:, :n], x[:, n:])

    (dq, djq), (dk, djk), (dv, djv) = split(dq), split(dk), split(dv)
    return dq, dk, dv, (djq, djk, djv)
