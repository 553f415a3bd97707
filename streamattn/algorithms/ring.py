"""Ring attention: K/V blocks rotate around a ring; each step's send overlaps the next compute.

Each of the r ring members keeps its query block and sees every member's K/V block once, merging
the partial outputs with the LSE (merge.update_out_and_lse). Blocks may have different lengths.
Joint text tokens (never causal): the T joint queries are split over the members
(sharding.split_lengths(T, r)); member m appends its share to its own queries, so those rows see
every block as the ring passes it, and all its rows attend the joint K/V once, while the first
step's transfer is in flight ("front" or "rear" only places the joint rows in the output; the
merge order changes rounding alone). After the ring the members all-gather their finished joint
rows (out and LSE, exact), so every member holds the same joint output. Each member thus sends
T/r rows to each other member, where all-gathering per-member (out, lse) partials of all T rows
sent r times as many bytes (ring 8 at 2 nodes x 4: 2.3x the ring's own inter-node bytes) and
merged r partials.
joint_all=True instead: every member attends all T joint queries to every block as it passes (r
times the joint queries' FLOPs, no exchange after the ring: on a slow link the all-gather is a
wire-bound step no compute hides). The joint rows attend each block (each token run of it) in a
kernel call of their own, and the partials merge in one order on every member (joint K/V "front",
blocks in member order, joint K/V "rear"), so the joint output is bit-identical everywhere.
"""
from __future__ import annotations

import math

import torch

from .. import tags
from .. import trace
from ..kernels import attention_with_lse
from ..merge import empty_accumulator, merge_all, start_accumulator, update_out_and_lse
from ..sharding import ring_runs, run_pieces, run_size, run_within, shard_rows, split_lengths
from ..transport.base import Parts

TAG_STEP, TAG_JOINT = tags.RING_STEP, tags.RING_JOINT


class ArrivingBlock:
    """My ring block before it is whole (USP: the Ulysses all-to-all still in flight). mine: (k, v)
    of the tokens I hold already, [B, n, hk, D] each, tokens [start, start + n) of the block;
    finish() waits for the rest and returns (q [B, Sq, h, D], kv [2, B, S, hk, D]); result()
    calls it once."""

    def __init__(self, mine, start, finish):
        self.mine, self.start, self._finish, self._result = mine, start, finish, None

    def result(self):
        if self._result is None:
            self._result = self._finish()
        return self._result


