"""Ulysses (DeepSpeed-Ulysses): all-to-all from sequence shards to head shards and back.

Each of the u members of a Ulysses group holds [B, S_j, H, D] for its own S_j tokens (S_j may differ).
After `scatter_heads` member j holds [B, sum_j S_j, H/u, D]: every token of the group, its own H/u
query heads, and the K/V heads those query heads use. With GQA/MQA and fewer K/V heads than members,
each member receives only the K/V heads its query heads need (the fewest replicas possible).
"""
from __future__ import annotations

import torch

from .. import tags
from .. import trace
from ..sharding import shard_rows
from ..transport.base import AllPending, Parts
from .local import attend

TAG_SCATTER, TAG_GATHER, TAG_JOINT = tags.ULYSSES, tags.ULYSSES + 1, tags.ULYSSES_JOINT
TAG_Q = tags.Q_OFFSET  # offset of the separate Q message of the Triton packing path
TAG_LSE = tags.ULYSSES_LSE  # the LSEs the backward needs (with_lse)


def head_ranges(heads: int, kv_heads: int, u: int):
    """(q_ranges, kv_ranges): member j owns query heads q_ranges[j] = (lo, hi) and needs K/V heads
    kv_ranges[j]. Query head h uses K/V head h // (heads // kv_heads)."""
    hq, g = heads // u, heads // kv_heads
    q_ranges = [(j * hq, (j + 1) * hq) for j in range(u)]
    kv_ranges = [(lo // g, (hi - 1) // g + 1) for lo, hi in q_ranges]
    return q_ranges, kv_ranges


def fit_kv_heads(k, q_range, kv_range, group_size, dim=2):
    """Make k's heads (along `dim`) follow the standard GQA map for the local query heads:
    local query head i must use local K/V head i // (hq // hk). When the member's query heads
    straddle K/V groups unevenly, expand K/V to one head per query head."""
    hq, hk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
    want = [(q_range[0] + i) // group_size - kv_range[0] for i in range(hq)]
    if hq % hk == 0 and want == [i // (hq // hk) for i in range(hq)]:
        return k
    return k.index_select(dim, torch.tensor(want, device=k.device))


def scatter_heads(transport, members, me, q, k, v, lens, heads, kv_heads, tag=TAG_SCATTER,
                  stack_kv=False):
    """Sequence shards -> head shards within one Ulysses group.

    members: group ranks of the Ulysses group in order; me: my index in it; lens[j]: tokens of member
    j. q: [B, S_me, H, D], k, v: [B, S_me, Hk, D]. Returns q, k, v: [B, sum(lens), h, D] with my
    query heads and the K/V heads they use (already fitted to the standard GQA map); stack_kv:
    (q, kv) with kv [2, B, sum(lens), h_kv, D], K and V joined into one buffer as they arrive (the
    ring's step message, so it needs no stacking copy).
    """
    pending, assemble = post_scatter(transport, members, me, q, k, v, lens, heads, kv_heads, tag,
                                     stack_kv)
    pending.wait()
    return assemble()


def post_scatter(transport, members, me, q, k, v, lens, heads, kv_heads, tag=TAG_SCATTER,
                 stack_kv=False, joint=None, joint_strategy="front"):
    """scatter_heads without the wait: returns (pending, assemble) — call assemble() after
    pending.wait() to get (q, k, v), or (q, kv) with stack_kv.

    joint: None, or (jq [B, T, H, D], jk, jv [B, T, Hk, D]), the replicated joint tokens: then
    my heads of them are already in place in front of (joint_strategy "front") or behind the
    group's tokens, so q, k, v hold T + sum(lens) rows (local.attend's joint_len)."""
    if _packing(q) is None and not _collective(transport, members):
        return _scatter_parts(transport, members, me, q, k, v, lens, heads, kv_heads, tag, stack_kv,
                              joint, joint_strategy)
    pending, assemble = _scatter_packed(transport, members, me, q, k, v, lens, heads, kv_heads, tag,
                                        stack_kv)
    if joint is None:
        return pending, assemble
    if stack_kv:
        raise ValueError("post_scatter: joint tokens with stack_kv need the point-to-point path")
    jh = slice_joint(joint, heads, kv_heads, len(members), me)
    front = joint_strategy == "front"
    return pending, lambda: tuple(torch.cat([j, x] if front else [x, j], 1)
                                  for x, j in zip(assemble(), jh))


def _scatter_packed(transport, members, me, q, k, v, lens, heads, kv_heads, tag, stack_kv):
    """post_scatter through packed buffers: the Triton packing kernels, or one all_to_all_single."""
    u = len(members)
    tk = _packing(q)
    B, _, _, D = q.shape
    q_ranges, kv_ranges = head_ranges(heads, kv_heads, u)
    hq = q_ranges[me][1] - q_ranges[me][0]
    hk = kv_ranges[me][1] - kv_ranges[me][0]

    # Default: one message per peer, [q | k | v] of its heads. With the Triton kernels Q travels on
    # its own: pack_heads lays out every peer's chunk contiguously and the chunks land in one buffer
    # that unpack_seq turns into [B, S, hq, D] without a torch.cat. Same bytes either way.
    q_in = tk is not None
    q_len = 0 if q_in else hq
    if not q_in and _collective(transport, members):  # one all_to_all_single, packed in one copy
        return _scatter_collective(transport, q, k, v, q_ranges, kv_ranges, lens, me, hk, tag,
                                   heads, kv_heads, stack_kv)
    with trace.span("pack"):
        _, out_bufs = pack_scatter(q, k, v, q_ranges, kv_ranges, with_q=not q_in)
        # One receive allocation, chunk j = member j's [q | k | v] for my heads (mine is already
        # in out_bufs).
        sizes = [0 if j == me else B * n * (q_len + 2 * hk) * D for j, n in enumerate(lens)]
        bufs = list(torch.empty(sum(sizes), dtype=q.dtype, device=q.device).split(sizes))
        bufs[me] = out_bufs[me]
    sends = [(members[j], out_bufs[j]) for j in range(u) if j != me]
    recvs = [(members[j], bufs[j]) for j in range(u) if j != me]
    pendings = [transport.exchange(sends, recvs, tag)]
    if q_in:
        packed = tk.pack_heads(q, u)  # [u, B, S_me, hq, D]
        start = [B * hq * D * sum(lens[:j]) for j in range(u + 1)]
        q_buf = torch.empty(start[u], dtype=q.dtype, device=q.device)
        q_buf[start[me] : start[me + 1]].copy_(packed[me].reshape(-1))
        pendings.append(transport.exchange(
            [(members[j], packed[j]) for j in range(u) if j != me],
            [(members[j], q_buf[start[j] : start[j + 1]]) for j in range(u) if j != me], tag + TAG_Q))

    def assemble():
        with trace.span("pack"):
            return _assemble()

    def _assemble():
        qs, ks, vs = [], [], []
        for j in range(u):
            n_q, n_kv = B * lens[j] * q_len * D, B * lens[j] * hk * D
            buf = bufs[j]
            qs.append(buf[:n_q].view(B, lens[j], q_len, D))
            ks.append(buf[n_q : n_q + n_kv].view(B, lens[j], hk, D))
            vs.append(buf[n_q + n_kv :].view(B, lens[j], hk, D))
        qo = tk.unpack_seq(q_buf, lens, B, hq, D) if q_in else torch.cat(qs, 1)
        return (qo,) + _join_kv(ks, vs, q_ranges[me], kv_ranges[me], heads // kv_heads, stack_kv)

    return AllPending(pendings), assemble


def _scatter_parts(transport, members, me, q, k, v, lens, heads, kv_heads, tag, stack_kv, joint,
                   joint_strategy):
    """post_scatter over point-to-point messages whose parts are the head slices of q, k, v
    (sent) and member j's rows of the final q, k, v (received): the transport copies between
    them and its buffers, so nothing is packed, concatenated or joined afterwards. The wire
    carries [q | k | v] of the receiver's heads for the sender's tokens, each [B, S, h, D]."""
    u = len(members)
    B, _, _, D = q.shape
    q_ranges, kv_ranges = head_ranges(heads, kv_heads, u)
    (a, b), (c, d) = q_ranges[me], kv_ranges[me]
    T = 0 if joint is None else joint[0].shape[1]
    S = sum(lens)
    first = T if joint_strategy == "front" else 0  # the row of the group's first token

    def rows(j):  # member j's tokens in the final buffers
        start, stop = shard_rows(lens, j)
        return slice(first + start, first + stop)

    with trace.span("pack"):
        qo = q.new_empty(B, S + T, b - a, D)
        if stack_kv:
            kv = k.new_empty(2, B, S + T, d - c, D)
            ko, vo = kv[0], kv[1]
        else:
            ko, vo = k.new_empty(B, S + T, d - c, D), v.new_empty(B, S + T, d - c, D)
        if T:
            jq, jk, jv = joint
            jrows = slice(0, T) if joint_strategy == "front" else slice(S, S + T)
            qo[:, jrows].copy_(jq[:, :, a:b])
            ko[:, jrows].copy_(jk[:, :, c:d])
            vo[:, jrows].copy_(jv[:, :, c:d])
        mine = rows(me)
        qo[:, mine].copy_(q[:, :, a:b])
        ko[:, mine].copy_(k[:, :, c:d])
        vo[:, mine].copy_(v[:, :, c:d])
    sends, recvs = [], []
    for j in range(u):
        if j == me:
            continue
        (qa, qb), (kc, kd) = q_ranges[j], kv_ranges[j]
        sends.append((members[j], Parts([q[:, :, qa:qb], k[:, :, kc:kd], v[:, :, kc:kd]])))
        theirs = rows(j)
        recvs.append((members[j], Parts([qo[:, theirs], ko[:, theirs], vo[:, theirs]])))
    pending = transport.exchange_parts(sends, recvs, tag)
    g = heads // kv_heads

    def assemble():
        if stack_kv:
            return qo, fit_kv_heads(kv, q_ranges[me], kv_ranges[me], g, dim=3)
        return (qo, fit_kv_heads(ko, q_ranges[me], kv_ranges[me], g),
                fit_kv_heads(vo, q_ranges[me], kv_ranges[me], g))

    return pending, assemble


def _join_kv(ks, vs, q_range, kv_range, group_size, stack_kv):
    """The K and V pieces received from the members ([B, lens[j], hk, D] each, member order) joined
    along the sequence and fitted to the GQA map: (k, v), or (kv,) with kv [2, B, S, hk', D] when
    stack_kv (one allocation, each piece copied once)."""
    if not stack_kv:
        return (fit_kv_heads(torch.cat(ks, 1), q_range, kv_range, group_size),
                fit_kv_heads(torch.cat(vs, 1), q_range, kv_range, group_size))
    B, _, hk, D = ks[0].shape
    kv = torch.empty(2, B, sum(x.shape[1] for x in ks), hk, D, dtype=ks[0].dtype, device=ks[0].device)
    torch.cat(ks, 1, out=kv[0])
    torch.cat(vs, 1, out=kv[1])
    return (fit_kv_heads(kv, q_range, kv_range, group_size, dim=3),)


def pack_scatter(q, k, v, q_ranges, kv_ranges, with_q=True):
    """Every member's outgoing message in one allocation, each byte copied once: chunk j =
    [q[:, :, q_ranges[j]] | k[:, :, kv_ranges[j]] | v[:, :, kv_ranges[j]]], each [B, S, h, D]
    contiguous (q left out when not with_q). q: [B, S, H, D]; k, v: [B, S, Hk, D]. Returns
    (the flat buffer, its u chunks as views). When the members split the K/V heads evenly (kv_heads >= u), the whole
    tensor goes in with one strided copy per q, k, v instead of one per member."""
    B, S, _, D = q.shape
    u = len(q_ranges)
    hq = [b - a for a, b in q_ranges] if with_q else [0] * u
    hk = [d - c for c, d in kv_ranges]
    size = [B * S * (hq[j] + 2 * hk[j]) * D for j in range(u)]
    flat = torch.empty(sum(size), dtype=q.dtype, device=q.device)
    even = (len(set(hq)) == 1 and len(set(hk)) == 1
            and all(kv_ranges[j][0] == j * hk[0] for j in range(u)) and kv_ranges[-1][1] == k.shape[2])
    if even:
        rows = flat.view(u, size[0])
        n_q, n_k = B * S * hq[0] * D, B * S * hk[0] * D
        parts = ([(q, 0, hq[0])] if with_q else []) + [(k, n_q, hk[0]), (v, n_q + n_k, hk[0])]
        for x, off, h in parts:
            dst = rows[:, off:off + B * S * h * D].unflatten(1, (B, S, h, D))
            dst.copy_(x.view(B, S, u, h, D).permute(2, 0, 1, 3, 4))
        return flat, list(rows.unbind(0))
    chunks = list(flat.split(size))
    for j, ((a, b), (c, d)) in enumerate(zip(q_ranges, kv_ranges)):
        Parts(([q[:, :, a:b]] if with_q else []) + [k[:, :, c:d], v[:, :, c:d]]).unpack_into(chunks[j])
    return flat, chunks


def slice_joint(joint, heads, kv_heads, u, me):
    """Joint tokens are replicated on every rank, so each member takes its heads locally (no
    communication). joint: (jq [B, T, H, D], jk, jv [B, T, Hk, D])."""
    jq, jk, jv = joint
    q_ranges, kv_ranges = head_ranges(heads, kv_heads, u)
    (a, b), (c, d) = q_ranges[me], kv_ranges[me]
    g = heads // kv_heads
    return (
        jq[:, :, a:b],
        fit_kv_heads(jk[:, :, c:d], q_ranges[me], kv_ranges[me], g),
        fit_kv_heads(jv[:, :, c:d], q_ranges[me], kv_ranges[me], g),
    )


def own_kv(k, v, heads, kv_heads, u, me):
    """(k, v) [B, S_me, hk, D]: my own tokens with the K/V heads member `me` holds after
    scatter_heads (fitted to the GQA map), views where no fitting is needed -- the part of the
    scatter's result at hand before any message has arrived."""
    q_ranges, kv_ranges = head_ranges(heads, kv_heads, u)
    (c, d), g = kv_ranges[me], heads // kv_heads
    return tuple(fit_kv_heads(x[:, :, c:d], q_ranges[me], kv_ranges[me], g) for x in (k, v))


def gather_heads(transport, members, me, out, lens, heads, tag=TAG_GATHER, joint_out=None):
    """Head shards -> sequence shards: the inverse of scatter_heads for the output.
    out: [B, sum(lens), h, D] -> [B, lens[me], H, D]. With joint_out ([B, T, h, D], my heads of
    the replicated joint tokens) also the whole joint output [B, T, H, D], identical on every
    member, carried in the same messages: returns (out, joint_out)."""
    pending, assemble = post_gather(transport, members, me, out, lens, heads, tag, joint_out)
    pending.wait()
    return assemble()


def post_gather(transport, members, me, out, lens, heads, tag=TAG_GATHER, joint_out=None):
    """gather_heads without the wait: (pending, assemble)."""
    u = len(members)
    B, _, h, D = out.shape
    tk = _packing(out)
    if joint_out is not None:
        if tk is None:
            return _post_gather_joint(transport, members, me, out, lens, joint_out, tag)
        # The Triton packing kernels lay out the output rows only: the joint output goes in an
        # all-gather of its own.
        pending, assemble = post_gather(transport, members, me, out, lens, heads, tag)
        return pending, (lambda: (assemble(), allgather_heads(transport, members, me, joint_out)))
    if tk is None and not _collective(transport, members):
        return _gather_parts(transport, members, me, out, lens, None, tag)
    # One flat buffer whose chunk j is member j's tokens, [B, lens[j], h, D] contiguous.
    with trace.span("pack"):
        chunk = [B * n * h * D for n in lens]
        if tk:
            flat = tk.pack_seq(out, lens)
        elif B == 1 and out.is_contiguous():
            flat = out.reshape(-1)  # member j's tokens are consecutive rows already: no copy
        else:
            flat = _rows_by_member(out, lens, 0)[0]
        start = [sum(chunk[:j]) for j in range(u)]
        # Every member holds h = heads / u heads, so the pieces coming back stack as [u, B, S_me, h, D].
        back = torch.empty(u, B, lens[me], h, D, dtype=out.dtype, device=out.device)
        back[me].copy_(flat[start[me] : start[me] + chunk[me]].view(B, lens[me], h, D))
    sends = [(members[j], flat[start[j] : start[j] + chunk[j]]) for j in range(u) if j != me]
    recvs = [(members[j], back[j]) for j in range(u) if j != me]
    if tk is None and _collective(transport, members):
        pending = transport.all_to_all(flat, chunk, back.reshape(-1), [back[0].numel()] * u, tag)
        return pending, (lambda: _heads_last(back))

    def assemble():
        with trace.span("pack"):
            return tk.unpack_heads(back) if tk else _heads_last(back)

    return transport.exchange(sends, recvs, tag), assemble


def _gather_parts(transport, members, me, out, lens, joint_out, tag):
    """post_gather over point-to-point messages whose parts are member j's rows of my heads'
    output (and my heads' joint output), sent, and the heads of member j in the final
    [B, lens[me], H, D] output (and joint output), received: nothing is packed or permuted.
    The wire carries [rows [B, lens[j], h, D] | joint [B, T, h, D]]."""
    u = len(members)
    B, _, h, D = out.shape
    rows = lambda j: out[:, slice(*shard_rows(lens, j))]  # noqa: E731
    heads = lambda j: slice(j * h, (j + 1) * h)  # noqa: E731
    with trace.span("pack"):
        o = out.new_empty(B, lens[me], u * h, D)
        o[:, :, heads(me)].copy_(rows(me))
        jo = None
        if joint_out is not None:
            jo = out.new_empty(B, joint_out.shape[1], u * h, D)
            jo[:, :, heads(me)].copy_(joint_out)
    mine = [] if joint_out is None else [joint_out]
    sends = [(members[j], Parts([rows(j)] + mine)) for j in range(u) if j != me]
    recvs = [(members[j], Parts([o[:, :, heads(j)]] + ([] if jo is None else [jo[:, :, heads(j)]])))
             for j in range(u) if j != me]
    pending = transport.exchange_parts(sends, recvs, tag)
    return pending, ((lambda: o) if jo is None else (lambda: (o, jo)))


def _rows_by_member(out, lens, extra):
    """One flat buffer, chunk j = out[:, member j's rows] as [B, lens[j], h, D] followed by
    `extra` more elements (left for the caller to fill); returns (the buffer, its chunks)."""
    B, _, h, D = out.shape
    size = [B * n * h * D + extra for n in lens]
    flat = torch.empty(sum(size), dtype=out.dtype, device=out.device)
    chunks = list(flat.split(size))
    s0 = 0
    for c, n in zip(chunks, lens):
        c[: B * n * h * D].view(B, n, h, D).copy_(out[:, s0 : s0 + n])
        s0 += n
    return flat, chunks


def _heads_last(back):
    """[u, B, S, h, D] (member j's heads in back[j]) -> [B, S, u*h, D]."""
    u, B, S, h, D = back.shape
    return back.permute(1, 2, 0, 3, 4).reshape(B, S, u * h, D)


def _post_gather_joint(transport, members, me, out, lens, joint_out, tag):
    """post_gather with my heads' joint output appended to every message: member j receives
    [its tokens' output for my heads | my joint output], so the joint output's all-gather costs
    no exchange of its own."""
    if not _collective(transport, members):
        return _gather_parts(transport, members, me, out, lens, joint_out, tag)
    u = len(members)
    B, _, h, D = out.shape
    T = joint_out.shape[1]
    nj = B * T * h * D
    with trace.span("pack"):
        flat, chunks = _rows_by_member(out, lens, nj)
        for c in chunks:
            c[c.numel() - nj:].view(B, T, h, D).copy_(joint_out)
        back = torch.empty(u, chunks[me].numel(), dtype=out.dtype, device=out.device)
        back[me].copy_(chunks[me])
    n_out = chunks[me].numel() - nj

    def assemble():
        with trace.span("pack"):
            o = _heads_last(back[:, :n_out].unflatten(1, (B, lens[me], h, D)))
            return o, _heads_last(back[:, n_out:].unflatten(1, (B, T, h, D)))

    return (transport.all_to_all(flat, [c.numel() for c in chunks], back.reshape(-1),
                                 [back.shape[1]] * u, tag), assemble)


def _collective(transport, members) -> bool:
    """STREAMATTN_ALLTOALL=collective and a transport that offers one all-to-all over the whole
    group (torch over gloo), with the Ulysses group being that whole group in rank order."""
    from ..config import alltoall_mode

    return (alltoall_mode() == "collective" and hasattr(transport, "all_to_all")
            and getattr(transport, "backend", "") == "gloo" and list(members) == list(range(transport.size)))


def _scatter_collective(transport, q, k, v, q_ranges, kv_ranges, lens, me, hk, tag, heads, kv_heads,
                        stack_kv=False):
    """post_scatter over one all_to_all_single: every member's [q | k | v] head slices packed in
    one buffer (pack_scatter, member order), received into one buffer whose chunk j is member j's."""
    B, _, _, D = q.shape
    hq = q_ranges[me][1] - q_ranges[me][0]
    with trace.span("pack"):
        send, chunks = pack_scatter(q, k, v, q_ranges, kv_ranges)
    send_splits = [c.numel() for c in chunks]
    recv_splits = [B * n * (hq + 2 * hk) * D for n in lens]
    recv = torch.empty(sum(recv_splits), dtype=q.dtype, device=q.device)
    pending = transport.all_to_all(send, send_splits, recv, recv_splits, tag)
    bufs = list(torch.split(recv, recv_splits))

    def assemble():
        with trace.span("pack"):
            qs = [buf[:B * n * hq * D].view(B, n, hq, D) for buf, n in zip(bufs, lens)]
            ks = [buf[B * n * hq * D:B * n * (hq + hk) * D].view(B, n, hk, D) for buf, n in zip(bufs, lens)]
            vs = [buf[B * n * (hq + hk) * D:].view(B, n, hk, D) for buf, n in zip(bufs, lens)]
            return (torch.cat(qs, 1),) + _join_kv(ks, vs, q_ranges[me], kv_ranges[me],
                                                  heads // kv_heads, stack_kv)

    return pending, assemble


def _packing(x):
    """streamattn.triton_kernels when triton_kernels.enabled_for(x) says so, else None (torch ops)."""
    from .. import triton_kernels

    return triton_kernels if triton_kernels.enabled_for(x) else None


def allgather_heads(transport, members, me, x):
    """x: [B, T, h, D] (my heads of a replicated block) -> [B, T, u*h, D], identical on all members."""
    return torch.cat(transport.all_gather(x, members, TAG_JOINT), 2)


def ulysses_attention(transport, problem, q, k, v, joint=None, members=None, chunks=1,
                      with_lse=False):
    """Ulysses over `members` (default: the whole group). q: [B, S_local, H, D], k, v:
    [B, S_local, Hk, D]; joint as in local.attend. Returns (out [B, S_local, H, D], joint_out).

    chunks > 1 pipelines over head groups: the heads are split into `chunks` sub-problems whose
    all-to-alls are all posted at once; attention on a head group starts as soon as its data has
    arrived and its outputs are sent back while the next group computes. Needs whole K/V groups
    per chunk ((H / u / chunks) % (H / Hk) == 0); otherwise it runs unchunked.
    with_lse: also the final LSEs, [B, H, S_local] and [B, H, T] or None (unchunked)."""
    members = list(range(transport.size)) if members is None else members
    me = members.index(transport.rank)
    lens = [problem.seq_lens[m] for m in members]
    H, Hk, u = problem.heads, problem.kv_heads, len(members)
    g = H // Hk
    if chunks > 1 and (H // u) % chunks == 0 and (H // u // chunks) % g == 0 and not with_lse:
        return _pipelined(transport, problem, q, k, v, joint, members, me, lens, chunks)
    # the joint tokens' rows of my heads land next to the group's in the same buffers
    pending, assemble = post_scatter(transport, members, me, q, k, v, lens, H, Hk, joint=joint,
                                     joint_strategy=problem.joint_strategy)
    pending.wait()
    qh, kh, vh = assemble()
    out, jout, lse, jlse = attend(qh, kh, vh, scale=problem.scale, causal=problem.causal,
                                  joint_len=None if joint is None else joint[0].shape[1],
                                  joint_strategy=problem.joint_strategy, with_lse=True)
    if jout is None:
        out = gather_heads(transport, members, me, out, lens, H)
    else:
        out, jout = gather_heads(transport, members, me, out, lens, H, joint_out=jout)
    if not with_lse:
        return out, jout
    return (out, jout) + lse_to_sequence(transport, members, me, lse, jlse, lens, H)


def lse_to_sequence(transport, members, me, lse, jlse, lens, heads):
    """My heads' LSEs over the group's tokens, lse [B, h, sum(lens)] (and joint [B, h, T]) ->
    this member's tokens, every head: [B, H, lens[me]] (and [B, H, T], identical on all members).
    Travels as a one-wide head dimension through the output's all-to-all."""
    lse = gather_heads(transport, members, me, lse.transpose(1, 2).unsqueeze(-1).contiguous(),
                       lens, heads, tag=TAG_LSE)
    lse = lse.squeeze(-1).transpose(1, 2)
    if jlse is not None:
        jlse = torch.cat(transport.all_gather(jlse.contiguous(), members, TAG_LSE + 1), 1)
    return lse, jlse


def _pipelined(transport, problem, q, k, v, joint, members, me, lens, chunks):
    """Ulysses as `chunks` independent head groups: chunk c holds, of every member's head slice,
    its c-th part, so each chunk is itself a Ulysses problem on H / chunks heads."""
    H, Hk, u = problem.heads, problem.kv_heads, len(members)
    g, hq = H // Hk, H // u
    per = hq // chunks
    idx = [torch.tensor([j * hq + c * per + i for j in range(u) for i in range(per)], device=q.device)
           for c in range(chunks)]
    kv_idx = [i[::g] // g for i in idx]
    posted = []
    for c in range(chunks):
        qc, kc, vc = q.index_select(2, idx[c]), k.index_select(2, kv_idx[c]), v.index_select(2, kv_idx[c])
        posted.append(post_scatter(transport, members, me, qc, kc, vc, lens, H // chunks,
                                   Hk // chunks, tag=TAG_SCATTER + 2 * c))
    gathers = []
    for c, (pending, assemble) in enumerate(posted):
        pending.wait()
        qh, kh, vh = assemble()
        jh = None
        if joint is not None:
            jq, jk, jv = joint
            jh = slice_joint((jq.index_select(2, idx[c]), jk.index_select(2, kv_idx[c]),
                              jv.index_select(2, kv_idx[c])), H // chunks, Hk // chunks, u, me)
        o, jo = attend(qh, kh, vh, scale=problem.scale, causal=problem.causal, joint=jh,
                       joint_strategy=problem.joint_strategy)
        gathers.append(post_gather(transport, members, me, o, lens, H // chunks, tag=TAG_GATHER + 2 * c,
                                   joint_out=jo))
    out = torch.empty_like(q)
    jout = None if joint is None else torch.empty_like(joint[0])
    for c, (pending, assemble) in enumerate(gathers):
        pending.wait()
        if joint is None:
            out.index_copy_(2, idx[c], assemble())
        else:
            o, jo = assemble()
            out.index_copy_(2, idx[c], o)
            jout.index_copy_(2, idx[c], jo)
    return out, jout
