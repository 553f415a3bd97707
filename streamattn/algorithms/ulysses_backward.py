"""The Ulysses backward: the reverse all-to-alls around one local backward.

q, k, v go sequence -> heads again (as in the forward), and so do dO, O and the LSE (query-like:
member j gets every token of the group for its query heads); each member runs the backward of
the whole sequence for its heads (algorithms.ring_backward.local_backward); dQ goes heads ->
sequence like the forward's output, and dK/dV heads -> sequence, summed where members share a
K/V head (GQA with fewer K/V heads than members). Joint tokens: each member's joint-query
gradients are complete for its heads (all-gathered over the heads); its joint K/V gradients are
summed over the members in member order, so every rank ends with the identical full gradients
(the contract of ring_backward).
"""
from __future__ import annotations

import torch

from .. import tags
from .ring_backward import local_backward
from .ulysses import allgather_heads, gather_heads, head_ranges, scatter_heads, slice_joint

TAG_BWD = tags.ULYSSES_BWD  # +0 q,k,v  +1 dO  +2 O  +3 LSE  +4 dQ  +5 dK  +6 dV  +7 joint


def ulysses_backward(transport, problem, dout, q, k, v, out, lse, joint=None, members=None):
    """Arguments and returns as ring_backward.ring_backward (bshd; lse [B, H, S_local]; joint
    (djout, jq, jk, jv, jout, jlse)), over the Ulysses group `members` (default: every rank)."""
    members = list(range(transport.size)) if members is None else list(members)
    me = members.index(transport.rank)
    lens = [problem.seq_lens[m] for m in members]
    H, Hk, u = problem.heads, problem.kv_heads, len(members)
    g = H // Hk
    q_ranges, kv_ranges = head_ranges(H, Hk, u)
    a, b = q_ranges[me]

    qh, kh, vh = scatter_heads(transport, members, me, q, k, v, lens, H, Hk, tag=TAG_BWD)
    doh = _to_heads(transport, members, me, dout, lens, q_ranges, TAG_BWD + 1)
    oh = _to_heads(transport, members, me, out, lens, q_ranges, TAG_BWD + 2)
    lse_h = _to_heads(transport, members, me, lse.transpose(1, 2).unsqueeze(-1).contiguous(), lens,
                      q_ranges, TAG_BWD + 3).squeeze(-1).transpose(1, 2)
    jh = None
    if joint is not None:
        djout, jq, jk, jv, jout, jlse = joint
        jqh, jkh, jvh = slice_joint((jq, jk, jv), H, Hk, u, me)
        jh = (djout[:, :, a:b], jqh, jkh, jvh, jout[:, :, a:b], jlse[:, a:b])
    dqh, dkf, dvf, jg = local_backward(doh, qh, kh, vh, oh, lse_h, scale=problem.scale,
                                       causal=problem.causal, joint=jh,
                                       joint_strategy=problem.joint_strategy)
    dq = gather_heads(transport, members, me, dqh.contiguous(), lens, H, tag=TAG_BWD + 4)
    dk = _kv_to_sequence(transport, members, me, _unfit(dkf, q_ranges[me], kv_ranges[me], g), lens,
                         kv_ranges, Hk, TAG_BWD + 5)
    dv = _kv_to_sequence(transport, members, me, _unfit(dvf, q_ranges[me], kv_ranges[me], g), lens,
                         kv_ranges, Hk, TAG_BWD + 6)
    if jg is None:
        return dq, dk, dv, None
    djqh, djkf, djvf = jg
    djq = allgather_heads(transport, members, me, djqh.contiguous())
    c, d = kv_ranges[me]
    T = djkf.shape[1]
    flat = torch.zeros(2, q.shape[0], T, Hk, q.shape[-1], dtype=torch.float64 if q.dtype ==
                       torch.float64 else torch.float32, device=q.device)
    flat[0, :, :, c:d] += _unfit(djkf, q_ranges[me], kv_ranges[me], g)
    flat[1, :, :, c:d] += _unfit(djvf, q_ranges[me], kv_ranges[me], g)
    parts = transport.all_gather(flat, members, TAG_BWD + 7)
    total = parts[0].clone()
    for p in parts[1:]:  # member order: identical on every member
        total += p
    return dq, dk, dv, (djq, total[0].to(q.dtype), total[1].to(q.dtype))


def _to_heads(transport, members, me, x, lens, q_ranges, tag):
    """A query-like tensor, sequence -> heads: x [B, S_me, H, ...] -> [B, sum(lens), h_me, ...]."""
    B, rest = x.shape[0], tuple(x.shape[3:])
    a, b = q_ranges[me]
    bufs, sends, recvs = {}, [], []
    for j, (c, d) in enumerate(q_ranges):
        if j == me:
            continue
        bufs[j] = x.new_empty((B, lens[j], b - a) + rest)
        sends.append((members[j], x[:, :, c:d].contiguous()))
        recvs.append((members[j], bufs[j]))
    transport.exchange(sends, recvs, tag).wait()
    bufs[me] = x[:, :, a:b]
    return torch.cat([bufs[j] for j in range(len(members))], 1)


def _unfit(dkf, q_range, kv_range, group_size):
    """Gradient w.r.t. the fitted K/V heads (ulysses.fit_kv_heads) -> w.r.t. the member's own
    K/V heads kv_range: the expanded heads' gradients summed back."""
    hq, hk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
    want = [(q_range[0] + i) // group_size - kv_range[0] for i in range(hq)]
    if hq % hk == 0 and want == [i // (hq // hk) for i in range(hq)]:
        return dkf
    out = dkf.new_zeros(dkf.shape[:2] + (hk,) + dkf.shape[3:])
    return out.index_add_(2, torch.tensor(want, device=dkf.device), dkf)


def _kv_to_sequence(transport, members, me, dkh, lens, kv_ranges, Hk, tag):
    """K/V gradients, heads -> sequence: dkh [B, sum(lens), hk_me, D] (my K/V heads, every token
    of the group) -> [B, lens[me], Hk, D], summed in member order where K/V heads are shared."""
    B, D = dkh.shape[0], dkh.shape[-1]
    starts = [sum(lens[:j]) for j in range(len(members))]
    sends, recvs, bufs = [], [], {}
    for j in range(len(members)):
        if j == me:
            continue
        sends.append((members[j], dkh[:, starts[j] : starts[j] + lens[j]].contiguous()))
        c, d = kv_ranges[j]
        bufs[j] = dkh.new_empty(B, lens[me], d - c, D)
        recvs.append((members[j], bufs[j]))
    transport.exchange(sends, recvs, tag).wait()
    bufs[me] = dkh[:, starts[me] : starts[me] + lens[me]]
    out = torch.zeros(B, lens[me], Hk, D, dtype=dkh.dtype, device=dkh.device)
    for j in range(len(members)):
        c, d = kv_ranges[j]
        out[:, :, c:d] += bufs[j]
    return out