def ring_core(transport, members, me, q, k, v, *, seg_lens, seg_offsets, scale, causal,
              joint=None, joint_strategy="front", with_lse=False, kv=None, chunks=1,
              joint_all=False, arriving=None, run_first=None, run_lead=None):
    """The ring over `members` (group ranks, in ring order); me: my index.

    q: [B, Sq, h, D], k, v: [B, Sk, hk, D] with Sk == seg_lens[me] (bshd views are fine).
    kv: None, or k and v already stacked ([2, B, Sk, hk, D] with kv[0] = k, kv[1] = v): the
    step message as it is, without the stacking copy.
    arriving: None, or an ArrivingBlock standing for q and kv (q, k, v, kv are then None): the
    runs of my block it holds are posted before it is finished.
    chunks > 1: every step's block travels as that many token runs, each forwarded and attended
    as soon as it arrives (_chunked_steps); member s's block is cut by sharding.run_pieces(
    seg_lens[s], runs, run_first[s], run_lead[s]) (default 0, 0: from its first token), the
    same cut on every member.
    seg_lens/seg_offsets: length and global start position of each member's block (causal masks).
    joint: None or (jq [B, T, h, D], jk, jv [B, T, hk, D]). joint_all: every member attends all
    T joint queries (see the module docstring; not with causal).
    Returns (out [B, h, Sq, D], joint_out [B, h, T, D] or None), both in the accumulation dtype;
    with_lse: (out, joint_out, lse [B, h, Sq], joint_lse [B, h, T] or None), the final LSEs.
    """
    r = len(members)
    nxt, prv = members[(me + 1) % r], members[(me - 1) % r]
    runs = ring_runs(seg_lens, chunks) if r > 1 else 1
    sent = None
    if runs > 1:  # my block's runs go on the wire first: before the rest of the call's set-up
        first, lead = run_first or [0] * r, run_lead or [0] * r
        cuts = [run_pieces(seg_lens[s], runs, first[s], lead[s]) for s in range(r)]
        sent = _post_my_runs(transport, nxt, prv, cuts, me, r, k, v, kv, arriving)
    if arriving is not None:
        q, kv = arriving.result()
        k, v = kv[0], kv[1]
    B, Sq, h, D = q.shape
    jparts = None  # joint_all: (order, partial) of the joint queries against each block / run
    joint_kv = joint  # every row attends the joint K/V
    if joint is not None and joint_all and r > 1:
        if causal:
            raise ValueError("ring_core: joint_all is for non-causal attention")
        jparts, jqb = [], joint[0].transpose(1, 2)

        def joint_with(kv_block, order):
            jparts.append((order, attention_with_lse(jqb, kv_block[0].transpose(1, 2),
                                                     kv_block[1].transpose(1, 2), scale=scale)))

        joint = None  # my queries alone ride the ring
    jlens = split_lengths(joint[0].shape[1], r) if joint is not None else None
    if jlens is not None and jlens[me]:  # my share of the joint queries rides with my queries
        a = sum(jlens[:me])
        with trace.span("pack"):
            q = torch.cat([q, joint[0][:, a:a + jlens[me]]], 1)
    qb = q.transpose(1, 2)
    acc = []  # [out, lse] once a block was attended

    def merge_with(kb, vb, **mask):
        o, l = attention_with_lse(qb, kb, vb, scale=scale, **mask)
        if acc:
            update_out_and_lse(acc[0], acc[1], o, l)
        else:
            acc.extend(start_accumulator(o, l))

    def joint_kv_work():
        """Every row against the joint K/V (the joint queries of joint_all in a call of their own):
        local work the first step's transfer hides, so run once its messages are posted -- before
        them it delayed the first send on a slow link by its whole time (the wire idle meanwhile).
        Which step merges it changes rounding only (joint attention is never causal); joint_all's
        joint partials merge by their order label, not by when they ran."""
        if joint_kv is None:
            return
        if jparts is not None:
            joint_with(joint_kv[1:], (-1, 0) if joint_strategy == "front" else (r, 0))
        merge_with(joint_kv[1].transpose(1, 2), joint_kv[2].transpose(1, 2))

    if sent is not None:
        _chunked_steps(transport, r, me, nxt, prv, k, v, kv, cuts, sent, seg_offsets, Sq, causal,
                       merge_with, joint_with if jparts is not None else None,
                       after_post=joint_kv_work)
    else:
        # One contiguous message per step: K and V stacked, [2, B, S, hk, D].
        if kv is None:
            with trace.span("pack"):
                kv = torch.stack([k, v])
        hk = kv.shape[3]
        buffers = alternating_buffers(kv, [(2, B, seg_lens[(me - t - 1) % r], hk, D)
                                           for t in range(r - 1)])
        for t in range(r):
            pending = None
            if t < r - 1:
                incoming = buffers[t]
                pending = transport.exchange([(nxt, kv)], [(prv, incoming)], TAG_STEP + t)
            if t == 0:  # after the post (a ring of one has none)
                joint_kv_work()
            _attend_block(merge_with, kv, (me - t) % r, me, seg_offsets, Sq, causal, 0)
            if jparts is not None:
                joint_with(kv, ((me - t) % r, 0))
            if pending is not None:
                pending.wait()
                kv = incoming

    out, lse = acc if acc else empty_accumulator(B, h, q.shape[1], D, q.dtype, q.device)
    if jparts is not None:  # one merge order on every member: bit-identical joint rows
        with trace.span("merge"):
            jout, jlse = merge_all(in_member_order(jparts))
        return (out, jout, lse, jlse) if with_lse else (out, jout)
    if joint is None:
        return (out, None, lse, None) if with_lse else (out, None)
    jout, jlse = gather_rows(transport, members, me, out[:, :, Sq:], lse[:, :, Sq:], jlens,
                             TAG_JOINT)
    out, lse = out[:, :, :Sq], lse[:, :, :Sq].contiguous()
    return (out, jout, lse, jlse) if with_lse else (out, jout)


