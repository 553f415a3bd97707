"""The message schedule of every algorithm: exact messages, FLOPs and local memory traffic.

Stated once here and used by the cost model (streamattn.costmodel times it on a topology), by the
bench's expected byte counts (streamattn.bench.perf) and by the tests that hold the execution's
byte counters to it (tests/test_planner.py, tests/test_bench.py).

What each algorithm sends (forward, mirroring streamattn/algorithms/ message for message):
- Ulysses scatter (one exchange inside every Ulysses group of u members): member j sends member i
  q, k, v of its S_j tokens for i's heads in ONE message of B*S_j*(H/u + 2*hk_i)*D elements, where
  hk_i = K/V heads member i's query heads use (GQA: when kv_heads < u, K/V heads are replicated).
- compute: attention of the group's tokens (plus the joint tokens, sliced by head locally, no
  communication) for H/u heads.
- Ulysses gather: member i sends member j the output of j's tokens for i's heads, B*S_j*(H/u)*D,
  followed (joint tokens) by i's heads of the joint output, B*T*(H/u)*D: the joint output's
  all-gather over the Ulysses group rides in the same messages (with the Triton packing kernels,
  GPU, it is an exchange of its own, the same bytes).
- Ring of r members: r-1 steps; in step t every member sends the K/V block it holds (stacked,
  2*B*S_src*hk*D elements) to the next member while it attends the block; the last step only
  computes. Joint tokens: member i appends its share T_i = split_lengths(T, r)[i] of the joint
  queries to its queries (those rows see every block like its own); all its rows attend the joint
  K/V once (before the loop for "front", after it for "rear"); after the loop every member sends
  its finished joint rows, out and LSE in the accumulation dtype, B*h*T_i*(D+1) elements, to
  every other member.
- USP: Ulysses scatter, ring of r over member j of every group, Ulysses gather (with the joint output).
- Token runs (chunks > 1, ring and USP): each block travels as the runs sharding.run_pieces cuts
  (run_lengths: the last two a half and a quarter of the others; USP: read from member j's own
  tokens on, sharding.run_starts), one message each.
- Torus (u x t x r, consecutive groups of u, teams of t groups): Ulysses scatter inside the group;
  t-1 exchanges, step k from member m of a team to member (m+k) % t (same position g in its group):
  q, k, v of the group's tokens for that member's H/(u*t) heads, K/V as the raw head range of the
  sub-slice of the K/V member g holds after the scatter (GQA: fitted after receipt, so fewer bytes
  than fitted heads); t-1 output messages home (B*S_group*H/(u*t)*D each); ring factor: r-1 steps
  of the team's fitted K/V stacked; Ulysses gather; joint: (out, lse) partials across the r teams,
  then an all-gather of the joint output over the team's u*t ranks.

"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .algorithms.ulysses import head_ranges
from .sharding import (can_fold, fold_lengths, folded_problem, group_lengths, ring_runs, run_pieces,
                       run_size, run_starts, split_lengths)
from .topology import Topology

# ------------------------------------------------------------------------------------------ dtypes
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def as_dtype(dtype) -> torch.dtype:
    """torch.dtype from a dtype or a name ("bf16", "bfloat16", "fp16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[key]


def wire_bytes(problem) -> int:
    """Bytes per element of the call's q/k/v and output messages (Problem.wire_dtype, else its
    dtype); the joint (out, lse) partials travel exact (acc_bytes)."""
    return dtype_bytes(problem.wire_dtype or problem.dtype)


def dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=as_dtype(dtype)).element_size()


def acc_bytes(dtype) -> int:
    """Bytes of the accumulation dtype (float32; float64 stays float64)."""
    return 8 if as_dtype(dtype) == torch.float64 else 4


# ------------------------------------------------------------------------------------------ FLOPs
def visible_pairs(q_off: int, sq: int, k_off: int, sk: int, causal: bool) -> int:
    """Query-key pairs attention computes: all sq*sk, or with a causal mask over global positions
    (query at q_off+i sees key at k_off+j iff k_off+j <= q_off+i) only the visible ones."""
    if sq <= 0 or sk <= 0:
        return 0
    if not causal:
        return sq * sk
    d = q_off - k_off + 1  # row i sees min(max(d + i, 0), sk) keys

    def s(a, b):  # sum of (d + i) for i in [a, b)
        return 0 if b <= a else (b - a) * d + (a + b - 1) * (b - a) // 2

    lo = min(sq, max(0, -d + 1))       # first row with d + i >= 1
    hi = min(sq, max(lo, sk - d))      # first row with d + i >= sk
    return s(lo, hi) + (sq - hi) * sk


