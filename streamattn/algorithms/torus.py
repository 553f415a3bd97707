"""Torus attention (StreamFusion): the inter-node all-to-all overlapped with block attention.

Grid: Ulysses groups of u ranks (a node, fast links); a torus team of t groups; optionally r teams
joined by a ring (when the heads do not divide u * t * r = P otherwise). Rank (team, m, g) is
member g of group m of its team.

1. Intra-node all-to-all (Ulysses over the group): the rank holds its group's tokens for H/u heads.
2. Torus exchange: of those heads, group member m' of the team owns sub-slice m'. For k = 1..t-1 the
   rank sends Q, K, V of its group's tokens for sub-slice (m+k) % t to (m+k) % t and receives the
   same from (m-k) % t. Step k+1 is posted once step k has arrived: the steps share the rank's link
   (a node's uplink, a GPU's NIC), so posted together they all arrive at the end of the whole
   transfer and no remote block can be attended before it; one at a time, block k arrives after k
   steps' transfers and is attended while the next step travels (measured on an emulated 4 nodes x
   2 ranks, t = 4: docs/architecture.md).
3. Blocks are attended as they arrive, starting with the local one, every (query block, K/V block)
   pair exactly once, partial results merged by the LSE (merge.update_out_and_lse).
4. With a ring factor, the team's K/V then rotates around the ring of teams.
5. A query block's output is final once every K/V block is merged: it is sent home at once while
   the remaining blocks are still computing, and the intra-node all-to-all brings it back to
   [B, S_local, H, D]. Blocks are finalised in shift order (block m+1, m+2, ...), and the k-th
   output exchange both sends block m+k home and receives this rank's sub-slice m-k from member m-k:
   every exchange is matched by the same exchange on its peers, which NCCL needs (each
   batch_isend_irecv is one group, executed in posting order on one stream; a receive posted on its
   own ahead of the sends that peers wait for would deadlock).
Joint text tokens are one more local query block and one more local K/V block.
"""
from __future__ import annotations

import torch

from .. import tags
from ..kernels import attention_with_lse
from ..merge import empty_accumulator, merge_all, start_accumulator, update_out_and_lse
from ..transport.base import Parts
from .ring import alternating_buffers, merge_across
from .ulysses import allgather_heads, fit_kv_heads, gather_heads, head_ranges, scatter_heads, slice_joint

TAG_QKV, TAG_OUT, TAG_RING, TAG_JOINT = tags.TORUS_QKV, tags.TORUS_OUT, tags.TORUS_RING, tags.TORUS_JOINT


class _Block:
    """One source group's tokens for this rank's heads: q [B, S, h, D], k/v [B, S, hk, D]."""

    def __init__(self, j, q, k, v, offset):
        self.j, self.q, self.k, self.v, self.offset = j, q, k, v, offset
        self.acc = None  # (out [B, h, S, D], lse [B, h, S]) in the accumulation dtype
        self.final = False