def in_member_order(parts):
    """joint_all's (order, partial) pairs as partials in one order for every member: joint K/V
    "front", then the blocks by member and token run, then joint K/V "rear"."""
    return [p for _, p in sorted(parts, key=lambda x: x[0])]


def alternating_buffers(like, shapes):
    """Receive tensors for a ring's successive steps, of `shapes` (like's dtype and device), laid
    in two buffers used in turn: step t's block arrives where step t - 2's did, whose send and use
    are done by then (each step waits on its exchange before the next is posted). A fresh tensor
    per step would be a block-sized allocation each, which the allocator hands back to the
    kernel and the next call faults in again."""
    sizes = [math.prod(s) for s in shapes]
    bufs = [like.new_empty(max(sizes, default=0)) for _ in range(min(2, len(sizes)))]
    return [bufs[t % 2][:n].view(s) for t, (n, s) in enumerate(zip(sizes, shapes))]


def _attend_block(merge_with, kv, src, me, seg_offsets, Sq, causal, start):
    """Merge the queries' attention to K/V (kv[0], kv[1]: [B, n, hk, D]) that begin `start`
    tokens into member src's block."""
    kb, vb = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
    if not causal:
        merge_with(kb, vb)
    elif seg_offsets[src] + start <= seg_offsets[me] + Sq - 1:  # else every key lies in the future
        merge_with(kb, vb, causal=True, q_offset=seg_offsets[me], k_offset=seg_offsets[src] + start)


def _run(pieces, k, v, kv, arriving):
    """One run's message, [2, B, n, hk, D] contiguous (one copy): the block rows `pieces` ((start,
    n) ranges), from arriving.mine when it holds them all, else from the whole block."""
    if arriving is not None:
        a, n = arriving.start, arriving.mine[0].shape[1]
        if run_within(pieces, a, a + n):
            k, v = arriving.mine
            pieces = [(s - a, m) for s, m in pieces]
        else:
            _, kv = arriving.result()
    if kv is None:
        return torch.stack([torch.cat([x[:, s:s + m] for s, m in pieces], 1) for x in (k, v)])
    return torch.cat([kv[:, :, s:s + m] for s, m in pieces], 2)


def _post_my_runs(transport, nxt, prv, cuts, me, r, k, v, kv, arriving):
    """Step 1 of a ring in token runs: my block's runs (cuts[me]) posted to the successor in order,
    each with a buffer for the same run of my predecessor's block. Runs that arriving.mine holds
    go before the rest of my block exists. Returns (my runs, [(buffer, pending)] incoming)."""
    like = arriving.mine[0] if arriving is not None else (k if kv is None else kv[0])
    B, _, hk, D = like.shape
    mine, incoming = [], []
    for i, pieces in enumerate(cuts[me]):
        with trace.span("pack"):
            run = _run(pieces, k, v, kv, arriving)
        inc = like.new_empty(2, B, run_size(cuts[(me - 1) % r][i]), hk, D)
        incoming.append((inc, transport.exchange([(nxt, run)], [(prv, inc)], TAG_STEP)))
        mine.append(run)
    return mine, incoming