def attention_flops(batch: int, pairs: int, heads: int, head_dim: int) -> float:
    """4*B*pairs*h*D: two matmuls (QK^T and PV) of 2 FLOPs per multiply-add."""
    return 4.0 * batch * pairs * heads * head_dim


def call_flops(problem) -> float:
    """FLOPs of the whole attention call on one device (image + joint tokens, all heads)."""
    S, T = problem.seq_total, problem.joint_len
    return attention_flops(problem.batch, visible_pairs(0, S + T, 0, S + T, problem.causal),
                           problem.heads, problem.head_dim)


# ---------------------------------------------------------------------------------- placements
def consecutive_groups(world: int, u: int) -> tuple:
    return tuple(tuple(g * u + j for j in range(u)) for g in range(world // u))


def per_node_groups(topology: Topology, u: int) -> tuple:
    """Groups of u taken from each node's ranks in turn (nodes in id order, ranks ascending)."""
    order = sorted(range(topology.world_size), key=lambda r: (topology.node[r], r))
    return tuple(tuple(order[g * u:(g + 1) * u]) for g in range(topology.world_size // u))


def groups_contiguous(groups) -> bool:
    """Every group's members are consecutive ranks in ascending order (causal needs this: the
    group's tokens must be contiguous positions in member order)."""
    return all(list(g) == list(range(g[0], g[0] + len(g))) for g in groups)


# ---------------------------------------------------------------------------------- messages
Msg = Tuple[int, int, int]  # (src, dst, nbytes)


@dataclass
class Phase:
    name: str
    msgs: List[Msg]
    compute: Dict[int, float]  # rank -> FLOPs in this phase
    overlapped: bool = False
    mem: Dict[int, float] = field(default_factory=dict)  # rank -> local memory bytes
    # Parts messages (transport.base.Parts): memory bytes each side moves per wire byte of a
    # message the transport stages (packed before the send, unpacked after the wait: every link
    # but shm, costmodel.CostModel.phase_mem; every link when the wire dtype differs, cast);
    # 0: contiguous messages, sent as they are
    staged: float = 0.0
    cast: bool = False


def scatter_phase(name, groups, seq, B, D, e, hq, hk, w=None) -> "Phase":
    """Ulysses' scatter of q, k, v inside every group (streamattn.algorithms.ulysses.post_scatter):
    member j sends each member i its tokens for i's hq query heads and hk[i] K/V heads. The
    messages are Parts: a peer's slices go from q, k, v into its slot and from the slot into the
    final buffers (the put and the copy-out, priced with the bytes), so locally only member j's
    own slice is copied into place (read + write). A message staged through a buffer (to another
    node, over gloo) adds a packing copy on each side (Phase.staged; larger than a slot: not
    priced). e / w: bytes per element in memory / on the wire (default e)."""
    u = len(groups[0])
    msgs = [(g[j], g[i], B * seq[g[j]] * (hq + 2 * hk[i]) * D * (w or e))
            for g in groups for j in range(u) for i in range(u) if i != j]
    mem = {m: 2 * e * B * D * seq[m] * (hq + 2 * hk[j])
           for g in groups for j, m in enumerate(g)}
    return Phase(name, msgs, {}, mem=mem, staged=2 * e / (w or e), cast=(w or e) != e)


def merge_bytes(dtype) -> int:
    """Memory traffic per output element of one `merge.update_out_and_lse` as written (unfused
    torch ops on the float32 accumulator): out.mul_ (r+w 4+4), block_out.to(acc) (r e, w 4),
    * w_new (r+w 4+4), add_ (r 4+4, w 4) = 32 + e bytes."""
    return 32 + dtype_bytes(dtype)


def fitted_kv(q_range, kv_range, group_size: int) -> int:
    """K/V heads a member holds after `ulysses.fit_kv_heads`: its own K/V heads when its query heads
    map onto them in the standard GQA way, else one K/V head per query head (expanded)."""
    hq, hk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
    want = [(q_range[0] + i) // group_size - kv_range[0] for i in range(hq)]
    if hq % hk == 0 and want == [i // (hq // hk) for i in range(hq)]:
        return hk
    return hq


def phases(problem, u: int, groups, chunks: int = 1, joint_all: bool = False) -> List[Phase]:
    """Every step of the call for Ulysses groups `groups` (u members each; rings = member j of
    every group, in group order), with exact message sizes, per-rank FLOPs and per-rank local
    memory traffic (packing copies, LSE merges). chunks > 1 with a ring (r > 1): every ring step's
    block travels as `chunks` token runs (ring.ring_core), one message and one merge each.
    joint_all with a ring: every member attends all T joint queries (ring.ring_core), so no
    all-gather of joint rows over the ring; r x the joint queries' FLOPs."""
    B, H, Hk, D = problem.batch, problem.heads, problem.kv_heads, problem.head_dim
    T, causal = problem.joint_len, problem.causal
    e, ea, w = dtype_bytes(problem.dtype), acc_bytes(problem.dtype), wire_bytes(problem)
    mb = merge_bytes(problem.dtype)
    seq, offs = problem.seq_lens, problem.offsets
    r = len(groups)
    q_ranges, kv_ranges = head_ranges(H, Hk, u)
    hq = H // u
    hk = [b - a for a, b in kv_ranges]  # K/V heads member j receives in the all-to-all
    hkf = [fitted_kv(q_ranges[j], kv_ranges[j], H // Hk) for j in range(u)]  # ... and holds after
    phases: List[Phase] = []
    seg_lens = group_lengths(seq, groups)
    seg_offs = [offs[g[0]] for g in groups]
    members = [(gi, j, m) for gi, g in enumerate(groups) for j, m in enumerate(g)]

    if u > 1:
        phases.append(scatter_phase(f"Ulysses all-to-all q,k,v (u={u})", groups, seq, B, D, e, hq,
                                     hk, w))

    if r == 1:  # pure Ulysses (or local): the group's tokens + joint, for hq heads
        L = seg_lens[0] + T
        fl = attention_flops(B, visible_pairs(0, L, 0, L, causal), hq, D)
        # my heads of the joint tokens copied in front of / behind the scatter's rows (read + write)
        mem = {m: 2 * e * B * T * (hq + 2 * hkf[j]) * D for gi, j, m in members}
        phases.append(Phase("attention (whole sequence, H/u heads)", [], {m: fl for m in groups[0]},
                             mem=mem))
    else:
        # the joint queries split over the ring members ride with their queries (ring.ring_core);
        # joint_all: every member attends all of them, in kernel calls of their own
        jsplit = [T] * r if joint_all else (split_lengths(T, r) if T else [0] * r)
        jl = {m: jsplit[gi] for gi, j, m in members}
        rows = {m: seg_lens[gi] + jl[m] for gi, j, m in members}
        joint_local = {m: attention_flops(B, rows[m] * T, hq, D) for m in rows} if T else {}
        joint_merge = {m: mb * B * hq * rows[m] * D for m in rows}
        stack = {m: 2 * e * 2 * B * seg_lens[gi] * hkf[j] * D for gi, j, m in members}
        if T and not joint_all:  # my queries and my share of the joint queries copied into one block
            phases.append(Phase("append my share of the joint queries to my queries", [], {},
                                 mem={m: 2 * e * B * hq * rows[m] * D for m in rows}))
        runs = 1 if problem.zigzag else ring_runs(seg_lens, chunks)
        # the step message: K and V stacked (torch.stack, pure ring) or each run cut out of the
        # block (ring._run); after a Ulysses scatter (u > 1) the whole block already lies stacked
        # in one buffer (post_scatter with stack_kv) and goes out as it is -- unless the member's
        # K/V heads are expanded to fit its query heads (ulysses.fit_kv_heads: an index_select,
        # one copy of the block)
        if runs == 1 and u > 1:
            stack = {m: stack[m] for gi, j, m in members if hkf[j] != hk[j]}
        if stack:
            phases.append(Phase("ring: stack K,V into one message"
                                + (f" per run ({runs})" if runs > 1 else "")
                                + (" (K/V heads fitted)" if runs == 1 and u > 1 else ""),
                                [], {}, mem=stack))
        cuts = []  # ring j: each block's run sizes as ring.ring_core cuts it (one run: the block)
        for j in range(u):
            first, lead = run_starts(seq, groups, j, causal)
            cuts.append([[run_size(p) for p in run_pieces(seg_lens[x], runs, first[x], lead[x])]
                         for x in range(r)])
        for t in range(r):
            msgs, comp, mem = [], {}, {}
            for j in range(u):
                ring = [g[j] for g in groups]
                for gi, m in enumerate(ring):
                    src = (gi - t) % r
                    if problem.zigzag:  # u == 1: member m holds two chunks (streamattn.zigzag)
                        pairs = sum(visible_pairs(qo, ql, ko, kl, causal)
                                    for qo, ql in problem.segments(m) for ko, kl in problem.segments(ring[src]))
                        skipped = pairs == 0
                    else:  # joint rows see every key (joint attention is never causal)
                        pairs = (visible_pairs(seg_offs[gi], seg_lens[gi], seg_offs[src], seg_lens[src], causal)
                                 + jl[m] * seg_lens[src])
                        skipped = causal and seg_offs[src] > seg_offs[gi] + seg_lens[gi] - 1
                    comp[m] = attention_flops(B, pairs, hq, D)
                    mem[m] = 0 if skipped else (1 if t == 0 else runs) * mb * B * hq * rows[m] * D
                    if t == 0 and T:  # the joint K/V, attended once my block is posted
                        comp[m] += joint_local[m]
                        mem[m] += joint_merge[m]
                    if t == r - 1:  # final cast of the accumulator
                        mem[m] += (ea + e) * B * hq * seg_lens[gi] * D
                    if t < r - 1:
                        msgs += [(m, ring[(gi + 1) % r], 2 * B * n * hkf[j] * D * w)
                                 for n in cuts[j][src]]
            name = f"ring step {t + 1}/{r}" + (" (compute only)" if t == r - 1 else "")
            phases.append(Phase(name, msgs, comp, overlapped=t < r - 1, mem=mem))
        if T and not joint_all:  # each member's finished joint rows (out and LSE) to the others
            msgs = [(g[j], other[j], B * hq * jl[g[j]] * (D + 1) * ea)
                    for j in range(u) for g in groups for other in groups
                    if other is not g and jl[g[j]]]
            # Parts: the others' rows land in place; my own rows are copied in (read + write)
            mem = {m: 2 * ea * B * hq * jl[m] * (D + 1) for m in rows}
            phases.append(Phase(f"all-gather the joint output rows over the ring (r={r})", msgs, {},
                                 mem=mem, staged=2.0, cast=w != e))

    if u > 1:
        # With joint tokens every message also carries the sender's heads of the joint output
        # (B*T*hq*D), which is how the joint output is all-gathered over the Ulysses group.
        msgs = [(g[i], g[j], B * (seq[g[j]] + T) * hq * D * w)
                for g in groups for j in range(u) for i in range(u) if i != j]
        # Parts: the pieces go from the kernel's output into the slots and from the slots into
        # their heads of the final output; only my own rows (and joint output) are copied in place
        mem = {m: 2 * e * B * D * hq * (seq[m] + T) for gi, j, m in members}
        phases.append(Phase(f"Ulysses all-to-all output{' and joint output' if T else ''} (u={u})",
                             msgs, {}, mem=mem, staged=2 * e / w, cast=w != e))
    return phases


# ------------------------------------------------------------------------ joint tokens folded
# The replicated text tokens can instead join the sharded sequence: rank r takes fold_lengths[r] of
# the T text rows as extra tokens of its shard, the plan runs plain (joint-free) attention over
# S + T tokens, and each rank's text rows of the output are all-gathered so that every rank returns
# the whole joint output, as the replicated schedule does. Exact for non-causal attention (the keys'
# order does not matter); it trades the replicated schedule's joint steps (joint K/V attended
# separately, joint (out, lse) partials gathered over the ring, the joint output gathered over the
# Ulysses group) for one all-gather of the joint output and text rows that travel with the image
# rows -- fewer blocking steps and the text work spread evenly.

def fold_phases(problem) -> Tuple[Phase, Phase]:
    """(before, after) the folded plan: each rank concatenates its text rows to its q, k, v (read +
    write); afterwards every rank sends its text rows of the output, B*t_r*H*D elements, to every
    other rank and concatenates the T rows (read + write)."""
    B, H, Hk, D = problem.batch, problem.heads, problem.kv_heads, problem.head_dim
    e, w, P = dtype_bytes(problem.dtype), wire_bytes(problem), problem.world_size
    lens = fold_lengths(problem)
    seq = folded_problem(problem).seq_lens
    pre = Phase("fold the joint rows into the local shard", [], {},
                mem={m: 2 * e * B * seq[m] * (H + 2 * Hk) * D for m in range(P)})
    msgs = [(a, b, B * lens[a] * H * D * w) for a in range(P) for b in range(P) if a != b and lens[a]]
    post = Phase("all-gather of the folded joint output", msgs, {},
                 mem={m: 2 * e * B * problem.joint_len * H * D for m in range(P)})
    return pre, post


# ---------------------------------------------------------------------------------- torus
@dataclass
class TorusParts:
    """Everything one Torus call does, mirroring streamattn/algorithms/torus.py message for message.

    pre / post: blocking phases before the torus exchange (intra Ulysses scatter) and after it
    (intra gather, joint output). steps[k-1]: the messages of exchange k (k = 1..t-1); exchange 1
    is posted right after the intra all-to-all, exchange k+1 once exchange k has arrived.
    block[rank][i]: (FLOPs, memory bytes) of the i-th block a rank attends (i = 0 is its local block, i = k the block of exchange k); with r == 1 the
    last block's work is split into last_a (earlier query blocks against the new K/V, finalised and
    their outputs sent home one by one) and last_b (the new queries against every K/V; then its
    output goes home). home_early / home_last: those output messages. ring: the ring-of-teams steps
    (r > 1, each posted then waited before its compute, i.e. blocking), followed by home_all (every
    output goes home after the ring)."""

    t: int
    r: int
    pre: List[Phase]
    post_ring: List[Phase]
    post: List[Phase]
    steps: List[List[Msg]]
    block: Dict[int, List[Tuple[float, float]]]
    last_a: Dict[int, Tuple[float, float]]
    home_early: List[Msg]
    home_last: List[Msg]
    # the exchange messages are Parts (torus.py): bytes each side copies per wire byte where the
    # transport stages them (Phase.staged; the sender before its local block, the receiver once
    # the exchange has arrived), and whether every link stages them (the cast wire)
    staged: float = 0.0
    cast: bool = False


def torus_parts(problem, u: int, t: int, groups) -> TorusParts:
    B, H, Hk, D = problem.batch, problem.heads, problem.kv_heads, problem.head_dim
    T, causal, strat = problem.joint_len, problem.causal, problem.joint_strategy
    e, ea, w = dtype_bytes(problem.dtype), acc_bytes(problem.dtype), wire_bytes(problem)
    mb = merge_bytes(problem.dtype)
    seq, offs = problem.seq_lens, problem.offsets
    n_groups = len(groups)
    r = n_groups // t
    q_u, kv_u = head_ranges(H, Hk, u)
    hq_u = H // u
    hk_raw = [b - a for a, b in kv_u]                                       # scatter: raw K/V heads
    hkf = [fitted_kv(q_u[g], kv_u[g], H // Hk) for g in range(u)]          # held after the scatter
    hq = hq_u // t                                                          # heads of one sub-slice
    glen = [sum(seq[x] for x in g) for g in groups]
    goff = [offs[g[0]] for g in groups]
    members = [(gi, g, x) for gi, grp in enumerate(groups) for g, x in enumerate(grp)]

    def sub_ranges(g):  # torus.py: head_ranges(qn heads, kn heads, t) of member g's holdings
        return head_ranges(hq_u, hkf[g], t)

    def pairs(qo, sq, ko, sk, c=causal):
        return visible_pairs(qo, sq, ko, sk, c)

    def fl(p):
        return attention_flops(B, p, hq, D)

    pre, post_ring, post = [], [], []
    # 1. intra-node all-to-all (scatter_heads over the group), exactly Ulysses' scatter
    if u > 1:
        pre.append(scatter_phase(f"Ulysses all-to-all q,k,v inside groups (u={u})", groups, seq, B,
                                  D, e, hq_u, hk_raw, w))
    # 2. the torus exchange: step k, member m of a team sends its group's tokens of sub-slice
    #    (m+k) % t to member (m+k) % t (same position g), raw K/V head range of that sub-slice
    steps: List[List[Msg]] = []
    for k in range(1, t):
        msgs = []
        for gi, g, x in members:
            team, m = divmod(gi, t)
            q_rng, kv_rng = sub_ranges(g)
            dst = (m + k) % t
            n = B * glen[gi] * (hq + 2 * (kv_rng[dst][1] - kv_rng[dst][0])) * D
            msgs.append((x, groups[team * t + dst][g], n * w))
        steps.append(msgs)
    # 3. block attention in arrival order: local block first, then the block of exchange k from
    #    member (m-k) % t; each (query block, K/V block) pair once; every attend merges by LSE
    block: Dict[int, List[Tuple[float, float]]] = {}
    last_a: Dict[int, Tuple[float, float]] = {}
    home_early: List[Msg] = []
    home_last: List[Msg] = []
    fin = (ea + e) * B * hq * D  # cast of a final accumulator per token (sent home / kept)
    for gi, g, x in members:
        team, m = divmod(gi, t)
        tg = lambda j: team * t + j  # noqa: E731  (global group index of team member j)
        order = [(m - k) % t for k in range(t)]
        seen: List[int] = []
        work = []
        for idx, j in enumerate(order):
            J = tg(j)
            f = mem = 0.0
            if T and strat == "front":
                f += fl(pairs(0, glen[J], 0, T, False))
                mem += mb * B * hq * glen[J] * D
            last = idx == t - 1 and r == 1
            fa = ma = 0.0
            for i in seen:  # earlier query blocks against the new K/V (final when last)
                I = tg(i)
                p = pairs(goff[I], glen[I], goff[J], glen[J])
                fa += fl(p)
                ma += mb * B * hq * glen[I] * D if p or not causal else 0.0
                if last:
                    if T and strat != "front":
                        fa += fl(pairs(0, glen[I], 0, T, False))
                        ma += mb * B * hq * glen[I] * D
                    if i != m:
                        ma += fin * glen[I]
                        home_early.append((x, groups[I][g], B * glen[I] * hq * D * w))
            for i in seen + [j]:  # the new query block against earlier K/V and its own
                I = tg(i)
                p = pairs(goff[J], glen[J], goff[I], glen[I])
                f += fl(p)
                mem += mb * B * hq * glen[J] * D if p or not causal else 0.0
            if T:  # joint queries against this group's tokens
                f += fl(pairs(0, T, 0, glen[J], False))
                mem += mb * B * hq * T * D
            if last:
                if T and strat != "front":
                    f += fl(pairs(0, glen[J], 0, T, False))
                    mem += mb * B * hq * glen[J] * D
                if j != m:
                    mem += fin * glen[J]
                    home_last.append((x, groups[J][g], B * glen[J] * hq * D * w))
                last_a[x] = (fa, ma)
            else:
                f, mem = f + fa, mem + ma
            work.append((f, mem))
            seen.append(j)
        block[x] = work
    # 4. ring factor: the team's K/V (every block, fitted, stacked) rotates around the r teams;
    #    each step is posted and waited before its compute (blocking), then every output goes home
    if r > 1:
        team_len = [sum(glen[x * t:(x + 1) * t]) for x in range(r)]
        team_off = [goff[x * t] for x in range(r)]
        hk2 = {}
        for gi, g, x in members:
            q_rng, kv_rng = sub_ranges(g)
            m = gi % t
            hk2[x] = fitted_kv(q_rng[m], kv_rng[m], hq_u // hkf[g])
        stack = {x: 2 * e * 2 * B * team_len[gi // t] * hk2[x] * D for gi, g, x in members}
        post_ring.append(Phase("ring of teams: stack the team's K,V", [], {}, mem=stack))
        for s in range(1, r):
            msgs, comp, mem = [], {}, {}
            for gi, g, x in members:
                team, m = divmod(gi, t)
                cur = (team - s + 1) % r  # whose K/V this rank holds (and forwards) now
                src = (team - s) % r
                nxt = groups[((team + 1) % r) * t + m][g]
                msgs.append((x, nxt, 2 * B * team_len[cur] * hk2[x] * D * w))
                f = m_ = 0.0
                for i in range(t):
                    I = team * t + i
                    p = pairs(goff[I], glen[I], team_off[src], team_len[src])
                    f += fl(p)
                    m_ += mb * B * hq * glen[I] * D if p or not causal else 0.0
                comp[x], mem[x] = f, m_
            post_ring.append(Phase(f"ring of teams step {s}/{r - 1} (posted, waited, then attended)",
                                    msgs, comp, mem=mem))
        msgs, comp, mem = [], {}, {}
        for gi, g, x in members:
            team, m = divmod(gi, t)
            f = m_ = 0.0
            for i in range(t):
                I = team * t + i
                if T and strat != "front":
                    f += fl(pairs(0, glen[I], 0, T, False))
                    m_ += mb * B * hq * glen[I] * D
                if i != m:
                    m_ += fin * glen[I]
                    msgs.append((x, groups[I][g], B * glen[I] * hq * D * w))
            comp[x], mem[x] = f, m_
        post_ring.append(Phase("torus outputs sent home (after the ring)", msgs, comp, mem=mem))
    # 5. my group's tokens back: the kept block's cast, then the intra gather (Ulysses' gather)
    keep = {x: fin * glen[gi] + 2 * e * B * glen[gi] * hq_u * D for gi, g, x in members}
    if u > 1:
        msgs = [(grp[i], grp[j], B * seq[grp[j]] * hq_u * D * w)
                for grp in groups for j in range(u) for i in range(u) if i != j]
        mem = {x: keep[x] + 2 * e * B * D * (hq_u * (glen[gi] - seq[x]) + H * seq[x])
               for gi, g, x in members}
        post.append(Phase(f"Ulysses all-to-all output inside groups (u={u})", msgs, {}, mem=mem,
                          staged=2 * e / w, cast=w != e))
    else:
        post.append(Phase("torus: concatenate the outputs of the sub-slices", [], {}, mem=keep))
    # 6. joint output: team 0 adds the joint K/V; ring factor: (out, lse) partials across the r
    #    teams; then the head slices are all-gathered over the team's u*t ranks
    if T:
        comp = {x: fl(T * T) if gi < t else 0.0 for gi, g, x in members}
        mem = {x: (2 if gi < t else 1) * mb * B * hq * T * D for gi, g, x in members}
        post.append(Phase("joint queries: merge the partials", [], comp, mem=mem))
        if r > 1:
            n = (B * hq * T * D + B * hq * T) * ea
            msgs = []
            for gi, g, x in members:
                m = gi % t
                for y in range(r):
                    if y != gi // t:
                        msgs.append((x, groups[y * t + m][g], n))
            mem = {x: (r - 1) * mb * B * hq * T * D for gi, g, x in members}
            post.append(Phase(f"ring all-gather of joint (out, lse) (r={r})", msgs, {}, mem=mem))
        msgs = []
        for gi, g, x in members:
            team = gi // t
            team_ranks = [y for grp in groups[team * t:(team + 1) * t] for y in grp]
            msgs += [(x, y, B * T * hq * D * w) for y in team_ranks if y != x]
        mem = {x: 2 * e * B * T * hq_u * t * D for gi, g, x in members}
        post.append(Phase(f"all-gather of joint output over the team (u x t = {u * t})", msgs, {},
                           mem=mem))
    return TorusParts(t, r, pre, post_ring, post, steps, block, last_a, home_early, home_last,
                      staged=2 * e / w, cast=w != e)


def torus_messages(parts: TorusParts) -> List[Tuple[str, List[Msg]]]:
    out = [(p.name, list(p.msgs)) for p in parts.pre if p.msgs]
    for k, msgs in enumerate(parts.steps, 1):
        out.append((f"torus exchange {k}/{parts.t - 1} q,k,v", list(msgs)))
    if parts.home_early:
        out.append(("torus outputs sent home as final (early blocks)", list(parts.home_early)))
    if parts.home_last:
        out.append(("torus outputs sent home as final (last block)", list(parts.home_last)))
    out += [(p.name, list(p.msgs)) for p in parts.post_ring + parts.post if p.msgs]
    return out


def messages(problem, u: int, groups, torus_degree: Optional[int] = None,
             chunks: int = 1, fold: bool = False, joint_all: bool = False) -> List[Tuple[str, List[Msg]]]:
    """(step name, [(src, dst, nbytes)]) for every communication step, in order.
    torus_degree=t: the Torus algorithm over `groups` (all P/u groups, in team order: team x is
    groups x*t .. x*t+t-1; ring factor r = len(groups) / t). chunks > 1 (pure Ulysses): every
    step of each head-group chunk (chunk_problem), chunk by chunk (same messages and bytes as the
    code, which posts every chunk's scatter first); chunks > 1 with a ring (USP, ring): every
    ring step's block as `chunks` token-run messages. fold: the joint tokens folded into the
    sequence (folded_problem, then the joint output all-gather). joint_all (USP, ring): every
    ring member attends all joint queries (phases)."""
    if fold:
        if not can_fold(problem):
            raise ValueError("no joint tokens to fold (or causal / zigzag attention)")
        post = fold_phases(problem)[1]
        return (messages(folded_problem(problem), u, groups, torus_degree, chunks)
                + [(post.name, list(post.msgs))])
    if chunks > 1 and len(groups) > 1 and torus_degree is None:
        return [(p.name, list(p.msgs)) for p in phases(problem, u, groups, chunks, joint_all) if p.msgs]
    if chunks > 1 and chunks_valid(problem, u, chunks):
        sub = [(p.name, list(p.msgs)) for p in phases(chunk_problem(problem, chunks), u, groups) if p.msgs]
        out = []
        for c in range(chunks):
            out += [(f"chunk {c + 1}/{chunks}: {n}", m) for n, m in sub]
        return out
    if torus_degree is not None:
        return torus_messages(torus_parts(problem, u, torus_degree, groups))
    return [(p.name, list(p.msgs)) for p in phases(problem, u, groups, joint_all=joint_all) if p.msgs]


def bytes_sent(problem, u: int, groups, torus_degree: Optional[int] = None, chunks: int = 1,
               fold: bool = False, joint_all: bool = False) -> List[int]:
    """Exact payload bytes every rank sends in one forward call."""
    out = [0] * problem.world_size
    for _, msgs in messages(problem, u, groups, torus_degree, chunks, fold, joint_all):
        for a, _, n in msgs:
            out[a] += n
    return out



def chunk_problem(problem, chunks: int):
    """Chunk c of Ulysses pipelined over `chunks` head groups (ulysses.py _pipelined) is itself
    the Ulysses problem on heads / chunks query and kv_heads / chunks K/V heads."""
    import dataclasses

    return dataclasses.replace(problem, heads=problem.heads // chunks,
                               kv_heads=problem.kv_heads // chunks)


def chunks_valid(problem, u: int, chunks: int) -> bool:
    """ulysses.py runs chunked only when every chunk holds whole K/V groups. (A ring's steps cut
    into token runs, USP and ring with chunks > 1: ring_chunks_valid.)"""
    H, g = problem.heads, problem.heads // problem.kv_heads
    return chunks > 1 and (H // u) % chunks == 0 and (H // u // chunks) % g == 0


def ring_chunks_valid(problem, groups, chunks: int) -> bool:
    """Ring steps in `chunks` token runs (USP, ring): any ring (two or more groups), except the
    zigzag layout's own ring (algorithms/zigzag.py) and blocks shorter than the runs
    (sharding.ring_runs)."""
    seg_lens = group_lengths(problem.seq_lens, groups)
    return len(groups) > 1 and not problem.zigzag and ring_runs(seg_lens, chunks) == chunks > 1


def per_rank_bytes(problem, u: int, groups, node_of, torus_degree: Optional[int] = None,
                   chunks: int = 1, fold: bool = False, joint_all: bool = False) -> List[Dict[str, int]]:
    """[{"intra", "inter", "messages"}] per rank for one call: what the transport byte counters of
    the execution must read (a message is inter-node when node_of[src] != node_of[dst])."""
    out = [{"intra": 0, "inter": 0, "messages": 0} for _ in range(problem.world_size)]
    for _, msgs in messages(problem, u, groups, torus_degree, chunks, fold, joint_all):
        for a, b, n in msgs:
            out[a]["inter" if node_of[a] != node_of[b] else "intra"] += n
            out[a]["messages"] += 1
    return out


def node_ingress_bytes(problem, u: int, groups, node_of, torus_degree: Optional[int] = None,
                       fold: bool = False, joint_all: bool = False) -> Dict[int, int]:
    """Bytes every node receives from other nodes in one call (the wire half of the limit)."""
    out: Dict[int, int] = defaultdict(int)
    for _, msgs in messages(problem, u, groups, torus_degree, fold=fold, joint_all=joint_all):
        for a, b, n in msgs:
            if node_of[a] != node_of[b]:
                out[node_of[b]] += n
    return dict(out)