class _TorusRank:
    """This rank's part of one torus call; see the module docstring for the schedule."""

    # False restores the posting order before the fix (every home receive in one receive-only
    # exchange up front, each output sent alone): it deadlocks on NCCL with t > 1 and exists only as
    # the negative control of tests/test_inorder.py.
    paired_outputs = True
    # False restores posting every torus exchange at once (before stop 46): the negative control of
    # tests/test_inorder.py::test_torus_exchanges_go_one_at_a_time.
    one_at_a_time = True

    def __init__(self, transport, problem, plan, dtype):
        self.tr, self.problem, self.plan, self.dtype = transport, problem, plan, dtype
        me = transport.rank
        self.groups = plan.ulysses_groups()
        self.u, self.t, self.r = plan.ulysses_degree, plan.torus_degree, plan.ring_degree
        self.gi = next(i for i, grp in enumerate(self.groups) if me in grp)
        self.g = self.groups[self.gi].index(me)
        self.team, self.m = divmod(self.gi, self.t)
        team_groups = self.groups[self.team * self.t : (self.team + 1) * self.t]
        self.peers = [grp[self.g] for grp in team_groups]  # torus members, index = member m'
        seq = problem.seq_lens
        self.glen = [sum(seq[x] for x in grp) for grp in team_groups]
        self.goff = [problem.offsets[grp[0]] for grp in team_groups]
        self.sends = []  # pending output exchanges (send home + receive my sub-slice)
        self.home = {}  # j -> [B, S_group, h_j, D]: my group's tokens for sub-slice j, from member j

    def attend(self, qb, kb, vb, q_off, k_off):
        """Partial of a query block vs a K/V block, both [B, S, h(k), D]; None if fully masked."""
        causal = self.problem.causal
        if causal and k_off > q_off + qb.shape[1] - 1:
            return None
        return attention_with_lse(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
                                  scale=self.problem.scale, causal=causal, q_offset=q_off, k_offset=k_off)

    @staticmethod
    def merge_into(blk, part):
        if part is None:
            return
        if blk.acc is None:
            blk.acc = start_accumulator(*part)
        else:
            update_out_and_lse(blk.acc[0], blk.acc[1], *part)

    def shift_order(self, js):
        """Remote blocks in the order their outputs go home (m+1, m+2, ...), the local one last."""
        return sorted(js, key=lambda j: (j - self.m - 1) % self.t)

    def finalise(self, blk, joint_kv):
        """Every K/V block is merged into blk: add the rear joint K/V, send it home at once.
        Callers finalise remote blocks in shift_order: block j = m+k goes out in the k-th output
        exchange, which also receives sub-slice m-k (the peers post the matching k-th exchange)."""
        if joint_kv is not None and self.problem.joint_strategy == "rear":
            self.merge_into(blk, self.attend(blk.q, joint_kv[0], joint_kv[1], 0, 0))
        blk.final = True
        if blk.j != self.m:
            k = (blk.j - self.m) % self.t
            src = (self.m - k) % self.t
            payload = blk.acc[0].transpose(1, 2).to(self.dtype).contiguous()
            recvs = [(self.peers[src], self.home[src])] if self.paired_outputs else []
            tag = TAG_OUT + k if self.paired_outputs else TAG_OUT
            self.sends.append(self.tr.exchange([(self.peers[blk.j], payload)], recvs, tag))


def use_paired_outputs(flag: bool) -> None:
    """Tests only: False restores the pre-fix output posting order (the negative control of
    tests/test_inorder.py, which hangs on NCCL); True is the only correct setting."""
    _TorusRank.paired_outputs = bool(flag)


def use_one_exchange_at_a_time(flag: bool) -> None:
    """Tests only: False posts all t-1 torus exchanges at once (the order before stop 46, exact
    but slower: the exchanges share the link and every block lands at the end)."""
    _TorusRank.one_at_a_time = bool(flag)