def _chunked_steps(transport, r, me, nxt, prv, k, v, kv, cuts, sent, seg_offsets, Sq, causal,
                   merge_with, joint_with=None, after_post=None):
    """The ring steps with every block cut into token runs (cuts[s]: member s's, run_pieces), one
    message each, my own already posted (sent, _post_my_runs). Run i of a block is forwarded to
    the next member and attended as soon as it has arrived, so the call's exposed tail is one
    run's attention instead of one block's (the last block's compute overlaps its own arrival).
    My own block is attended whole once its runs are posted. joint_with(run, (member, i)): the
    joint queries of joint_all attend every run, my own block's too (the same runs on every
    member). after_post(): local work run once my block's runs are posted, before my block is
    attended."""
    mine, cur = sent
    if after_post is not None:
        after_post()
    if joint_with is not None:
        for i, run in enumerate(mine):
            joint_with(run, (me, i))
    mine.clear()  # their exchanges hold what is still in flight; a block-sized copy less held
    _attend_block(merge_with, (k, v) if kv is None else kv, me, me, seg_offsets, Sq, causal, 0)
    for t in range(1, r):
        src = (me - t) % r
        nxt_runs = []
        for i, (run, pending) in enumerate(cur):
            pending.wait()
            if t < r - 1:
                inc = run.new_empty(2, run.shape[1], run_size(cuts[(src - 1) % r][i]), run.shape[3],
                                    run.shape[4])
                nxt_runs.append((inc, transport.exchange([(nxt, run)], [(prv, inc)], TAG_STEP + t)))
            # causal cuts have one range per run (run_first 0: USP rotates non-causal blocks only)
            _attend_block(merge_with, run, src, me, seg_offsets, Sq, causal, cuts[src][i][0][0])
            if joint_with is not None:
                joint_with(run, (src, i))
        cur = nxt_runs


def gather_rows(transport, members, me, out, lse, lens, tag):
    """All-gather of finished rows over the members: mine are out [B, h, lens[me], D], lse [B, h,
    lens[me]] (one message to each other member, both together, in their dtype). Returns the rows
    of every member side by side in member order, ([B, h, sum(lens), D], [B, h, sum(lens)]), the
    same on every member."""
    B, h, _, D = out.shape
    rows = lambda i: slice(*shard_rows(lens, i))  # noqa: E731
    with trace.span("pack"):
        outs = out.new_empty(B, h, sum(lens), D)
        lses = lse.new_empty(B, h, sum(lens))
        outs[:, :, rows(me)].copy_(out)
        lses[:, :, rows(me)].copy_(lse)
    # Parts: my rows go out as they are, every member's land in place (no pack, no concatenation)
    sends = [(p, Parts([out, lse])) for i, p in enumerate(members) if i != me and lens[me]]
    recvs = [(p, Parts([outs[:, :, rows(i)], lses[:, :, rows(i)]]))
             for i, p in enumerate(members) if i != me and lens[i]]
    transport.exchange_parts(sends, recvs, tag).wait()
    return outs, lses


def merge_across(transport, members, out, lse, tag):
    """Merge every member's partial (out [B, h, T, D], lse [B, h, T]) over disjoint keys, in member
    order, so that all members end with bit-identical (out, lse). (The Torus' joint tokens; the
    ring's own joint rows are split over the members instead: gather_rows.)"""
    B, h, T, D = out.shape
    flats = transport.all_gather(torch.cat([out.reshape(-1), lse.reshape(-1)]), members, tag)
    n = B * h * T * D
    return merge_all([(f[:n].view(B, h, T, D), f[n:].view(B, h, T)) for f in flats])


def ring_attention(transport, problem, q, k, v, joint=None, members=None, with_lse=False, chunks=1,
                   joint_all=False):
    """Ring over `members` (default: the whole group) with every member's own shard as its block.
    q: [B, S_local, H, D], k, v: [B, S_local, Hk, D]. Returns (out [B, S_local, H, D], joint_out
    [B, T, H, D] or None) in q's dtype; with_lse: also the final LSEs, [B, H, S_local] and
    [B, H, T] or None (accumulation dtype). chunks, joint_all: see ring_core."""
    members = list(range(transport.size)) if members is None else members
    me = members.index(transport.rank)
    lens = [problem.seq_lens[m] for m in members]
    offsets = [problem.offsets[m] for m in members]
    out, jout, lse, jlse = ring_core(transport, members, me, q, k, v, seg_lens=lens,
                                     seg_offsets=offsets, scale=problem.scale, causal=problem.causal,
                                     joint=joint, joint_strategy=problem.joint_strategy,
                                     with_lse=True, chunks=chunks, joint_all=joint_all)
    out = out.transpose(1, 2).to(q.dtype)
    jout = jout.transpose(1, 2).to(q.dtype) if jout is not None else None
    return (out, jout, lse, jlse) if with_lse else (out, jout)
