"""The planner: the machine decides the factorization.

    from streamattn.planner import make_plan, plan_for
    plan = plan_for(4096, 24, 128, joint_len=512, topology="h100x8-2node")
    print(plan.explain())

`make_plan(problem, topology)` enumerates every candidate (algorithm in ulysses / ring / usp, every
u * r = P, rank placements; torus, every u * t * r = P with t >= 2 and consecutive Ulysses groups
that stay inside a node), drops the invalid ones with the reason kept, costs the rest with
`streamattn.costmodel` and returns the cheapest as a `Plan` (ties: the fixed enumeration order,
larger Ulysses degree first, consecutive placement before per-node, ulysses/ring/usp before torus:
Torus wins only when it is strictly cheaper).

Determinism: the plan is a pure function of (problem, topology, compute_rate). Only when no rate is
known (compute_rate None and topology.peak_flops None, i.e. CPU ranks) does it time the local CPU
kernel, and that number differs between processes. The caller must then make the rate identical
on every rank before planning (recommended: rank 0's `measure_cpu_rate()` travels with the
metadata all-gather and every rank passes it as compute_rate), or have rank 0 plan and broadcast
`plan.to_json()`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import weakref
from typing import Dict, List, Optional, Union

from .calibration import (block_shape, block_times, cache_entry, load_cache, resolve_memory_bandwidth,
                          resolve_rate, run_rate, run_shape, save_cache)
from .costmodel import CostModel
from .schedule import (as_dtype, attention_flops, chunks_valid, consecutive_groups, groups_contiguous,
                       per_node_groups, ring_chunks_valid)
from .plan import ALGORITHMS, Candidate, Plan, divisors, label, torus_degree
from .problem import Problem
from .topology import LinkKind, Topology, kernel_hash, usable_cores
from .sharding import can_fold, folded_problem, group_lengths, ring_runs, split_lengths

DEFAULT_TOPOLOGY = "h100x8-2node"
_REL_TIE = 1e-9
CPU_TIE = 0.08  # see make_plan: candidates predicted this close count as tied on CPU groups
# wire_bound: a call whose transfer outlasts its compute is still paced by the cores when the rest
# of it (the CPU the exchanges, copies and waits cost on shared cores) is more than a quarter of
# the predicted time. Measured over the 2x2 / 2x4 matrices (the picked plan's own network bytes at
# the probed link rate over its prediction): at 200 Mbit/s 0.81-0.99, and the plans in token runs
# picked there ran 1.05-1.32x faster than the unchunked USP of the same run (the 27th matrix, all
# ten cells); at 1 Gbit/s 0.17-0.70 (the flux cells' transfers outlast the modelled compute), and
# runs picked there ran 0.97-1.10x the unchunked plan's time, 1.03x on average (12 pairs).
WIRE_SHARE = 0.75

# The algorithms make_plan costs (streamattn.api plans a forced algorithm with make_plan when it is
# listed here).
COSTED_ALGORITHMS = ("ulysses", "ring", "usp", "torus")
# Head-group chunk counts costed for pure Ulysses (ulysses.py pipelines each chunk's all-to-alls
# with the previous chunk's attention); kept only when every chunk holds whole K/V groups, and only
# on CPU topologies (no declared peak rate), where the kernel is calibrated at the chunk's shape: on
# GPUs smaller all-to-alls and more kernel launches cost what the model does not see.
CHUNKS = (2, 4)
# Token runs per ring step costed for ring and USP (ring.ring_core forwards and attends each run as
# it arrives: the last block's compute hides behind its own arrival), CPU topologies only, like
# CHUNKS. Measured on the emulated 2x2 at 200 Mbit/s (text-free 4096 tokens, USP 2x2): 1 run 434-453
# ms, 2 runs 414, 4 runs 387-392, 8 runs 396, 16 runs 408.
RING_CHUNKS = (2, 4, 8)


def network_bytes(c: Candidate) -> int:
    """Bytes the busiest rank of candidate `c` sends over network links in one call."""
    return sum(n for kind, n in c.bytes_by_kind if LinkKind(kind).is_network)


def exchange_rounds(c: Candidate) -> int:
    """How many rounds that each wait on peers candidate `c` cuts an exchange into: its Ulysses
    chunks or a ring's token runs (`chunks`), a Torus' t - 1 exchanges and the t - 1 outputs it
    sends home (the partial outputs and LSEs its team computed for others: a second wait on
    peers each, and a merge)."""
    return 2 * (torus_degree(c) - 1) if c.algorithm == "torus" else c.chunks


def groups_cross_nodes(groups, topology: Topology) -> bool:
    """True when one of the rank groups `groups` has members on two nodes."""
    return any(len({topology.node[m] for m in g}) > 1 for g in groups)


def all_to_all_crosses_nodes(c: Candidate, topology: Topology) -> bool:
    """True when a Ulysses group of candidate `c` spans nodes: its all-to-alls then cross the
    network as blocking steps (every rank waits on the wire at once, no compute under it), where a
    ring's or a Torus' inter-node transfer runs under the attention of the blocks already held."""
    return c.ulysses_degree > 1 and groups_cross_nodes(c.groups, topology)


def wire_bound(c: Candidate, topology: Topology) -> bool:
    """True when candidate `c`'s network bytes at the slowest inter-node link's rate (shared by the
    ranks of a node) take at least its compute time and WIRE_SHARE of its predicted time: the call
    is bound by the wire, not by the cores."""
    links = [topology.link(a, b) for a in range(topology.world_size) for b in range(topology.world_size)
             if topology.node[a] != topology.node[b]]
    if not links:
        return False
    slow = min(links, key=lambda lk: lk.bandwidth_Bps / max(1, lk.shared_by))
    wire = slow.transfer_time(network_bytes(c), concurrent=topology.ranks_per_node or 1)
    return wire >= c.compute_s and wire >= WIRE_SHARE * c.predicted_s


def _algo(u: int, world: int) -> str:
    return "ulysses" if u == world else "ring" if u == 1 else "usp"


def enumerate_candidates(problem: Problem, topology: Topology) -> List[Candidate]:
    """Every (algorithm, u, r, placement), in the fixed tie-break order, not yet costed. Dropped
    ones carry their reason."""
    P, H = problem.world_size, problem.heads
    out: List[Candidate] = []
    for u in sorted(divisors(P), reverse=True):
        r, algo = P // u, _algo(u, P)
        placements = [("consecutive", consecutive_groups(P, u))]
        if 1 < u < P or (u == 1 and P > 1):
            pn = per_node_groups(topology, u)
            if pn != placements[0][1]:
                placements.append(("per-node", pn))
        for name, groups in placements:
            reason = ""
            if H % u:
                reason = f"{H} heads not divisible by u={u}"
            elif getattr(problem, "zigzag", False) and u > 1:
                reason = "the zigzag layout runs as a ring over every rank (u=1)"
            elif problem.causal and not groups_contiguous(groups):
                reason = ("causal attention needs each Ulysses group to hold contiguous positions "
                          "(consecutive groups)")
            out.append(Candidate(algo, u, r, groups, name, dropped=reason))
            if algo == "ulysses" and not reason and topology.peak_flops is None:
                out += [Candidate(algo, u, r, groups, name, chunks=c) for c in CHUNKS
                        if chunks_valid(problem, u, c)]
            if algo in ("ring", "usp") and not reason and topology.peak_flops is None:
                out += [Candidate(algo, u, r, groups, name, chunks=c) for c in RING_CHUNKS
                        if ring_chunks_valid(problem, groups, c)]
    if not getattr(problem, "zigzag", False):
        out += torus_candidates(problem, topology)
    if can_fold(problem):  # each runnable candidate again with the joint tokens folded in
        out += [dataclasses.replace(c, joint_fold=True) for c in out if not c.dropped]
    if problem.joint_len and not problem.causal and not problem.zigzag:
        # each ring again with all joint queries on every member (no joint all-gather after it)
        out += [dataclasses.replace(c, joint_all=True) for c in out
                if not c.dropped and not c.joint_fold and c.algorithm in ("ring", "usp")]
    return out


def torus_candidates(problem: Problem, topology: Topology) -> List[Candidate]:
    """Every Torus (u, t, r) with u * t * r = P and t >= 2, consecutive Ulysses groups (team x =
    groups x*t .. x*t+t-1), larger u first, then larger t. Dropped: u * t not dividing the heads,
    or a Ulysses group that would cross nodes (the intra all-to-all is the blocking part: it must
    stay on the fast links)."""
    P, H = problem.world_size, problem.heads
    out: List[Candidate] = []
    for u in sorted(divisors(P), reverse=True):
        groups = consecutive_groups(P, u)
        crosses = groups_cross_nodes(groups, topology)
        for t in sorted(divisors(P // u), reverse=True):
            if t < 2:
                continue
            r = P // (u * t)
            reason = ""
            if H % (u * t):
                reason = f"{H} heads not divisible by u x t = {u} x {t}"
            elif crosses:
                reason = (f"consecutive Ulysses groups of u={u} cross nodes (torus keeps its blocking "
                          "all-to-all inside a node)")
            out.append(Candidate("torus", u, r, groups, "consecutive", dropped=reason))
    return out


def make_plan(problem: Problem, topology: Union[Topology, str], *, algorithm: str = "auto",
              ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None,
              compute_rate: Optional[float] = None,
              memory_bandwidth: Optional[float] = None,
              block_rates: Optional[Dict[tuple, float]] = None, joint_fold: str = "auto",
              sync_s: float = 0.0, overlap: float = 1.0, net_cpu: float = 0.0,
              joint_all: str = "auto", host_waits: bool = False) -> Plan:
    """The cheapest valid plan for `problem` on `topology` (a Topology, spec, machine name or
    .json path, describing exactly problem.world_size ranks).

    algorithm / ulysses_degree / ring_degree restrict the choice; a forced choice that cannot run
    raises ValueError naming the reason and the valid options. algorithm="torus": ulysses_degree
    (default: the ranks of a node when a valid split has it, else the cheapest) and ring_degree
    (default: the cheapest valid) give u and r, t = P / (u * r). compute_rate: FLOP/s per rank
    (default topology.peak_flops, else the measured CPU rate -- see the module docstring).
    memory_bandwidth: bytes/s of a rank's local memory for the memory-bound work (packing copies,
    LSE merges); default from the device table in costmodel, measured on CPU topologies.
    block_rates: {calibration.block_shape: FLOP/s} measured on this machine at the block shapes
    the candidates run (see `agreed_calibration`); a candidate whose shape is listed is costed at
    that rate instead of compute_rate, a ring in token runs at its runs' (calibration.run_rate).
    sync_s: seconds one synchronising exchange costs beyond its bytes on this group; overlap: the
    share of an overlapped step's communication that hides behind compute; net_cpu: CPU seconds
    per byte one side of a network transfer costs (all three measured on CPU groups, see
    `agreed_calibration`; their use: costmodel). host_waits: the rank's thread runs the attention
    itself (CPU groups; agreed_calibration says so), so it gets to a wait on a peer only after the
    compute posted before it; a GPU's host only enqueues kernels.
    joint_fold: "auto" (candidates with the joint tokens folded into the sequence compete when
    algorithm="auto" and no degree is forced), "always" (only folded candidates when the problem
    can fold: non-causal, joint tokens, contiguous) or "never" (STREAMATTN_JOINT_FOLD).
    joint_all: the same three for the ring / USP candidates whose ring members each attend all
    joint queries (ring.ring_core; non-causal calls with joint tokens; STREAMATTN_JOINT_ALL)."""
    topology = _topology(topology)
    for name, mode in (("joint_fold", joint_fold), ("joint_all", joint_all)):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"streamattn: {name}={mode!r}: expected 'auto', 'always' or 'never'")
    P, H = problem.world_size, problem.heads
    if topology.world_size != P:
        raise ValueError(f"topology {topology.name!r} describes {topology.world_size} ranks but the "
                         f"problem has {P} shards")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"streamattn: algorithm={algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if problem.kv_heads < 1 or H % problem.kv_heads:
        raise ValueError(f"streamattn: {H} query heads are not a multiple of {problem.kv_heads} K/V heads")
    if P == 1:  # costed only when the rate is known without measuring
        rate = compute_rate or topology.peak_flops
        src = "given" if compute_rate else topology.peak_flops_source
        mbw, mbw_src = (None, "")
        pred = None
        if rate:
            mbw, mbw_src = resolve_memory_bandwidth(topology, memory_bandwidth)
            pred = CostModel(topology, rate, mbw).cost(problem, "local", 1, ((0,),)).predicted_s
        return Plan("local", 1, 1, reason="group of size 1", predicted_s=pred,
                    context=_context(problem, topology, rate, src, mbw, mbw_src))
    torus = algorithm == "torus"
    u_forced = _forced_u(P, H, algorithm, ulysses_degree, ring_degree)

    rate, rate_src = resolve_rate(topology, compute_rate, problem.dtype)
    mbw, mbw_src = resolve_memory_bandwidth(topology, memory_bandwidth)
    model = CostModel(topology, rate, mbw, sync_s, overlap, net_cpu, host_waits)
    cands: List[Candidate] = []
    rates = block_rates or {}
    for c in considered_candidates(problem, topology, joint_fold, joint_all):
        if not c.dropped:
            block, run = candidate_block_shape(problem, c), candidate_run_shape(problem, c)
            model.rate = rates.get(block, rate)
            c = model.cost(problem, c.algorithm, c.ulysses_degree, c.groups, c.placement,
                           torus_degree=torus_degree(c), chunks=c.chunks, fold=c.joint_fold,
                           joint_all=c.joint_all, run_rate=run_rate(rates, block, run) if run else None)
        cands.append(c)
    model.rate = rate
    if overlap < 1 and joint_all != "always":
        cands = _joint_all_dropped_where_compute_dearer(cands, sync_s)
    allowed, ring_degree = _admits(problem, topology, cands, algorithm, ulysses_degree, ring_degree,
                                   joint_fold, u_forced, joint_all)

    pool = [c for c in cands if allowed(c)]
    best = None
    for c in pool:
        if c.valid and (best is None or c.predicted_s < best.predicted_s * (1 - _REL_TIE)):
            best = c
    if best is not None and (sync_s > 0 or overlap < 1):
        # CPU groups: predictions within CPU_TIE of the cheapest are not told apart by the model
        # (its measured error there is larger); among them take the fewest bytes over the network
        # -- the plan whose time depends least on the shared, noisiest resource -- then the fewest
        # Ulysses chunks: chunking buys an overlap the model cannot tell apart inside the band, and
        # costs per-message CPU work it does not model (measured on 2x2, 4 ranks / 2 cores, at 300
        # Mbit/s: 2 chunks 1.08x slower than USP 2x2, the same network bytes, predicted cheaper)
        # -- but only where the network is the bottleneck: in a compute-bound call (its transfer at
        # the link rate below its compute, or below WIRE_SHARE of the predicted call: wire_bound)
        # the network is not what is noisy (the rule was made when, in stop 33, before jumbo
        # frames, USP 4x2 picked for its fewer bytes ran 1.09-1.19x Ulysses 8 on 2x4 at 1 Gbit/s,
        # flux 1024 + 256 tokens; that cell has gone the other way since, see below). There the fewest
        # exchange rounds win, then a plan whose Ulysses all-to-all stays inside the nodes over
        # one whose all-to-all crosses them (a blocking all-to-all over the network idles every
        # rank at once, where a ring's transfer runs under compute: at 1 Gbit/s, three matrices of
        # stops 38-39 on jumbo frames, Ulysses 4 / 8 ran 0.95-1.26x the USP of one node's Ulysses
        # degree, 1.02x or more in 29 of 30 cells, while predicted 1.00-1.14x of it in the 2x4
        # text-free cells, where auto took Ulysses 8 once), then the prediction.
        # Exchange rounds: Ulysses chunks, a Torus' t - 1 exchanges and t - 1
        # outputs sent home (Torus 1x4x1 / 2x4x1 picked inside the band ran 1.01-1.10x the best
        # fixed plan in three matrices at 1 Gbit/s, never faster; a Torus of t = 2, counted as one
        # round, tied the unchunked USP of its u and won on the prediction: at 1 Gbit/s Torus 4x2x1
        # ran 1.04-1.36x USP 4x2 in all ten 2x4 cells of two matrices, Torus 2x2x1 1.03-1.21x USP
        # 2x2 in all ten 2x2 ones, and auto's Torus 4x2x1 lost to yunchang's best by 15% at
        # text-free 4096) and a ring's token runs (picked
        # inside the band in compute-bound flux cells at 1 Gbit/s, 2 runs took 0.92-1.10x the
        # unchunked plan's time over four matrices, 1.02x on average). Where the wire is the bottleneck
        # a ring's runs are not counted: they add no all-to-all round, only waits on data already
        # in flight, and measured they pay where predicted (2x2 at 200 Mbit/s: 4 runs 1.12-1.16x
        # faster than 1), so the prediction orders them
        close = [c for c in pool if c.valid and c.predicted_s <= best.predicted_s * (1 + CPU_TIE)]
        wire = wire_bound(best, topology)
        cheapest, best = best, min(close, key=lambda c: (
            network_bytes(c) if wire else exchange_rounds(c),
            (c.chunks if c.algorithm == "ulysses" else 1) if wire else all_to_all_crosses_nodes(c, topology),
            c.predicted_s))
        tie_note = "" if best is cheapest else (
            f"; the fewest {'network bytes (then Ulysses chunks)' if wire else 'exchange rounds (then no blocking all-to-all across nodes)'} among those predicted within "
            f"{CPU_TIE:.0%} of the cheapest ({label(cheapest)}; this one "
            f"{best.predicted_s / cheapest.predicted_s:.3f}x of it)")
    else:
        tie_note = ""
    if best is None and torus:
        why = "; ".join(sorted({c.dropped for c in pool})) or "no torus split matches"
        ok = [f"{c.ulysses_degree}x{torus_degree(c)}x{c.ring_degree}" for c in cands
              if c.algorithm == "torus" and c.valid]
        raise ValueError(f"streamattn: algorithm='torus' ({_request(algorithm, ulysses_degree, ring_degree)}) "
                         f"cannot run: {why}; valid torus splits u x t x r for {H} heads on {P} ranks: "
                         f"{', '.join(ok) or 'none'}")
    if best is None:
        valid_u = sorted({c.ulysses_degree for c in cands if c.valid})
        why = "; ".join(sorted({c.dropped for c in pool})) or "no candidate"
        what = (f"ulysses_degree={u_forced}" if u_forced is not None else f"algorithm={algorithm!r}")
        raise ValueError(f"streamattn: {what} cannot run: {why}; valid ulysses degrees for {H} heads "
                         f"on {P} ranks: {', '.join(map(str, valid_u)) or 'none'}")

    forced = u_forced is not None or algorithm != "auto"
    runner = None
    for c in sorted((c for c in cands if c.valid and c is not best), key=lambda c: c.predicted_s):
        runner = c
        break
    if forced:
        reason = f"requested ({_request(algorithm, ulysses_degree, ring_degree)}): {label(best)}"
        # compared only with candidates costed at a calibrated rate when there is a calibration:
        # a forced call times only its own block shape (agreed_calibration), and a rate measured
        # at one shape against the generic one at another would make up the difference
        auto_best = min((c for c in cands if c.valid and (
            c is best or not block_rates or all(s in block_rates for s in candidate_shapes(problem, c)))),
            key=lambda c: c.predicted_s)
        if auto_best is not best and auto_best.predicted_s < best.predicted_s:
            reason += (f"; auto would pick {label(auto_best)}, predicted "
                       f"{best.predicted_s / auto_best.predicted_s:.2f}x faster")
    else:
        n = sum(c.valid for c in cands)
        reason = f"auto: {'chosen' if tie_note else 'cheapest'} of {n} costed candidates"
        if runner is not None and not tie_note:
            reason += (f"; {runner.predicted_s / best.predicted_s:.3f}x faster than the runner-up "
                       f"{label(runner)}")
        reason += tie_note
    return Plan(best.algorithm, best.ulysses_degree, best.ring_degree, groups=best.groups,
                predicted_s=best.predicted_s, reason=reason, candidates=tuple(cands),
                context=(_context(problem, topology, rate, rate_src, mbw, mbw_src) + _calibrated(block_rates)
                         + (f"\nSynchronising exchange on this group (measured): {sync_s * 1e3:.3g} ms"
                            if sync_s else "")
                         + (f"\nOversubscribed CPU: {overlap:.2g} of overlapped communication hides "
                            "behind compute" if overlap < 1 else "")
                         + (f"\nCPU per network byte and side (measured): {net_cpu * 1e9:.3g} ns"
                            if net_cpu else "")),
                torus_degree=torus_degree(best), chunks=best.chunks, joint_fold=best.joint_fold,
                joint_all=best.joint_all, cores_shared=overlap < 1.0)


def _calibrated(block_rates) -> str:
    if not block_rates:
        return ""
    parts = [f"[{b},{h},{sq},{sk},{d}] {r / 1e9:.3g}" for (b, h, sq, sk, d), r in sorted(block_rates.items())]
    return ("\nKernel calibrated at the candidates' block and token-run shapes [B,h,Sq,Sk,D] "
            "GFLOP/s per rank: " + ", ".join(parts))


def candidate_block_shape(problem: Problem, c: Candidate) -> tuple:
    """The kernel block shape candidate `c` runs (calibration.block_shape)."""
    p = folded_problem(problem) if c.joint_fold else problem
    return block_shape(p, c.algorithm, c.ulysses_degree, c.ring_degree, torus_degree(c))


def candidate_run_shape(problem: Problem, c: Candidate, chunks: Optional[int] = None) -> Optional[tuple]:
    """The kernel call of one token run of candidate `c`'s ring steps (calibration.run_shape;
    cost_ring_chunked prices the runs at its rate, calibration.run_rate), or of the same ring cut
    into `chunks` runs; None when its blocks arrive whole."""
    if c.chunks <= 1 or c.ring_degree <= 1 or c.algorithm not in ("ring", "usp"):
        return None
    p = folded_problem(problem) if c.joint_fold else problem
    runs = ring_runs(group_lengths(p.seq_lens, c.groups), chunks or c.chunks)
    return run_shape(candidate_block_shape(problem, c), runs) if runs > 1 else None


def candidate_shapes(problem: Problem, c: Candidate) -> tuple:
    """The kernel shapes timed to cost candidate `c`: its block, and for a ring in token runs the
    finest runs any candidate cuts that block into (the rate of coarser runs is interpolated
    between the two, calibration.run_rate)."""
    finest = candidate_run_shape(problem, c, max(RING_CHUNKS))
    return (candidate_block_shape(problem, c),) + ((finest,) if finest else ())


def _joint_all_dropped_where_compute_dearer(cands: List[Candidate], sync_s: float) -> List[Candidate]:
    """Ranks outnumbering cores: the all-joint-queries twin of a ring dropped, saying why, unless
    the transfer of the joint rows' all-gather it saves (its split twin's step, less the sync cost)
    takes longer than the compute it adds (its local time over the twin's). The model lets a
    ring step's compute hide behind its transfer, which shared cores do not: measured on the
    emulated clusters at 1 Gbit/s (flux 512 + 256: 0.4 MB of joint rows per node, ~3.4 ms on the
    wire, against ~3-5 ms of repeated joint queries) the variant ran 1.0-1.2x the split queries'
    time, at 200 Mbit/s (the same bytes, ~17 ms) 0.89-0.95x."""
    split = {_ring_key(c): c for c in cands if c.valid and not c.joint_all and not c.joint_fold}
    out = []
    for c in cands:
        twin = split.get(_ring_key(c)) if c.joint_all else None
        if c.valid and twin is not None:
            # the twins send the same messages but for the joint rows' all-gather (schedule.phases)
            saved = max(0.0, twin.comm_s - c.comm_s - sync_s)
            added = c.compute_s - twin.compute_s
            if saved <= added:
                c = dataclasses.replace(
                    c, dropped=f"on shared cores the joint queries it repeats ({added * 1e3:.3g} ms) "
                               f"cost more than the joint rows' transfer it saves ({saved * 1e3:.3g} ms)")
        out.append(c)
    return out


def considered_candidates(problem: Problem, topology: Topology, joint_fold: str = "auto",
                          joint_all: str = "auto") -> List[Candidate]:
    """enumerate_candidates with the folded twins only when folding is on (joint_fold "auto" or
    "always" and a problem that can fold); with "always" the replicated candidates stay only as
    dropped ones, to show why. joint_all "never": without the all-joint-queries twins of the rings;
    "always": without the rings they are twins of."""
    folding = can_fold(problem) and joint_fold != "never"
    cands = [c for c in enumerate_candidates(problem, topology)
             if not (not folding if c.joint_fold else
                     (folding and joint_fold == "always" and not c.dropped))]
    if joint_all == "never":
        return [c for c in cands if not c.joint_all]
    if joint_all == "always":
        twins = {_ring_key(c) for c in cands if c.joint_all}
        return [c for c in cands if c.joint_all or c.joint_fold or _ring_key(c) not in twins]
    return cands


def _ring_key(c: Candidate) -> tuple:
    """What a ring / USP candidate and its all-joint-queries twin have in common."""
    return (c.algorithm, c.ulysses_degree, c.groups, c.chunks)


def _admits(problem, topology, cands, algorithm, ulysses_degree, ring_degree, joint_fold, u_forced,
            joint_all="auto"):
    """(predicate: may candidate c answer the request?, the ring degree the request resolves to).
    u_forced: _forced_u of the request (None for torus or a free choice)."""
    torus = algorithm == "torus"
    # algorithm="torus" without ulysses_degree: Ulysses over the ranks of a node (the design, and
    # what streamattn.plan.torus_plan defaulted to) when such a split is valid, else any u
    torus_u = ulysses_degree
    if torus and torus_u is None and any(
            c.algorithm == "torus" and c.valid and c.ulysses_degree == topology.ranks_per_node
            and ring_degree in (None, c.ring_degree) for c in cands):
        torus_u = topology.ranks_per_node
    # ... and without ring_degree: ring factor 1 (the README's default) when that split is valid
    if torus and ring_degree is None and any(
            c.algorithm == "torus" and c.valid and c.ring_degree == 1
            and torus_u in (None, c.ulysses_degree) for c in cands):
        ring_degree = 1

    def allowed(c: Candidate) -> bool:
        if c.joint_fold and joint_fold == "auto" and (algorithm != "auto" or u_forced is not None):
            return False  # a forced choice keeps the joint steps unless folding is asked for
        if c.joint_all and joint_all == "auto" and (algorithm != "auto" or u_forced is not None):
            return False  # ... and its ring's joint queries split over the members
        if torus:
            return (c.algorithm == "torus" and torus_u in (None, c.ulysses_degree)
                    and ring_degree in (None, c.ring_degree))
        if c.algorithm == "torus":  # never the answer to a forced ulysses / ring / usp request
            return algorithm == "auto" and u_forced is None
        if c.chunks > 1 and (algorithm != "auto" or u_forced is not None):
            return False  # a forced choice runs the classic one-shot all-to-all
        if u_forced is not None:
            return c.ulysses_degree == u_forced
        return algorithm in ("auto", "usp") or c.algorithm == algorithm

    return allowed, ring_degree


def calibration_shapes(problem: Problem, topology: Topology, *, algorithm: str = "auto",
                       ulysses_degree: Optional[int] = None, ring_degree: Optional[int] = None,
                       joint_fold: str = "auto", joint_all: str = "auto") -> List[tuple]:
    """The distinct block shapes of the valid candidates a make_plan request with these arguments
    can answer with (every candidate's for "auto"; only the forced plan's for a fully forced one),
    in a fixed order (same on every rank). [] when the request cannot run (make_plan raises)."""
    cands = considered_candidates(problem, topology, joint_fold, joint_all)
    try:
        u_forced = _forced_u(problem.world_size, problem.heads, algorithm, ulysses_degree,
                             ring_degree)
    except ValueError:
        return []
    allowed, _ = _admits(problem, topology, cands, algorithm, ulysses_degree, ring_degree,
                         joint_fold, u_forced, joint_all)
    return sorted({s for c in cands if c.valid and allowed(c) for s in candidate_shapes(problem, c)})


def agreed_calibration(transport, problem: Problem, topology: Topology, tag: int, *,
                       algorithm: str = "auto", ulysses_degree: Optional[int] = None,
                       ring_degree: Optional[int] = None, joint_fold: str = "auto",
                       joint_all: str = "auto") -> dict:
    """{"block_rates": {shape: FLOP/s}, "sync_s": seconds, "overlap": share, "net_cpu": s/byte,
    "host_waits": True} for make_plan with the same request arguments, identical on every rank (sync_s:
    `measure_sync` and net_cpu: `measure_net_cpu`, both measured once per transport; overlap:
    `core_share`). Every rank times the kernel at the block shapes of the candidates the request can
    answer with (calibration_shapes: all of them for "auto", with the finest token run of each
    chunked ring; one for a fully forced plan) at the same moment, each shape's window started by
    a barrier (so the cores are shared as in the real call: without it, ranks that had finished
    their windows left the others a core to spare, and a shape timed last came out up to 2x too
    fast with 4 ranks on 2 cores), or reads this machine's
    cache, and all take the mean over the ranks; rank 0 caches the agreed times of the shapes
    measured (calibration.save_cache). The other candidates' shapes are rated too where every
    rank's cache holds them (make_plan's "auto would pick" note), never timed for it: a forced
    call timing a dozen shapes it cannot run cost ~0.3 s per new shape. Collective over the
    group."""
    import torch

    request = dict(algorithm=algorithm, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                   joint_fold=joint_fold, joint_all=joint_all)
    needed = calibration_shapes(problem, topology, **request)
    if not needed:
        return {}
    shapes = calibration_shapes(problem, topology, joint_fold=joint_fold, joint_all=joint_all)
    # Which shapes to time: the needed ones any rank's cache lacks (ranks on other machines may hold
    # other caches), every rank the same list, each window started together (a barrier), so each
    # rank times a shape while all compute -- not its last shapes while the others have finished.
    share = core_share(transport, tag)
    cached = load_cache(transport.size)
    lacks = torch.tensor([cache_entry(s, problem.dtype) not in cached for s in shapes], dtype=torch.int64)
    union = torch.stack(transport.all_gather_vector(lacks, tag)).amax(dim=0).tolist()
    kept = [(s, m) for s, m in zip(shapes, union) if s in needed or not m]
    shapes = [s for s, _ in kept]
    one = torch.zeros(1, dtype=torch.float64)
    times, new = block_times(shapes, problem.dtype, transport.size,
                             measure=[s for s, m in kept if m], cached=cached,
                             before_each=lambda: transport.all_gather_vector(one, tag), share=share)
    every = transport.all_gather_vector(torch.tensor(times, dtype=torch.float64), tag)
    agreed = torch.stack(every).mean(dim=0).tolist()
    if transport.rank == 0 and new:
        save_cache(transport.size, {k: t for s, t in zip(shapes, agreed)
                                    if (k := cache_entry(s, problem.dtype)) in new})
    rates = {}
    for s, t in zip(shapes, agreed):
        B, h, sq, sk, D = s
        rates[s] = attention_flops(B, sq * sk, h, D) / max(t, 1e-12)
    known = _group_terms.setdefault(transport, {})
    if "sync_s" not in known:
        known["sync_s"] = measure_sync(transport, tag)
    nodes = tuple(topology.node)
    if nodes not in known:
        known[nodes] = measure_net_cpu(transport, topology, tag)
    return {"block_rates": rates, "sync_s": known["sync_s"], "overlap": share,
            "net_cpu": known[nodes], "host_waits": True}


# The group's terms, measured once per transport (a group's ranks create and drop their transports
# together and agree on the topology, so every rank measures or reuses them at the same call):
# "sync_s" (measure_sync) and, per node assignment, net_cpu (measure_net_cpu: NET_CPU_BYTES x
# NET_CPU_ROUNDS over the network, ~0.1 s on a 200 Mbit/s link). Neither depends on the shape: the
# network stack's CPU per byte, the scheduling delay of one exchange. sync_s was measured at every
# planning before: on 4 ranks / 2 cores gloo's one-number all-gather takes 0.5 or 4 ms (a
# scheduler tick) from round to round, and the same plan of the same shape was predicted 44 ms
# when auto planned it and 29 ms when a forced request planned it next (2x2 at 1 Gbit/s, flux
# 512 + 256): the choice among close plans followed the noise.
_group_terms: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def core_share(transport, tag: int) -> float:
    """min(1, cores / threads computing) over the machines of the group: every rank sends its
    kernel's boot-id hash, its usable cores and its torch threads; ranks with the same hash share
    one machine's cores (an emulated cluster's nodes too). Collective over the group."""
    import torch

    mine = torch.tensor([kernel_hash(), usable_cores(), torch.get_num_threads()], dtype=torch.int64)
    demand, cores = {}, {}
    for row in transport.all_gather_vector(mine, tag):
        k, c, t = (int(x) for x in row.tolist())
        demand[k] = demand.get(k, 0) + max(1, t)
        cores[k] = c
    return min(1.0, min(cores[k] / demand[k] for k in demand))


SYNC_ROUNDS, SYNC_QUANTILE = 30, 0.1


def measure_sync(transport, tag: int, rounds: int = SYNC_ROUNDS) -> float:
    """Seconds one synchronising exchange costs on this group beyond its bytes: `rounds` all-gathers
    of one number, back to back on the group's own transport (so through shared memory and the
    network as a call's messages go), each timed; every rank's 10th percentile of its rounds, agreed
    as the mean over the ranks. On an idle machine with a core per rank this is tens of
    microseconds; with more ranks than cores it is the time a waiting rank needs for its peers to be
    scheduled. Back to back, with every rank asleep on the next, the rounds take either ~0.4 ms or a
    scheduler tick (~4 ms), in runs of either (4 ranks / 2 cores, gloo): their mean came out
    1.3-3.7 ms over 12 measurements while the same flux call took 29-34 ms in all of them, and the
    share of slow rounds drifts from measurement to measurement. Calls do not see the ticks' runs
    (their ranks compute between waits): fitting the model to measured calls (2x2 and 2x4 at
    1 Gbit/s, flux 512 and 1024 + 256, four plans each) gave 0.25-1 ms per exchange on 2x2 and
    0.5-2 ms on 2x4. Over 6-8 measurements the 10th percentile was 0.3-0.7 ms (2x2) and 1.8-2.6
    ms (2x4); the 25th 0.4-1.4 and 2.3-3.8 ms (it predicted the flux 512 calls of one whole matrix
    1.3-1.7x too slow), the mean 1.3-3.7 and 4-6.5 ms. Collective over the group."""
    import time

    import torch

    one = torch.zeros(1, dtype=torch.float64)
    # untimed: the ranks leave the previous collective at different times (rank 0 may be writing
    # the calibration cache)
    transport.all_gather_vector(one, tag)
    took = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        transport.all_gather_vector(one, tag)
        took.append(time.perf_counter() - t0)
    mine = torch.quantile(torch.tensor(took, dtype=torch.float64), SYNC_QUANTILE).reshape(1)
    return float(torch.stack(transport.all_gather_vector(mine, tag)).mean())


NET_CPU_BYTES, NET_CPU_ROUNDS = 1 << 20, 2


def measure_net_cpu(transport, topology: Topology, tag: int, nbytes: int = NET_CPU_BYTES,
                    rounds: int = NET_CPU_ROUNDS) -> float:
    """CPU seconds one side of a network transfer spends per byte on this group (gloo's threads
    and the kernel's TCP stack, as this process's CPU time counts them): every rank sends `nbytes`
    to the rank of the same index on the next node and receives as much from the previous node,
    `rounds` times; its process CPU time over the exchange / (2 x nbytes), the least of the
    rounds; agreed as the mean over the ranks. 0 on one node or when the nodes hold different
    numbers of ranks. Collective over the group."""
    import time

    import torch

    nodes = [topology.ranks_of_node(n) for n in topology.nodes()]
    if len(nodes) < 2 or len({len(x) for x in nodes}) > 1:
        return 0.0
    me = transport.rank
    ni = next(i for i, x in enumerate(nodes) if me in x)
    li = nodes[ni].index(me)
    to, frm = nodes[(ni + 1) % len(nodes)][li], nodes[(ni - 1) % len(nodes)][li]
    out = torch.ones(nbytes // 4, dtype=torch.float32)
    back = torch.empty_like(out)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        transport.exchange([(to, out)], [(frm, back)], tag, count=False).wait()
        best = min(best, (time.process_time() - t0) / (2 * out.numel() * 4))
    every = transport.all_gather_vector(torch.tensor([best], dtype=torch.float64), tag)
    return float(torch.stack(every).mean())


def _request(algorithm, u, r) -> str:
    parts = [f"algorithm={algorithm!r}"] if algorithm != "auto" else []
    if u is not None:
        parts.append(f"ulysses_degree={u}")
    if r is not None:
        parts.append(f"ring_degree={r}")
    return ", ".join(parts)


def _forced_u(P, H, algorithm, ulysses_degree, ring_degree) -> Optional[int]:
    """The Ulysses degree a forced choice fixes (None: free, or a Torus, whose degrees _admits
    matches against its candidates), with choose_plan's messages. Raises ValueError for a request
    that cannot run."""
    if algorithm == "torus":
        for name, v in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"streamattn: {name} must be a positive int, got {v!r}")
        return None
    divs = divisors(P)
    valid = [u for u in divs if H % u == 0]
    for name, v in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"streamattn: {name} must be an int, got {v!r}")
    if ulysses_degree is not None and ring_degree is not None and ulysses_degree * ring_degree != P:
        raise ValueError(f"streamattn: ulysses_degree={ulysses_degree} x ring_degree={ring_degree} "
                         f"!= group size {P}")
    u = ulysses_degree
    if u is None and ring_degree is not None:
        if ring_degree < 1 or P % ring_degree:
            raise ValueError(f"streamattn: ring_degree={ring_degree} does not divide the group size "
                             f"{P}; valid ring degrees: {', '.join(map(str, divs))}")
        u = P // ring_degree
    if algorithm == "ulysses":
        if u not in (None, P):
            raise ValueError(f"streamattn: algorithm='ulysses' uses ulysses_degree={P} (the group "
                             f"size), got {u}; use algorithm='usp' for a hybrid")
        u = P
    elif algorithm == "ring":
        if u not in (None, 1):
            raise ValueError(f"streamattn: algorithm='ring' uses ulysses_degree=1, got {u}; use "
                             "algorithm='usp' for a hybrid")
        u = 1
    if u is not None:
        if u < 1 or P % u:
            raise ValueError(f"streamattn: ulysses_degree={u} does not divide the group size {P}; "
                             f"valid degrees for {H} heads: {', '.join(map(str, valid))}")
        if H % u:
            raise ValueError(f"streamattn: {H} query heads cannot be split over ulysses_degree={u} "
                             f"({H} heads not divisible by u={u}); valid degrees for {H} heads on "
                             f"{P} ranks: {', '.join(map(str, valid))}")
    return u


def _topology(topology, world_size: Optional[int] = None) -> Topology:
    if isinstance(topology, Topology):
        t = topology
    elif isinstance(topology, (str, os.PathLike)):
        from .topology import resolve_topology

        t = resolve_topology(topology=os.fspath(topology))
    else:
        raise ValueError(f"topology must be a Topology, spec, machine name or .json path, got "
                         f"{type(topology).__name__}")
    if world_size is not None and world_size != t.world_size:
        if world_size < 1 or world_size > t.world_size:
            raise ValueError(f"world_size={world_size} but topology {t.name!r} has "
                             f"{t.world_size} ranks")
        t = t.subtopology(list(range(world_size)))
    return t


def plan_for(seq: int, heads: int, head_dim: int, *, batch: int = 1, kv_heads: Optional[int] = None,
             joint_len: int = 0, joint_strategy: str = "front", dtype="bfloat16", causal: bool = False,
             topology: Union[Topology, str] = DEFAULT_TOPOLOGY, world_size: Optional[int] = None,
             seq_lens=None, algorithm: str = "auto", ulysses_degree: Optional[int] = None,
             ring_degree: Optional[int] = None, compute_rate: Optional[float] = None,
             memory_bandwidth: Optional[float] = None) -> Plan:
    """Plan a call of `seq` image tokens (split evenly over the ranks, the first ranks taking one
    more when it does not divide; or `seq_lens` per rank), `heads` x `head_dim`, on `topology`
    (Topology, spec such as "2x4", shipped machine name, or .json path; world_size=N plans on its
    first N ranks)."""
    t = _topology(topology, world_size)
    P = t.world_size
    if seq_lens is None:
        if seq < 1:
            raise ValueError(f"seq must be >= 1, got {seq}")
        seq_lens = tuple(split_lengths(int(seq), P))
    else:
        seq_lens = tuple(int(n) for n in seq_lens)
        if len(seq_lens) != P:
            raise ValueError(f"seq_lens has {len(seq_lens)} entries for {P} ranks")
    for name, v in (("heads", heads), ("head_dim", head_dim), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    problem = Problem(batch=batch, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim,
                      dtype=as_dtype(dtype), seq_lens=seq_lens, scale=1.0 / math.sqrt(head_dim),
                      causal=bool(causal), joint_len=int(joint_len), joint_strategy=joint_strategy)
    return make_plan(problem, t, algorithm=algorithm, ulysses_degree=ulysses_degree,
                     ring_degree=ring_degree, compute_rate=compute_rate,
                     memory_bandwidth=memory_bandwidth)


# ------------------------------------------------------------------------------------ explain
def _context(problem: Problem, t: Topology, rate, rate_src, mbw=None, mbw_src="") -> str:
    lens = problem.seq_lens
    if len(set(lens)) == 1:
        shard = f"{len(lens)} ranks x {lens[0]}"
    else:
        shard = f"{len(lens)} ranks, {min(lens)}..{max(lens)} each"
    joint = f" + {problem.joint_len} joint ({problem.joint_strategy})" if problem.joint_len else ""
    dt = str(problem.dtype).replace("torch.", "")
    lines = [
        f"Problem: B={problem.batch}, S={problem.seq_total} ({shard}){joint}, H={problem.heads} "
        f"(kv {problem.kv_heads}), D={problem.head_dim}, {dt}, "
        f"{'causal' if problem.causal else 'non-causal'}",
        t.summary() + (f" [{t.provenance}]" if t.provenance else ""),
    ]
    for lk in t.distinct_links():
        lines.append(f"  {lk.kind.value}: {lk.describe()}")
    if rate is not None:
        lines.append(f"Compute: {rate / 1e12:.4g} TFLOP/s per rank ({rate_src})")
        mem = f"{mbw / 1e9:.4g} GB/s per rank" if mbw else "not modelled"
        lines.append(f"Memory (packing copies, LSE merges): {mem} ({mbw_src})")
    return "\n".join(lines)