def torus_attention(transport, problem, q, k, v, joint=None, *, plan):
    """q: [B, S_local, H, D], k, v: [B, S_local, Hk, D]; joint: None or (jq, jk, jv) replicated.
    plan: Plan(algorithm="torus", ulysses_degree=u, torus_degree=t, ring_degree=r) whose groups
    are the Ulysses groups in team order. Returns (out [B, S_local, H, D], joint_out or None)."""
    st = _TorusRank(transport, problem, plan, q.dtype)
    H, Hk, t, r, m, g = problem.heads, problem.kv_heads, st.t, st.r, st.m, st.g
    B, D = q.shape[0], q.shape[-1]
    group = list(st.groups[st.gi])
    lens = [problem.seq_lens[x] for x in group]

    # 1. intra-node all-to-all
    qn, kn, vn = scatter_heads(transport, group, g, q, k, v, lens, H, Hk)
    q_rng, kv_rng = head_ranges(qn.shape[2], kn.shape[2], t)
    ggrp = qn.shape[2] // kn.shape[2]
    hq, hk = q_rng[m][1] - q_rng[m][0], kv_rng[m][1] - kv_rng[m][0]

    def sub(x, rng):
        return x[:, :, rng[0] : rng[1]]

    def fitted(kx):
        return fit_kv_heads(kx, q_rng[m], kv_rng[m], ggrp)

    # 2. the torus exchange, step k: send to m+k, receive from m-k; step 1 now, step k+1 once step
    # k has arrived (below)
    incoming = {}

    def post_step(step):
        dst, src = (m + step) % t, (m - step) % t
        payload = Parts([sub(qn, q_rng[dst]), sub(kn, kv_rng[dst]), sub(vn, kv_rng[dst])])
        buf = torch.empty(B * st.glen[src] * (hq + 2 * hk) * D, dtype=q.dtype, device=q.device)
        incoming[src] = (buf, transport.exchange_parts([(st.peers[dst], payload)],
                                                       [(st.peers[src], buf)], TAG_QKV + step))

    for step in range(1, 2 if st.one_at_a_time else t):
        post_step(step)
    st.home = {j: torch.empty(B, st.glen[m], q_rng[j][1] - q_rng[j][0], D, dtype=q.dtype,
                              device=q.device) for j in range(t) if j != m}
    if not st.paired_outputs:  # the negative control's (pre-fix) posting order
        st.sends.append(transport.exchange([], [(st.peers[j], st.home[j]) for j in st.home], TAG_OUT))

    joint_kv, jblk = None, None
    if joint is not None:
        jq, jk, jv = slice_joint(joint, H, Hk, st.u, g)
        joint_kv = (fitted(sub(jk, kv_rng[m])), fitted(sub(jv, kv_rng[m])))
        jblk = _Block(-1, sub(jq, q_rng[m]), None, None, 0)

    # 3. the local block first, then each arrival; the last arrival finalises blocks one by one
    blocks, arrived = {}, []
    for idx, j in enumerate((m - step) % t for step in range(t)):
        if j == m:
            blk = _Block(j, sub(qn, q_rng[m]), fitted(sub(kn, kv_rng[m])), fitted(sub(vn, kv_rng[m])),
                         st.goff[m])
        else:
            buf, pend = incoming[j]
            pend.wait()
            if st.one_at_a_time and idx + 1 < t:
                post_step(idx + 1)
            nq, nkv = B * st.glen[j] * hq * D, B * st.glen[j] * hk * D
            blk = _Block(j, buf[:nq].view(B, st.glen[j], hq, D),
                         fitted(buf[nq : nq + nkv].view(B, st.glen[j], hk, D)),
                         fitted(buf[nq + nkv :].view(B, st.glen[j], hk, D)), st.goff[j])
        blocks[j] = blk
        blk.acc = empty_accumulator(B, hq, blk.q.shape[1], D, q.dtype, q.device)
        if joint_kv is not None and problem.joint_strategy == "front":
            st.merge_into(blk, st.attend(blk.q, joint_kv[0], joint_kv[1], 0, 0))
        last = idx == t - 1 and r == 1
        for i in arrived:  # the new query block against the earlier K/V
            st.merge_into(blk, st.attend(blk.q, blocks[i].k, blocks[i].v, blk.offset, blocks[i].offset))
        st.merge_into(blk, st.attend(blk.q, blk.k, blk.v, blk.offset, blk.offset))
        if last:  # the new (remote) block is final first: its output travels during the rest
            st.finalise(blk, joint_kv)
        # Earlier query blocks in shift order, the local one last (the new block is m+1 when last).
        for i in st.shift_order(arrived):
            st.merge_into(blocks[i], st.attend(blocks[i].q, blk.k, blk.v, blocks[i].offset, blk.offset))
            if last:
                st.finalise(blocks[i], joint_kv)
        if jblk is not None:  # joint queries against this group's tokens
            st.merge_into(jblk, st.attend(jblk.q, blk.k, blk.v, 0, 0))
        arrived.append(j)

    # 4. ring factor: rotate the whole team's K/V around the ring of teams; the last step finalises
    if r > 1:
        _ring_of_teams(st, blocks, arrived, joint_kv)

    # 5. my group's tokens come home for every sub-slice, then back across the node
    for pend in st.sends:
        pend.wait()
    parts = [st.home[j] if j != m else blocks[m].acc[0].transpose(1, 2).to(q.dtype) for j in range(t)]
    out = gather_heads(transport, group, g, torch.cat(parts, 2), lens, H)
    jout = _joint_output(st, jblk, joint_kv) if jblk is not None else None
    return out, jout


def _ring_of_teams(st, blocks, arrived, joint_kv):
    """Rotate this team's K/V (every block, concatenated in team order) around the r teams,
    double-buffered like ring_core: step s forwards the K/V that arrived at step s-1 while it is
    attended, so each transfer overlaps one step's compute. Every block merges the teams in the
    same order (team-1, team-2, ...) as without overlap. After the last team's K/V a block is final:
    it is sent home at once (shift order) while the remaining blocks compute."""
    groups, t, r, team = st.groups, st.t, st.r, st.team
    seq, offsets = st.problem.seq_lens, st.problem.offsets
    ring = [groups[x * t + st.m][st.g] for x in range(r)]  # the same (m, g) in every team
    team_len = [sum(seq[y] for grp in groups[x * t : (x + 1) * t] for y in grp) for x in range(r)]
    team_off = [offsets[groups[x * t][0]] for x in range(r)]
    kv = torch.stack([torch.cat([blocks[j].k for j in range(t)], 1),
                      torch.cat([blocks[j].v for j in range(t)], 1)])
    order = st.shift_order(arrived)

    def attend_all(kv, src, final):
        for i in order:
            st.merge_into(blocks[i], st.attend(blocks[i].q, kv[0], kv[1], blocks[i].offset, team_off[src]))
            if final:
                st.finalise(blocks[i], joint_kv)

    _, B, _, hk, D = kv.shape
    arriving = alternating_buffers(kv, [(2, B, team_len[(team - step) % r], hk, D)
                                        for step in range(1, r)])
    for step in range(1, r):
        incoming = arriving[step - 1]
        pend = st.tr.exchange([(ring[(team + 1) % r], kv)], [(ring[(team - 1) % r], incoming)],
                              TAG_RING + step)
        if step > 1:  # the K/V of team - (step - 1), being forwarded right now
            attend_all(kv, (team - step + 1) % r, False)
        pend.wait()
        kv = incoming
    attend_all(kv, (team - r + 1) % r, True)


def _joint_output(st, jblk, joint_kv):
    """Joint queries: the partial over this team's tokens; with a ring factor the r teams'
    partials are merged in team order (team 0 adds the joint K/V) so every rank ends bit-identical;
    then the head slices are all-gathered over the team (head order: member g, then sub-slice m)."""
    parts = [jblk.acc]
    if st.team == 0:
        own = st.attend(jblk.q, joint_kv[0], joint_kv[1], 0, 0)
        parts = [own] + parts if st.problem.joint_strategy == "front" else parts + [own]
    o, l = merge_all(parts)
    if st.r > 1:
        ring = [st.groups[x * st.t + st.m][st.g] for x in range(st.r)]
        o, _ = merge_across(st.tr, ring, o, l, TAG_JOINT)
    team_groups = st.groups[st.team * st.t : (st.team + 1) * st.t]
    members = [team_groups[mm][gg] for gg in range(len(team_groups[0])) for mm in range(st.t)]
    return allgather_heads(st.tr, members, members.index(st.tr.rank), o.transpose(1, 2).to(st.dtype))
