"""Planner and cost model: published facts as the oracle, exact byte accounting against the real
algorithms, forced plans, JSON, determinism. Fast: no processes (the byte check runs the real
algorithms in threads over an in-memory transport)."""
import dataclasses
import math
import threading
from collections import defaultdict

import pytest
import torch

from streamattn import algorithms
from streamattn.costmodel import CostModel
from streamattn.schedule import bytes_sent, call_flops, consecutive_groups, messages, phases, visible_pairs
from streamattn.plan import Plan
from streamattn.sharding import split_lengths
from streamattn.planner import (COSTED_ALGORITHMS, enumerate_candidates, make_plan, plan_for,
                                torus_degree)
from streamattn.problem import Problem
from streamattn.topology import Link, LinkKind, Topology, load_machine
from streamattn.transport.base import ByteCounters, Pending, Transport

FLUX = dict(seq=4096, heads=24, head_dim=128, joint_len=512)          # Flux.1 1024px
HUNYUAN = dict(seq=118800, heads=24, head_dim=128, joint_len=256)      # HunyuanVideo 720p x 129 frames


def _cands(plan):
    """Ulysses / ring / USP candidates by (u, placement), joint tokens replicated."""
    return {(c.ulysses_degree, c.placement): c for c in plan.candidates
            if c.algorithm != "torus" and not c.joint_fold}


def _torus(plan):
    """Torus candidates by (u, t, r), joint tokens replicated."""
    return {(c.ulysses_degree, torus_degree(c), c.ring_degree): c for c in plan.candidates
            if c.algorithm == "torus" and not c.joint_fold}


def _groups_inside_nodes(topo, groups):
    return all(len({topo.node[m] for m in g}) == 1 for g in groups)


# ------------------------------------------------------------------------ published facts
@pytest.mark.parametrize("size", [FLUX, dict(seq=16384, heads=24, head_dim=128),
                                  dict(seq=65536, heads=24, head_dim=128), HUNYUAN])
def test_a100_nvlink_node_picks_ulysses_8(size):
    """USP paper (arXiv 2405.07719) and xDiT's A100 Flux figures: Ulysses over all 8 NVLink GPUs."""
    p = plan_for(**size, topology="a100-8-nvlink")
    assert (p.algorithm, p.ulysses_degree, p.ring_degree) == ("ulysses", 8, 1), p.explain()


def test_l20_pcie_hybrid_beats_ulysses_8_at_32k():
    """USP paper: on 8xL20 PCIe at 32K tokens Ulysses 4 x Ring 2 beats Ulysses 8 (by 4x there; the
    model predicts a smaller factor, see test_l20_ratio_is_reported). The pick itself is a Torus
    over all 8 GPUs since its exchanges go one at a time (each hides behind a block's attention);
    USP 4x2 before that."""
    p = plan_for(32768, 32, 128, topology="l20x8-pcie")
    assert (p.algorithm, p.ulysses_degree) in (("torus", 1), ("usp", 4)), p.explain()
    c = _cands(p)
    assert p.predicted_s <= c[(4, "consecutive")].predicted_s
    assert c[(8, "consecutive")].predicted_s > p.predicted_s
    assert c[(4, "consecutive")].predicted_s < c[(8, "consecutive")].predicted_s


def test_l20_ratio_is_reported():
    """Not the paper's 4x: the model's ratio (recorded here so a change is visible)."""
    p = plan_for(32768, 32, 128, topology="l20x8-pcie")
    c = _cands(p)
    ratio = c[(8, "consecutive")].predicted_s / c[(4, "consecutive")].predicted_s
    assert 1.05 < ratio < 1.5, ratio


@pytest.mark.parametrize("size", [FLUX, HUNYUAN])
def test_h100_two_nodes_flux_and_hunyuan_24_heads(size):
    topo = load_machine("h100x8-2node")
    p = plan_for(**size, topology=topo)
    assert p.ulysses_degree <= 8 and _groups_inside_nodes(topo, p.ulysses_groups()), p.explain()
    assert p.ring_degree >= 2  # the network is crossed by the (overlapped) ring only


@pytest.mark.parametrize("heads", [16, 32, 48])
@pytest.mark.parametrize("seq", [32768, 65536, 118800])
def test_h100_two_nodes_no_blocking_all_to_all_over_the_network(heads, seq):
    """With heads that would allow Ulysses 16, long sequences still keep the all-to-all inside
    the nodes and cross InfiniBand with the overlapped ring."""
    topo = load_machine("h100x8-2node")
    p = plan_for(seq, heads, 128, joint_len=256, topology=topo)
    assert p.ulysses_degree <= 8 and _groups_inside_nodes(topo, p.ulysses_groups()), p.explain()
    assert _cands(p)[(16, "consecutive")].valid


@pytest.mark.parametrize("heads", [32, 48])
@pytest.mark.parametrize("seq", [1024, 4096, 16384])
def test_h100_two_nodes_small_sizes_torus_does_not_beat_ulysses_16(heads, seq):
    """Recorded model finding, not a published fact. At these sizes the model picks Ulysses 16
    (a blocking all-to-all over InfiniBand). Torus 8x2 (the same inter-node bytes at M = 2) is
    predicted 1.1-1.45x slower, not faster: with t = 2 only the local block -- a quarter of the
    block pairs -- runs while the exchange is in flight, the last block is a foreign one so its
    output goes home after all compute (exposed), the joint output is all-gathered over the same
    16 ranks as Ulysses', and the block decomposition adds memory-bound LSE merges (unfused torch
    ops, as merge.py is written) that roughly double the local time on an H100 at these sizes."""
    p = plan_for(seq, heads, 128, joint_len=256, topology="h100x8-2node")
    uly = _cands(p)[(16, "consecutive")]
    # the pick: Ulysses 16, or a plan within 2% of it (at 16k tokens USP 8x2 with the joint tokens
    # folded into the sequence is predicted 1.3% faster), or USP 8x2 with every ring member
    # attending all joint queries (at 1024 tokens 1.08x faster: no joint all-gather over IB)
    assert p.algorithm != "torus" and p.predicted_s <= uly.predicted_s, p.explain()
    assert ((p.algorithm, p.ulysses_degree) == ("ulysses", 16) or p.predicted_s > 0.98 * uly.predicted_s
            or (p.algorithm, p.ulysses_degree, p.joint_all) == ("usp", 8, True)), p.explain()
    tor = _torus(p)[(8, 2, 1)]
    assert tor.valid and 1.05 < tor.predicted_s / uly.predicted_s < 1.5
    assert tor.compute_s > 1.3 * uly.compute_s


@pytest.mark.parametrize("seq,heads,topology", [
    (16384, 32, "h100x8-4node"),               # M = 4: 3 exchanges hide behind 3 blocks (8x4x1)
    (32768, 32, "h100x8-4node"),
    (65536, 32, "l40x8-pcie-100gbe-2node"),   # PCIe node: t spans both nodes (4x4x1, 1x16x1
    (118800, 48, "l40x8-pcie-100gbe-2node"),  # within 1.5% of each other)
])
def test_where_torus_wins(seq, heads, topology):
    """Recorded model finding: Torus is the cheapest plan only where several exchanges can hide
    behind several blocks (t >= 4) and the all-to-all it overlaps is large."""
    p = plan_for(seq, heads, 128, joint_len=256, topology=topology)
    assert p.algorithm == "torus" and p.torus_degree >= 4 and p.ring_degree == 1, p.explain()
    assert p.groups == consecutive_groups(p.ulysses_degree * p.torus_degree * p.ring_degree,
                                          p.ulysses_degree)
    assert "runner-up" in p.reason


def test_forced_torus_plans():
    assert "torus" in COSTED_ALGORITHMS  # streamattn.api then plans forced torus with make_plan
    p = plan_for(**FLUX, topology="h100x8-2node", algorithm="torus")  # cheapest valid torus
    assert (p.algorithm, p.ulysses_degree, p.torus_degree, p.ring_degree) == ("torus", 4, 2, 2)
    assert p.reason.startswith("requested (algorithm='torus'): torus u=4 x t=2 x r=2")
    assert "auto would pick usp u=8 x r=2" in p.reason
    p = plan_for(**FLUX, topology="h100x8-2node", algorithm="torus", ulysses_degree=2)
    assert (p.ulysses_degree, p.torus_degree, p.ring_degree) == (2, 4, 2)
    p = plan_for(**FLUX, topology="h100x8-2node", algorithm="torus", ulysses_degree=1, ring_degree=4)
    assert (p.ulysses_degree, p.torus_degree, p.ring_degree) == (1, 4, 4)
    p = plan_for(4096, 32, 128, topology="h100x8-2node", algorithm="torus")
    assert (p.ulysses_degree, p.torus_degree, p.ring_degree) == (8, 2, 1)
    assert Plan.from_json(p.to_json()) == p and Plan.from_json(p.to_json()).torus_degree == 2
    text = p.explain()
    assert "Steps of the chosen plan (torus u=8 x t=2 x r=1 [consecutive])" in text
    assert "torus exchange 1/1 q,k,v arrives, attend its block" in text and "wait" in text
    assert "torus outputs sent home" in text
    # a forced usp / ulysses / ring request never returns a torus plan
    for kw in (dict(algorithm="usp"), dict(ulysses_degree=8), dict(algorithm="ring")):
        assert plan_for(4096, 32, 128, topology="h100x8-4node", **kw).algorithm != "torus"


def test_torus_interleaved_map_drops_crossing_groups():
    """Torus uses consecutive groups only: on an interleaved rank->node map every group of u > 1
    crosses nodes and is dropped with the reason; u = 1 stays valid."""
    p = plan_for(65536, 32, 128, topology=_interleaved_h100())
    for (u, t, r), c in _torus(p).items():
        if u > 1 and 32 % (u * t) == 0:
            assert not c.valid and "cross nodes" in c.dropped
        elif 32 % (u * t) == 0:
            assert c.valid


def test_24_heads_on_16_ranks_never_uses_a_degree_that_does_not_divide_24():
    p = plan_for(**FLUX, topology="h100x8-2node")
    assert 24 % p.ulysses_degree == 0
    for c in p.candidates:
        if c.algorithm == "torus":
            u, t = c.ulysses_degree, torus_degree(c)
            if 24 % (u * t):
                assert not c.valid and c.dropped == f"24 heads not divisible by u x t = {u} x {t}"
            else:
                assert c.valid and c.predicted_s > 0
        elif 24 % c.ulysses_degree:
            assert not c.valid and c.dropped == f"24 heads not divisible by u={c.ulysses_degree}"
        else:
            assert c.valid and c.predicted_s > 0
    assert {c.ulysses_degree for c in p.candidates if not c.valid and c.algorithm != "torus"} == {16}


# ------------------------------------------------------------------------ forced plans
def test_forced_degrees_are_honoured():
    p = plan_for(**FLUX, topology="h100x8-2node", ulysses_degree=4)
    assert (p.algorithm, p.ulysses_degree, p.ring_degree) == ("usp", 4, 4)
    assert p.reason.startswith("requested") and "auto would pick" in p.reason
    p = plan_for(**FLUX, topology="h100x8-2node", ring_degree=16)
    assert (p.algorithm, p.ulysses_degree) == ("ring", 1)
    p = plan_for(**FLUX, topology="h100x8-2node", algorithm="ring")
    assert (p.algorithm, p.ring_degree) == ("ring", 16)
    p = plan_for(**FLUX, topology="a100-8-nvlink", algorithm="usp", ulysses_degree=2, ring_degree=4)
    assert (p.algorithm, p.ulysses_degree, p.ring_degree) == ("usp", 2, 4)
    p = plan_for(**FLUX, topology="a100-8-nvlink", algorithm="ulysses")
    assert p.algorithm == "ulysses" and p.reason.startswith("requested")


@pytest.mark.parametrize("kw, match", [
    (dict(algorithm="ulysses"), r"24 query heads cannot be split over ulysses_degree=16 .*24 heads "
                                r"not divisible by u=16.*valid degrees .*: 1, 2, 4, 8"),
    (dict(ulysses_degree=16), r"not divisible by u=16"),
    (dict(ulysses_degree=3), r"does not divide the group size 16"),
    (dict(ring_degree=5), r"ring_degree=5 does not divide .* valid ring degrees: 1, 2, 4, 8, 16"),
    (dict(ulysses_degree=4, ring_degree=2), r"4 x ring_degree=2 != group size 16"),
    (dict(algorithm="ring", ulysses_degree=2), r"algorithm='ring' uses ulysses_degree=1"),
    (dict(algorithm="ulysses", ulysses_degree=8), r"algorithm='ulysses' uses ulysses_degree=16"),
    (dict(algorithm="torus", ulysses_degree=8, ring_degree=1),
     r"algorithm='torus' .*24 heads not divisible by u x t = 8 x 2; valid torus splits u x t x r "
     r"for 24 heads on 16 ranks: 4x2x2, 2x4x2, 2x2x4, 1x8x2, 1x4x4, 1x2x8"),
    (dict(algorithm="torus", ulysses_degree=16), r"no torus split matches"),
    (dict(algorithm="torus", ulysses_degree=0), r"ulysses_degree must be a positive int"),
    (dict(algorithm="bogus"), r"expected one of auto, ulysses, ring, usp, torus"),
])
def test_forced_plans_rejected_with_reason(kw, match):
    with pytest.raises(ValueError, match=match):
        plan_for(**FLUX, topology="h100x8-2node", **kw)


def test_world_size_mismatch_and_local():
    prob = Problem(1, 8, 8, 64, torch.bfloat16, (100,) * 4, 0.125)
    with pytest.raises(ValueError, match="describes 8 ranks but the problem has 4"):
        make_plan(prob, load_machine("a100-8-nvlink"))
    p = plan_for(1000, 8, 64, topology="a100-8-nvlink", world_size=1)
    assert p.algorithm == "local"
    p = plan_for(1000, 8, 64, topology="a100-8-nvlink", world_size=4)
    assert p.ulysses_degree * p.ring_degree == 4


# ------------------------------------------------------------------------ placements
def _interleaved_h100():
    t = load_machine("h100x8-2node")
    return t.replace(node=tuple(r % 2 for r in range(16)), local_index=tuple(r // 2 for r in range(16)),
                     name="h100x8-2node-interleaved")


def test_interleaved_map_keeps_ulysses_inside_nodes():
    topo = _interleaved_h100()
    p = plan_for(65536, 24, 128, topology=topo)
    assert p.ulysses_degree > 1 and _groups_inside_nodes(topo, p.ulysses_groups()), p.explain()
    win = next(c for c in p.candidates if c.groups == p.groups)
    assert win.placement == "per-node"
    c = _cands(p)
    assert c[(8, "per-node")].predicted_s < c[(8, "consecutive")].predicted_s


def test_interleaved_causal_drops_per_node_groups():
    topo = _interleaved_h100()
    p = plan_for(65536, 24, 128, causal=True, topology=topo)
    for c in p.candidates:
        if c.placement == "per-node" and c.ulysses_degree > 1:
            assert not c.valid and "contiguous positions" in c.dropped
    assert p.groups == consecutive_groups(16, p.ulysses_degree) or p.ulysses_degree == 1


def test_candidate_order_and_labels():
    cands = enumerate_candidates(Problem(1, 24, 24, 128, torch.bfloat16, (256,) * 16, 0.1),
                                 load_machine("h100x8-2node"))
    assert [c.ulysses_degree for c in cands[:5]] == [16, 8, 4, 2, 1]
    assert [c.algorithm for c in cands[:5]] == ["ulysses", "usp", "usp", "usp", "ring"]
    # then every torus u x t x r (t >= 2), larger u first, then larger t; u = 16 crosses nodes
    torus = [(c.ulysses_degree, torus_degree(c), c.ring_degree, c.valid) for c in cands[5:]]
    assert torus == [(16, 1, 1, False)][:0] + [
        (8, 2, 1, False), (4, 4, 1, False), (4, 2, 2, True), (2, 8, 1, False), (2, 4, 2, True),
        (2, 2, 4, True), (1, 16, 1, False), (1, 8, 2, True), (1, 4, 4, True), (1, 2, 8, True)]
    assert all(c.algorithm == "torus" and c.groups == consecutive_groups(16, c.ulysses_degree)
               for c in cands[5:])


# ------------------------------------------------------------------------ JSON, determinism
def test_plan_json_round_trip():
    p = plan_for(**FLUX, topology="h100x8-2node")
    q = Plan.from_json(p.to_json())
    assert q == p and q.groups == p.groups and q.predicted_s == p.predicted_s and q.reason == p.reason
    full = Plan.from_json(p.to_json(candidates=True))
    assert full == p and full.candidates == p.candidates and full.explain() == p.explain()
    assert Plan.from_json(full.to_json(candidates=True)).to_json(candidates=True) == p.to_json(candidates=True)


def test_deterministic():
    a = [plan_for(**HUNYUAN, topology="h100x8-2node").to_json(candidates=True) for _ in range(3)]
    assert len(set(a)) == 1
    t = load_machine("h100x8-2node")
    b = plan_for(**HUNYUAN, topology=Topology.from_json(t.to_json())).to_json(candidates=True)
    assert b == a[0]


def test_no_measurement_when_rate_is_known(monkeypatch):
    import streamattn.calibration as cm  # where resolve_rate looks them up

    def boom(*a, **k):
        raise AssertionError("measured although a rate was given")

    monkeypatch.setattr(cm, "measure_cpu_rate", boom)
    monkeypatch.setattr(cm, "measure_cpu_memory_bandwidth", boom)
    p1 = plan_for(4096, 8, 64, topology="2x4", compute_rate=5e10, memory_bandwidth=5e9)
    p2 = plan_for(4096, 8, 64, topology="2x4", compute_rate=5e10, memory_bandwidth=5e9)
    assert p1.to_json(candidates=True) == p2.to_json(candidates=True)
    plan_for(**FLUX, topology="h100x8-2node")  # peak_flops and device table: nothing measured


def test_measure_cpu_rate_cached():
    from streamattn.calibration import measure_cpu_rate

    r = measure_cpu_rate()
    assert r > 1e6 and measure_cpu_rate() == r
    p = plan_for(2048, 4, 32, topology="1x4")
    assert f"{r / 1e12:.4g} TFLOP/s" in p.context or p.algorithm  # the CPU path plans


# ------------------------------------------------------------------------ cost model pieces
def test_visible_pairs_matches_brute_force():
    for qo, sq, ko, sk in [(0, 5, 0, 5), (5, 3, 0, 5), (0, 5, 5, 3), (3, 4, 2, 7), (10, 2, 0, 4), (0, 0, 0, 3)]:
        brute = sum(1 for i in range(sq) for j in range(sk) if ko + j <= qo + i)
        assert visible_pairs(qo, sq, ko, sk, True) == brute
        assert visible_pairs(qo, sq, ko, sk, False) == sq * sk


def test_call_flops():
    prob = Problem(2, 24, 24, 128, torch.bfloat16, (1024,) * 4, 0.1, joint_len=512)
    assert call_flops(prob) == 4 * 2 * (4096 + 512) ** 2 * 24 * 128


def test_shared_uplink_and_dedicated_nic():
    eth = Link(LinkKind.ETHERNET, 12.5e9, 20e-6, shared_by=8)
    topo = Topology.uniform([0] * 8 + [1] * 8, Link(LinkKind.NVSWITCH, 450e9, 3e-6), eth)
    m = CostModel(topo, 1e15)
    one, _, _ = m.comm_time([(0, 8, 10 ** 8)])
    eight, bott, _ = m.comm_time([(r, r + 8, 10 ** 8) for r in range(8)])
    assert math.isclose(one, 20e-6 + 1e8 / 12.5e9) and math.isclose(eight, 20e-6 + 8e8 / 12.5e9)
    assert "8 sharing" in bott
    ib = load_machine("h100x8-2node")
    m = CostModel(ib, 1e15)
    eight_ib, _, _ = m.comm_time([(r, r + 8, 10 ** 8) for r in range(8)])
    assert math.isclose(eight_ib, 5e-6 + 1e8 / 50e9)


def test_port_and_cross_socket_contention():
    t = load_machine("l20x8-pcie")
    m = CostModel(t, 1e14)
    # one rank sending to 3 same-socket peers: its one x16 port carries all three messages
    tt, bott, _ = m.comm_time([(0, j, 10 ** 8) for j in (1, 2, 3)])
    assert math.isclose(tt, 10e-6 + 3e8 / 25e9) and "port of rank 0" in bott
    # four ranks of socket 0 crossing to socket 1 at once share the inter-socket path
    tt, bott, _ = m.comm_time([(j, j + 4, 10 ** 8) for j in range(4)])
    assert math.isclose(tt, 15e-6 + 4e8 / 16e9) and "inter-socket" in bott
    tt, _, _ = m.comm_time([(0, 4, 10 ** 8)])
    assert math.isclose(tt, 15e-6 + 1e8 / 16e9)


def test_overlap_costs_max_and_blocking_adds():
    p = plan_for(65536, 24, 128, topology="h100x8-2node")
    for c in p.candidates:
        if not c.valid:
            continue
        assert math.isclose(c.predicted_s, sum(s.time_s for s in c.steps), rel_tol=1e-12)
        for s in c.steps:
            want = max(s.compute_s, s.comm_s) if s.overlapped else s.compute_s + s.comm_s
            assert math.isclose(s.time_s, want, rel_tol=1e-12)
        if c.algorithm == "torus":
            continue
        if c.ring_degree > 1:
            assert sum(s.overlapped for s in c.steps) == c.ring_degree - 1


@pytest.mark.parametrize("heads,topology", [(24, "h100x8-2node"), (32, "h100x8-2node"),
                                            (32, "h100x8-4node"), (48, "l40x8-pcie-100gbe-2node")])
def test_torus_steps_overlap_rules(heads, topology):
    """Torus: blocking steps add; an exchange step costs its block's compute plus the wait for the
    exchange, which is at most the exchange's own transfer (it was in flight during the earlier
    blocks); outputs going home cost at most their transfer."""
    p = plan_for(16384, heads, 128, joint_len=256, topology=topology)
    tor = [c for c in p.candidates if c.algorithm == "torus" and c.valid]
    assert tor
    for c in tor:
        assert math.isclose(c.predicted_s, sum(s.time_s for s in c.steps), rel_tol=1e-12)
        t = torus_degree(c)
        ex = [s for s in c.steps if s.name.startswith("torus exchange")]
        assert len(ex) == t - 1
        for s in c.steps:
            if s.overlapped:
                assert s.compute_s * (1 - 1e-12) <= s.time_s <= (s.compute_s + s.comm_s) * (1 + 1e-12)
            else:
                assert math.isclose(s.time_s, s.compute_s + s.comm_s, rel_tol=1e-12)
        if c.ring_degree > 1:  # ring of teams: posted and waited before the compute (blocking)
            ring = [s for s in c.steps if s.name.startswith("ring of teams step")]
            assert len(ring) == c.ring_degree - 1 and not any(s.overlapped for s in ring)


def test_torus_first_exchange_hides_behind_the_local_block():
    """t = 2 on a 2x4 CPU spec: the only exchange is in flight while the local block computes, so
    its step costs the block's compute plus max(0, transfer - local block); at a slow link the
    outputs going home (the last block's, sent after its compute) are fully exposed."""
    for inter, rate in (("10Gbit/s", 1e9), ("100Mbit/s", 5e10)):
        p = plan_for(8192, 8, 64, topology=f"2x4:inter={inter}", algorithm="torus", ulysses_degree=4,
                     ring_degree=1, compute_rate=rate, memory_bandwidth=1e10)
        assert (p.algorithm, p.ulysses_degree, p.torus_degree, p.ring_degree) == ("torus", 4, 2, 1)
        c = next(c for c in p.candidates if c.algorithm == "torus" and c.valid
                 and c.ulysses_degree == 4)
        local, ex, home = (next(s for s in c.steps if s.name.startswith(n))
                           for n in ("torus: post", "torus exchange 1/1", "torus outputs"))
        assert math.isclose(ex.time_s, ex.compute_s + max(0.0, ex.comm_s - local.compute_s),
                            rel_tol=1e-9)
        assert math.isclose(home.time_s, home.comm_s, rel_tol=1e-9)
        assert dict(ex.bytes_by_kind)["ethernet"] == 3 * 1 * 4096 * 1 * 64 * 2  # q,k,v of 1 head


# ------------------------------------------------------------------------ exact bytes vs the algorithms
class _Box:
    def __init__(self):
        self.cv = threading.Condition()
        self.data = defaultdict(list)  # (src, dst, tag) -> messages in posting order (FIFO, as gloo)
        self.sent = defaultdict(int)
        self.posted = defaultdict(list)  # rank -> the tags of its exchanges, in posting order


class _Pending(Pending):
    def __init__(self, box, me, recvs, tag):
        self.box, self.me, self.recvs, self.tag = box, me, recvs, tag

    def wait(self):
        with self.box.cv:
            for peer, buf in self.recvs:
                key = (peer, self.me, self.tag)
                if not self.box.cv.wait_for(lambda: self.box.data.get(key), timeout=30):
                    raise TimeoutError(f"rank {self.me}: nothing from {peer} tag {self.tag}")
                buf.copy_(self.box.data[key].pop(0).view(buf.shape))


class _ThreadTransport(Transport):
    def __init__(self, box, rank, size):
        self.box, self.rank, self.size = box, rank, size
        self.device = torch.device("cpu")
        self.node_of = [0] * size
        self.counters = ByteCounters()

    def exchange(self, sends, recvs, tag, count=True):
        with self.box.cv:
            self.box.posted[self.rank].append(tag)
            for peer, t in sends:
                self.box.data[(self.rank, peer, tag)].append(t.detach().clone().reshape(-1))
                if count:
                    self.box.sent[(self.rank, peer)] += t.numel() * t.element_size()
            self.box.cv.notify_all()
        return _Pending(self.box, self.rank, recvs, tag)

    def describe_peer(self, peer):
        return f"rank {peer}"


def _run_threads(problem, plan, dtype, with_order=False):
    P, B, H, Hk, D, T = (problem.world_size, problem.batch, problem.heads, problem.kv_heads,
                         problem.head_dim, problem.joint_len)
    g = torch.Generator().manual_seed(0)
    S = problem.seq_total
    q, k, v = (torch.randn(B, S, h, D, generator=g).to(dtype) for h in (H, Hk, Hk))
    joint = tuple(torch.randn(B, T, h, D, generator=g).to(dtype) for h in (H, Hk, Hk)) if T else None
    box, errors = _Box(), []

    def work(rank):
        try:
            tr = _ThreadTransport(box, rank, P)
            a, n = problem.offsets[rank], problem.seq_lens[rank]
            args = (tr, problem, q[:, a:a + n], k[:, a:a + n], v[:, a:a + n], joint)
            if plan.algorithm == "ulysses":
                algorithms.ulysses_attention(*args, chunks=plan.chunks)
            elif plan.algorithm == "ring":
                algorithms.ring_attention(*args)
            elif plan.algorithm == "torus":
                algorithms.torus_attention(*args, plan=plan)
            else:
                algorithms.usp_attention(*args, plan=plan)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(f"rank {rank}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return dict(box.sent) if not with_order else (dict(box.sent), dict(box.posted))


@pytest.mark.parametrize("P,u,heads,kv_heads,lens,joint", [
    (4, 4, 8, 8, (7, 5, 6, 6), 0),
    (4, 4, 8, 2, (7, 5, 6, 6), 3),       # GQA, kv_heads < u: K/V heads replicated
    (4, 1, 4, 2, (9, 4, 6, 5), 3),       # ring with joint partials
    (4, 2, 6, 3, (5, 7, 6, 4), 2),       # USP
    (6, 3, 6, 1, (4, 5, 3, 6, 2, 5), 2),  # USP with MQA
    (8, 2, 4, 4, (3,) * 8, 0),
])
def test_cost_model_bytes_equal_what_the_algorithms_send(P, u, heads, kv_heads, lens, joint):
    dtype = torch.bfloat16
    problem = Problem(1, heads, kv_heads, 8, dtype, lens, 8 ** -0.5, joint_len=joint)
    algo = "ulysses" if u == P else "ring" if u == 1 else "usp"
    groups = consecutive_groups(P, u)
    plan = Plan(algo, u, P // u, groups=groups)
    sent = _run_threads(problem, plan, dtype)
    predicted = defaultdict(int)
    for _, msgs in messages(problem, u, groups):
        for a, b, n in msgs:
            predicted[(a, b)] += n
    assert dict(predicted) == sent
    per_rank = bytes_sent(problem, u, groups)
    assert per_rank == [sum(n for (a, _), n in sent.items() if a == r) for r in range(P)]


@pytest.mark.parametrize("P,u,strategy,chunks,T", [(4, 1, "front", 1, 3), (4, 2, "rear", 1, 5),
                                                  (6, 2, "front", 2, 2), (8, 4, "rear", 1, 7)])
def test_ring_joint_rows_split_over_the_ring(P, u, strategy, chunks, T):
    """The joint queries are split over the ring members and ride with their queries: after the
    ring each member sends only its T_i = split_lengths(T, r)[i] finished rows (out + LSE) to each
    other member -- 1/r of what all-gathering (out, lse) partials of all T rows sent -- as the
    schedule states it, in a phase after the ring. (T=2 on a ring of 3: a member with no rows
    sends nothing.)"""
    from streamattn.algorithms.ring import TAG_JOINT, TAG_STEP

    heads, D = 8, 8
    problem = Problem(1, heads, 4, D, torch.float32, (5,) * P, D ** -0.5, joint_len=T,
                      joint_strategy=strategy)
    groups = consecutive_groups(P, u)
    r, hq = P // u, heads // u
    plan = Plan("ring" if u == 1 else "usp", u, r, groups=groups, chunks=chunks)
    _, posted = _run_threads(problem, plan, torch.float32, with_order=True)
    jl = split_lengths(T, r)
    for rank, tags in posted.items():  # (a member with no rows only receives)
        ring_tags = [i for i, t in enumerate(tags) if TAG_STEP <= t < TAG_STEP + P]
        assert ring_tags and tags.index(TAG_JOINT) > ring_tags[-1], (rank, tags)
    ph = phases(problem, u, groups, chunks)
    gather = next(p for p in ph if p.name.startswith("all-gather the joint output rows"))
    assert ph.index(gather) > max(i for i, p in enumerate(ph) if p.name.startswith("ring step"))
    sizes = sorted(n for _, _, n in gather.msgs)
    want = sorted(hq * n * (D + 1) * 4 for n in jl if n for _ in range(r - 1) for _ in range(u))
    assert sizes == want, (sizes, want)
    partials = (r - 1) * hq * T * (D + 1) * 4 * P  # what the partials' all-gather sent in all
    assert sum(sizes) * r == partials


@pytest.mark.parametrize("P,u,t,heads,kv_heads,lens,joint,strategy,causal", [
    (4, 2, 2, 8, 8, (7, 5, 6, 6), 0, "front", False),
    (4, 2, 2, 8, 2, (7, 5, 6, 6), 3, "front", False),     # GQA: raw K/V head range, fitted after receipt
    (6, 2, 3, 6, 3, (5, 7, 6, 4, 3, 6), 2, "rear", False),  # t = 3: early outputs home
    (8, 2, 2, 4, 4, (3,) * 8, 2, "front", False),           # ring factor r = 2
    (8, 1, 4, 8, 1, (4, 5, 3, 6, 2, 5, 4, 4), 3, "rear", False),  # u = 1, MQA, r = 2
    (8, 2, 4, 8, 2, (5, 3, 4, 6, 5, 4, 4, 5), 0, "front", True),  # causal, t = 4
    (8, 4, 2, 24, 6, (2, 3, 4, 5, 6, 7, 8, 9), 0, "front", True),
    (6, 3, 2, 12, 4, (4, 5, 3, 6, 2, 5), 0, "front", False),      # u = 3 x t = 2
])
def test_cost_model_torus_bytes_equal_what_torus_sends(P, u, t, heads, kv_heads, lens, joint, strategy,
                                                       causal):
    dtype = torch.bfloat16
    problem = Problem(1, heads, kv_heads, 8, dtype, lens, 8 ** -0.5, causal=causal, joint_len=joint,
                      joint_strategy=strategy)
    groups = consecutive_groups(P, u)
    r = P // (u * t)
    plan = Plan("torus", u, r, groups=groups, torus_degree=t)
    sent = _run_threads(problem, plan, dtype)
    predicted = defaultdict(int)
    for _, msgs in messages(problem, u, groups, torus_degree=t):
        for a, b, n in msgs:
            predicted[(a, b)] += n
    assert dict(predicted) == sent
    assert bytes_sent(problem, u, groups, torus_degree=t) == [
        sum(n for (a, _), n in sent.items() if a == x) for x in range(P)]


@pytest.mark.parametrize("P,heads,kv_heads,lens,joint,chunks", [
    (4, 8, 8, (7, 5, 6, 6), 0, 2),
    (4, 32, 16, (7, 5, 6, 6), 3, 2),     # GQA: whole K/V groups per chunk
    (2, 8, 8, (5, 6), 2, 4),
])
def test_chunked_ulysses_bytes_equal_the_schedule(P, heads, kv_heads, lens, joint, chunks):
    """Ulysses pipelined over head-group chunks (chosen by the planner) sends exactly what
    streamattn.schedule says; the unchunked schedule (same bytes, fewer messages) is told apart by
    the message count."""
    from streamattn.schedule import chunks_valid, per_rank_bytes

    dtype = torch.bfloat16
    problem = Problem(1, heads, kv_heads, 8, dtype, lens, 8 ** -0.5, joint_len=joint)
    groups = consecutive_groups(P, P)
    assert chunks_valid(problem, P, chunks)
    plan = Plan("ulysses", P, 1, groups=groups, chunks=chunks)
    sent = _run_threads(problem, plan, dtype)
    predicted = defaultdict(int)
    for _, msgs in messages(problem, P, groups, chunks=chunks):
        for a, b, n in msgs:
            predicted[(a, b)] += n
    assert dict(predicted) == sent
    node_of = [0] * P
    one = per_rank_bytes(problem, P, groups, node_of)
    many = per_rank_bytes(problem, P, groups, node_of, chunks=chunks)
    assert [x["intra"] for x in one] == [x["intra"] for x in many]
    assert [x["messages"] * chunks for x in one] == [x["messages"] for x in many]


def test_planner_costs_chunked_ulysses_and_the_plan_carries_it():
    """On a slow inter-node link Ulysses in chunks hides part of its all-to-all behind attention,
    so the planner prices it below one-shot Ulysses; a forced algorithm="ulysses" keeps the classic
    one-shot exchange; chunk counts that split a K/V group are not candidates; the plan carries the
    count (str, JSON)."""
    problem = Problem(1, 24, 24, 32, torch.float32, (1024,) * 4, 32 ** -0.5)
    kw = dict(compute_rate=2e10, memory_bandwidth=5e9)
    plan = make_plan(problem, "2x2:inter=200Mbit/s", **kw)
    ul = {c.chunks: c for c in plan.candidates if c.algorithm == "ulysses" and c.valid}
    assert set(ul) == {1, 2}  # 6 heads per rank: 2 chunks of 3, not 4
    assert ul[2].predicted_s < ul[1].predicted_s
    assert make_plan(problem, "2x2:inter=200Mbit/s", algorithm="ulysses", **kw).chunks == 1
    p2 = Plan("ulysses", 4, 1, chunks=2)
    assert "in 2 chunks" in str(p2) and Plan.from_json(p2.to_json()).chunks == 2
    gqa = Problem(1, 24, 6, 32, torch.float32, (1024,) * 4, 32 ** -0.5)  # groups of 4 query heads
    assert {c.chunks for c in make_plan(gqa, "2x2:inter=200Mbit/s", **kw).candidates
            if c.algorithm == "ulysses" and c.valid} == {1}
    # declared GPU machines: not costed (launch overheads and small all-to-alls are not modelled)
    assert all(c.chunks == 1 for c in plan_for(4096, 24, 128, topology="h100x8-2node").candidates)


def test_calibration_cache_is_owner_only_atomic_and_validated(tmp_path, monkeypatch):
    import json
    import os
    import stat

    from streamattn import calibration

    monkeypatch.setenv("STREAMATTN_CACHE_DIR", str(tmp_path / "cache"))
    entry = "1,2,64,64,8:float32"
    path = calibration.save_cache(4, {entry: 0.001})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert calibration.load_cache(4) == {entry: 0.001}
    assert calibration.load_cache(2) == {}  # another number of concurrent ranks: another file
    assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".")] == []  # no temp left

    # the cache is used: nothing is timed for a cached shape
    def must_not_time(*a, **k):
        raise AssertionError("timed a cached shape")

    monkeypatch.setattr(calibration, "time_block", must_not_time)
    assert calibration.block_times([(1, 2, 64, 64, 8)], torch.float32, 4) == ([0.001], {})
    good = json.loads(open(path).read())
    for bad in ({**good, "key": "someone-else"}, {**good, "format": 0},
                {**good, "entries": {entry: -1.0}}, {**good, "entries": {entry: "0.1"}}):
        with open(path, "w") as f:
            json.dump(bad, f)
        assert calibration.load_cache(4) == {}, bad
    with open(path, "w") as f:
        f.write("not json")
    assert calibration.load_cache(4) == {}


def test_block_rates_steer_the_plan():
    """The kernel calibrated at each candidate's block shape decides: the same problem and
    topology pick differently when the Ulysses block is measured slow than when it is fast."""
    from streamattn.planner import calibration_shapes, candidate_block_shape
    from streamattn.topology import resolve_topology

    problem = Problem(1, 8, 8, 32, torch.float32, (512,) * 4, 32 ** -0.5)
    topo = "2x2:inter=10Gbit/s"
    kw = dict(compute_rate=1e10, memory_bandwidth=5e9)
    base = make_plan(problem, topo, **kw)
    shapes = calibration_shapes(problem, resolve_topology(topology=topo))
    uly = next(c for c in base.candidates if c.algorithm == "ulysses" and c.chunks == 1)
    slow = {s: 1e10 for s in shapes}
    slow[candidate_block_shape(problem, uly)] = 1e8
    fast = {s: 1e8 for s in shapes}
    fast[candidate_block_shape(problem, uly)] = 1e11
    assert make_plan(problem, topo, block_rates=slow, **kw).algorithm != "ulysses"
    assert make_plan(problem, topo, block_rates=fast, **kw).algorithm == "ulysses"


def test_calibration_shapes_follow_the_request():
    """A forced request can run only its own block shape: that one is timed, not the dozen an
    auto plan chooses from; an invalid request times nothing (make_plan raises)."""
    from streamattn.planner import calibration_shapes, candidate_block_shape
    from streamattn.topology import resolve_topology

    problem = Problem(1, 8, 8, 32, torch.float32, (512,) * 4, 32 ** -0.5)
    topo = resolve_topology(topology="2x2:inter=10Gbit/s")
    every = calibration_shapes(problem, topo)
    assert len(every) > 3, every
    for req in (dict(algorithm="ring"), dict(algorithm="ulysses"), dict(ulysses_degree=2),
                dict(algorithm="torus", ulysses_degree=2, ring_degree=1)):
        plan = make_plan(problem, topo, compute_rate=1e10, memory_bandwidth=5e9, **req)
        chosen = next(c for c in plan.candidates if (c.algorithm, c.ulysses_degree, c.ring_degree,
                      c.chunks) == (plan.algorithm, plan.ulysses_degree, plan.ring_degree, plan.chunks))
        assert calibration_shapes(problem, topo, **req) == [candidate_block_shape(problem, chosen)], req
    assert calibration_shapes(problem, topo, ulysses_degree=3) == []


@pytest.mark.parametrize("P", [4])
def test_forced_call_times_only_its_own_shape(rank_pool, P, tmp_path):
    """On a fresh cache a forced ring times one block shape (it timed every candidate's before:
    ~0.3 s a new shape); auto times them all; a forced call after it rates every shape from the
    cache and times none."""
    res = rank_pool(P).run("streamattn.testing.cases:calibrated_shapes", requests=[
        {"algorithm": "ring"}, {"algorithm": "auto"}, {"algorithm": "usp", "ulysses_degree": 2}],
        cache_dir=str(tmp_path))
    for ring, auto, usp in res:
        assert ring == {"timed": 1, "rated": 1}, res
        assert auto["timed"] == auto["rated"] - 1 > 2, res  # all but the ring's, now cached
        assert usp == {"timed": 0, "rated": auto["rated"]}, res


# ------------------------------------------------- CPU terms: sync cost, core share, calibration
def _usp_problem(P=4, seq=4096, T=0):
    return Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                   seq_lens=(seq // P,) * P, scale=0.125, joint_len=T)


def test_sync_cost_is_added_once_per_communication_step_and_once_per_call():
    from streamattn.topology import resolve_topology

    topo = resolve_topology(topology="2x2")
    prob = _usp_problem()
    groups = ((0, 1), (2, 3))
    base = CostModel(topo, 5e10, 5e9).cost(prob, "usp", 2, groups)
    sync = CostModel(topo, 5e10, 5e9, sync_s=0.01).cost(prob, "usp", 2, groups)
    comm_steps = sum(1 for _, msgs in messages(prob, 2, groups) if msgs)
    agreement = [s for s in sync.steps if s.name.startswith("per-call agreement")]
    assert len(agreement) == 1 and agreement[0].time_s == 0.01
    # blocking steps grow by exactly sync_s; an overlapped ring step by at most sync_s
    assert base.predicted_s + 0.01 < sync.predicted_s <= base.predicted_s + 0.01 * (comm_steps + 1) + 1e-12
    assert len(base.steps) + 1 == len(sync.steps)


def test_chunked_ulysses_pays_a_sync_per_extra_exchange_round():
    """Every chunk beyond the first adds two exchange rounds (scatter, gather) that wait for the
    peers: 2 (chunks - 1) sync_s that no compute hides; nothing when sync_s = 0 (e.g. GPUs)."""
    from streamattn.topology import resolve_topology

    topo = resolve_topology(topology="2x2:inter=1Gbit/s")
    groups = ((0, 1, 2, 3),)
    for heads, chunks in ((8, 2), (24, 3)):  # chunks divide the heads a member holds
        prob = Problem(batch=1, heads=heads, kv_heads=heads, head_dim=64, dtype=torch.float32,
                       seq_lens=(512,) * 4, scale=0.125)
        base = CostModel(topo, 5e10, 5e9).cost(prob, "ulysses", 4, groups, chunks=chunks)
        sync = CostModel(topo, 5e10, 5e9, sync_s=0.01).cost(prob, "ulysses", 4, groups, chunks=chunks)
        assert not [s for s in base.steps if "more chunk" in s.name]
        extra = [s for s in sync.steps if "more chunk" in s.name]
        assert len(extra) == 1 and math.isclose(extra[0].time_s, 2 * (chunks - 1) * 0.01), sync.steps


def test_overlap_share_adds_back_the_hidden_communication():
    from streamattn.topology import resolve_topology

    topo = resolve_topology(topology="2x2:inter=1Gbit/s")
    prob = _usp_problem(seq=8192)
    full = CostModel(topo, 5e10, 5e9).cost(prob, "ring", 1, ((0,), (1,), (2,), (3,)))
    none = CostModel(topo, 5e10, 5e9, overlap=0.0).cost(prob, "ring", 1, ((0,), (1,), (2,), (3,)))
    half = CostModel(topo, 5e10, 5e9, overlap=0.5).cost(prob, "ring", 1, ((0,), (1,), (2,), (3,)))
    ring_steps = [s for s in full.steps if s.overlapped]
    assert ring_steps, full.steps
    hidden = sum(s.compute_s + s.comm_s - s.time_s for s in ring_steps)
    assert hidden > 0
    assert math.isclose(none.predicted_s, full.predicted_s + hidden, rel_tol=1e-9)
    moving = sum(s.time_s for s in half.steps if s.name.startswith("CPU that moving the bytes"))
    assert math.isclose(half.predicted_s - moving, full.predicted_s + hidden / 2, rel_tol=1e-9)
    # blocking-only plans do not change
    uly_full = CostModel(topo, 5e10, 5e9).cost(prob, "ulysses", 4, ((0, 1, 2, 3),))
    uly_none = CostModel(topo, 5e10, 5e9, overlap=0.0).cost(prob, "ulysses", 4, ((0, 1, 2, 3),))
    assert uly_full.predicted_s == uly_none.predicted_s


def test_token_runs_do_not_change_what_a_transfer_contends_with():
    """On shared cores a ring step's transfer costs (1 - overlap) x its contended part whether its
    block is cut into token runs or not: charged on the step that posts it, against that step's
    compute. The case is the 2x4 200 Mbit/s text-free one where the runs' model had charged the
    whole transfer against the last step's compute as well (predicted 1022 ms, measured 806):
    there the transfer nearly outlasts twice the compute it hides behind and costs little; at
    1 Gbit/s it hides whole and costs the same with and without runs (the penalty is not vacuous)."""
    from streamattn.topology import resolve_topology

    prob = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                   seq_lens=(1024,) * 8, scale=0.125)
    groups = consecutive_groups(8, 4)
    for link, floor in (("200Mbit/s", 0.0), ("1Gbit/s", 0.05)):
        topo = resolve_topology(topology=f"2x4:inter={link},intra=2.6GB/s")
        added = {}
        for chunks in (1, 2, 8):
            shared = CostModel(topo, 2.5e10, 5e10, overlap=0.25).cost(prob, "usp", 4, groups, chunks=chunks)
            alone = CostModel(topo, 2.5e10, 5e10, overlap=1.0).cost(prob, "usp", 4, groups, chunks=chunks)
            moving = sum(st.time_s for st in shared.steps if st.name.startswith("CPU that moving"))
            added[chunks] = shared.predicted_s - moving - alone.predicted_s
        assert floor <= added[1] < 0.05 + floor * 4, (link, added)
        for chunks in (2, 8):
            assert math.isclose(added[chunks], added[1], rel_tol=1e-6, abs_tol=1e-9), (link, added)


def test_a_torus_exchange_contends_with_the_compute_it_overlapped():
    """A Torus exchange is hidden behind the blocks attended before it arrives; on shared cores
    its contended part is priced against that compute, not the block attended after it: an
    exchange that takes more than twice the local block costs nothing (200 Mbit/s; the old
    pricing charged 0.75 x 161 ms here, predicting 1339 ms for 1017 measured), one that hides
    behind it costs (1 - overlap) x its transfer (1 Gbit/s)."""
    from streamattn.topology import resolve_topology

    prob = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                   seq_lens=(1024,) * 8, scale=0.125)
    groups = consecutive_groups(8, 4)
    for link, hides in (("200Mbit/s", False), ("1Gbit/s", True)):
        topo = resolve_topology(topology=f"2x4:inter={link},intra=2.6GB/s")
        steps = {}
        for ov in (0.25, 1.0):
            c = CostModel(topo, 2.5e10, 5e10, overlap=ov).cost(prob, "torus", 4, groups, torus_degree=2)
            steps[ov] = next(st for st in c.steps if st.name.startswith("torus exchange 1/1"))
        local = next(st for st in c.steps if st.name.startswith("torus: post"))
        extra = steps[0.25].time_s - steps[1.0].time_s
        if hides:
            assert steps[1.0].comm_s < local.compute_s  # arrived during the local block
            assert math.isclose(extra, 0.75 * steps[1.0].comm_s, rel_tol=1e-6), (extra, steps)
        else:
            assert steps[1.0].comm_s > 2 * local.compute_s and steps[1.0].compute_s > local.compute_s
            assert extra == 0.0, (extra, steps)


@pytest.mark.parametrize("algorithm,u,groups", [("usp", 2, ((0, 1), (2, 3))), ("ring", 1, ((0,), (1,), (2,), (3,))),
                                                 ("ulysses", 4, ((0, 1, 2, 3),))])
def test_moving_bytes_costs_cpu_on_shared_cores(algorithm, u, groups):
    """On an oversubscribed CPU (overlap < 1) the busiest rank's CPU for moving what it sends and
    receives -- network bytes x net_cpu, shm bytes x one copy (2 / memory bandwidth), over the core
    share, recomputed here from the schedule's messages -- bounds the call with every step's
    compute: a last step adds what it does not fit into the steps' waits on peers and the wire
    (min(moving, compute + moving - the steps' sum)); nothing with a core per rank."""
    from streamattn.topology import resolve_topology

    topo = resolve_topology(topology="2x2:inter=1Gbit/s")
    prob = _usp_problem(T=64)
    net_cpu, mbw, share = 2e-9, 5e9, 0.5
    per = defaultdict(float)
    for _, msgs in messages(prob, u, groups):
        for a, b, n in msgs:
            c = net_cpu if topo.node[a] != topo.node[b] else 2 / mbw
            per[a] += n * c
            per[b] += n * c
    want = max(per.values()) / share
    assert want > 1e-4  # the check is not vacuous: megabytes move
    added = {}
    for rate in (1e8, 5e10):
        shared = CostModel(topo, rate, mbw, overlap=share, net_cpu=net_cpu).cost(prob, algorithm, u, groups)
        steps = [s for s in shared.steps if not s.name.startswith("CPU that moving the bytes")]
        extra = shared.predicted_s - sum(s.time_s for s in steps)
        expect = max(0.0, min(want, sum(s.compute_s for s in steps) + want - sum(s.time_s for s in steps)))
        assert math.isclose(extra, expect, rel_tol=1e-9, abs_tol=1e-12), (rate, extra, expect)
        added[rate] = extra
    # not vacuous: where the ring's steps are compute-bound part of it adds; Ulysses' blocking
    # all-to-alls over the network wait longer than it takes (the control: nothing adds)
    assert (added[1e8] > 0.1 * want) == (algorithm != "ulysses"), added
    idle = CostModel(topo, 1e8, mbw, overlap=1.0, net_cpu=net_cpu).cost(prob, algorithm, u, groups)
    assert not [s for s in idle.steps if s.name.startswith("CPU that moving")]


def test_calibration_times_a_window_not_one_call(monkeypatch):
    """time_block runs calls back to back for its window and returns their mean."""
    from streamattn import calibration

    calls = []
    import streamattn.kernels as kernels

    real = kernels.attention_with_lse

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kernels, "attention_with_lse", counting)
    import time

    t0 = time.perf_counter()
    t = calibration.time_block((1, 1, 16, 16, 8), torch.float32, window_s=0.02)
    # a tiny block: WINDOW_CALLS calls' worth of window (at least MIN_WINDOW_S), the mean of them
    assert time.perf_counter() - t0 >= calibration.MIN_WINDOW_S
    assert len(calls) > 3 and 0 < t < 0.02
    calls.clear()
    t0 = time.perf_counter()
    t = calibration.time_block((1, 8, 512, 512, 64), torch.float32, window_s=0.02)
    if t * calibration.WINDOW_CALLS > 0.02:  # a block of a millisecond or more: the whole window
        assert time.perf_counter() - t0 >= 0.02 and len(calls) >= 2


def test_calibration_on_a_shared_core_takes_cpu_time_over_the_share(monkeypatch):
    """share < 1 (more compute threads than cores): a call costs at least its CPU time / share,
    the wall time when the cores are shared fairly, even if the window ran with a core to spare."""
    import time

    import streamattn.kernels as kernels
    from streamattn import calibration

    def spin(*a, **k):  # ~1 ms of CPU per call, whatever the load
        c0 = time.thread_time()
        while time.thread_time() - c0 < 1e-3:
            pass

    monkeypatch.setattr(kernels, "attention_with_lse", spin)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the spin uses one thread
    shape = (1, 1, 16, 16, 8)
    alone = calibration.time_block(shape, torch.float32, window_s=0.02)
    shared = calibration.time_block(shape, torch.float32, window_s=0.02, share=0.25)
    assert 0.9e-3 < alone and shared > 3.5e-3, (alone, shared)
    assert calibration.time_block(shape, torch.float32, window_s=0.02, share=1.0) < 3 * alone


@pytest.mark.parametrize("P", [4])
def test_cpu_group_measures_sync_cost_and_core_share(rank_pool, P):
    """Every rank gets the same measured sync cost and core share; the share is cores / threads of
    the ranks on this machine (all P ranks share one kernel here)."""
    res = rank_pool(P).run("streamattn.testing.cases:cpu_plan_terms")
    assert len({r["sync_s"] for r in res}) == 1 and len({r["overlap"] for r in res}) == 1, res
    r = res[0]
    assert 0 < r["sync_s"] < 1.0 and r["shapes"] > 0
    assert math.isclose(r["overlap"], min(1.0, r["cores"] / (P * r["threads"])))
    assert r["net_cpu"] == 0.0  # one node: no network bytes to cost


def test_group_terms_are_measured_once_per_transport(rank_pool):
    """Three shapes planned on one fresh transport measure the sync cost once and all three plans
    get the same value (it was measured at every planning, and its noise moved the choice)."""
    res = rank_pool(2).run("streamattn.testing.cases:group_terms_measured_once")
    for r in res:
        assert r["measured"] == 1, r
        assert len(set(r["sync_s"])) == 1 and r["sync_s"][0] > 0, r
    assert len({tuple(r["sync_s"]) for r in res}) == 1, res


@pytest.mark.parametrize("P", [4])
def test_cpu_group_measures_cpu_per_network_byte(rank_pool, P):
    """Described as 2 nodes, the group times a 1 MiB exchange with the other node and every rank
    gets the same CPU seconds per byte: above zero (the TCP stack copies every byte) and below
    0.1 us (10 MB/s of CPU per side would be a broken measurement)."""
    res = rank_pool(P).run("streamattn.testing.cases:cpu_plan_terms", nodes=2)
    assert len({r["net_cpu"] for r in res}) == 1, res
    assert 0 < res[0]["net_cpu"] < 1e-7, res[0]


def test_compute_bound_tie_goes_to_fewer_exchange_rounds():
    """Compute-bound CPU calls: inside the tie band a Torus of t > 2 (t - 1 exchanges and outputs,
    each a wait on peers) loses to the USP predicted up to 8% slower (measured over three matrices
    on 2x2 / 2x4 at 1 Gbit/s, text-free 8192: Torus 1x4x1 and 2x4x1 ran 1.01-1.10x the best fixed
    plan when picked, never faster), and a ring in token runs to the unchunked ring; without the
    CPU terms the cheapest wins (negative control), and where the wire is the bottleneck the runs
    are ordered by the prediction."""
    from streamattn.planner import exchange_rounds, wire_bound
    from streamattn.plan import torus_degree
    from streamattn.topology import resolve_topology

    for P, spec in ((4, "2x2:inter=1Gbit/s,intra=3GB/s"), (8, "2x4:inter=1Gbit/s,intra=3GB/s")):
        p = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                    seq_lens=(8192 // P,) * P, scale=0.125)
        kw = dict(compute_rate=2.5e10, memory_bandwidth=4e10)
        cpu = make_plan(p, spec, sync_s=0.001, overlap=2 / P, net_cpu=0.3e-9, **kw)
        cheapest = min((c for c in cpu.candidates if c.valid), key=lambda c: c.predicted_s)
        assert cheapest.algorithm == "torus" and torus_degree(cheapest) > 2, cheapest  # the case
        assert not wire_bound(cheapest, resolve_topology(topology=spec))
        chosen = next(c for c in cpu.candidates if c.valid and (c.algorithm, c.ulysses_degree,
                      c.ring_degree, c.chunks, c.joint_fold) == (cpu.algorithm, cpu.ulysses_degree,
                      cpu.ring_degree, cpu.chunks, cpu.joint_fold))
        assert cpu.algorithm == "usp" and exchange_rounds(chosen) < exchange_rounds(cheapest)
        assert cpu.predicted_s <= cheapest.predicted_s * 1.08 and "fewest" in cpu.reason, cpu.reason
        plain = make_plan(p, spec, **kw)  # no CPU terms: no band, the cheapest wins
        assert plain.predicted_s == min(c.predicted_s for c in plain.candidates if c.valid)
        assert "fewest" not in plain.reason
    # a ring's token runs are rounds too where compute is the bottleneck (the unchunked USP inside
    # the band wins over the cheapest, in 2 runs), not where the wire is (100 Mbit/s: 8 runs stay)
    p = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                seq_lens=(2048,) * 4, scale=0.125)
    for link, want in (("200Mbit/s", 1), ("100Mbit/s", 8)):
        spec = f"2x2:inter={link},intra=3GB/s"
        plan = make_plan(p, spec, sync_s=0.0008, overlap=0.5, net_cpu=0.3e-9, compute_rate=3e10,
                         memory_bandwidth=4e10)
        cheapest = min((c for c in plan.candidates if c.valid), key=lambda c: c.predicted_s)
        assert cheapest.algorithm == "usp" and cheapest.chunks > 1, cheapest
        assert wire_bound(cheapest, resolve_topology(topology=spec)) == (want > 1)
        assert (plan.algorithm, plan.chunks) == ("usp", want), plan


def test_compute_bound_tie_counts_a_torus_outputs_home():
    """A Torus of t = 2 has one exchange and one output sent home: two rounds that wait on peers,
    against the unchunked USP's one. Inside the compute-bound CPU band the USP of the same u wins
    (measured at 1 Gbit/s over two matrices: Torus 4x2x1 ran 1.04-1.36x USP 4x2 in all ten 2x4
    cells, Torus 2x2x1 1.03-1.21x USP 2x2 in all ten 2x2 ones; auto's Torus 4x2x1 at text-free
    4096 lost to yunchang's best by 15%). Counting the exchange alone tied them and the
    prediction picked the Torus (negative control: the rule's key without the outputs); a Torus
    predicted cheaper by more than the band still wins."""
    from streamattn.planner import CPU_TIE, exchange_rounds, wire_bound
    from streamattn.plan import torus_degree
    from streamattn.topology import resolve_topology

    spec = "2x4:inter=1Gbit/s,intra=3GB/s"
    p = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                seq_lens=(512,) * 8, scale=0.125)
    kw = dict(sync_s=0.001, overlap=0.25, net_cpu=0.3e-9, compute_rate=2.5e10, memory_bandwidth=4e10)
    for torus_rate, torus_wins in ((2.6e10, False), (2.7e10, False), (2.8e10, True)):
        plan = make_plan(p, spec, block_rates={(1, 1, 2048, 2048, 64): torus_rate}, **kw)
        cheapest = min((c for c in plan.candidates if c.valid), key=lambda c: c.predicted_s)
        assert (cheapest.algorithm, cheapest.ulysses_degree, torus_degree(cheapest)) == ("torus", 4, 2)
        assert not wire_bound(cheapest, resolve_topology(topology=spec))
        usp = next(c for c in plan.candidates if c.valid and (c.algorithm, c.ulysses_degree, c.chunks)
                   == ("usp", 4, 1))
        assert exchange_rounds(cheapest) == 2 and exchange_rounds(usp) == 1
        inside = usp.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)
        assert inside != torus_wins  # the case: inside the band, then outside it
        got = (plan.algorithm, plan.ulysses_degree, plan.torus_degree)
        assert got == (("torus", 4, 2) if torus_wins else ("usp", 4, 1)), plan.reason
        if inside:  # negative control: the exchange alone ties them and the prediction decides
            band = [c for c in plan.candidates if c.valid
                    and c.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)]
            old = min(band, key=lambda c: (torus_degree(c) - 1 if c.algorithm == "torus" else c.chunks,
                                           c.predicted_s))
            assert old is cheapest


def test_compute_bound_tie_prefers_an_all_to_all_inside_the_nodes():
    """Inside the compute-bound CPU band, at equal exchange rounds, a plan whose Ulysses
    all-to-all stays inside the nodes (USP of one node's Ulysses degree: its inter-node transfer
    runs under compute) wins over Ulysses across the nodes (a blocking all-to-all over the
    network), even when Ulysses is predicted cheapest: at 1 Gbit/s Ulysses 4 / 8 ran 1.02x or more
    of that USP in 29 of 30 matrix cells, and auto's Ulysses 8 lost to yunchang by 8% at
    text-free 8192. Control: the rounds-then-prediction key alone keeps Ulysses; out of the band
    Ulysses stays."""
    from streamattn.planner import CPU_TIE, all_to_all_crosses_nodes, exchange_rounds, wire_bound
    from streamattn.topology import resolve_topology

    for spec, P, u, in_band, out_of_band in (("2x4:inter=1Gbit/s,intra=3GB/s", 8, 4, 2.8e10, 3.2e10),
                                             ("2x2:inter=1Gbit/s,intra=3GB/s", 4, 2, 2.7e10, 3.2e10)):
        topo = resolve_topology(topology=spec)
        p = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                    seq_lens=(8192 // P,) * P, scale=0.125)
        kw = dict(sync_s=0.001, overlap=2 / P, net_cpu=0.3e-9, compute_rate=2.5e10, memory_bandwidth=4e10)
        for uly_rate, usp_wins in ((in_band, True), (out_of_band, False)):
            plan = make_plan(p, spec, block_rates={(1, 8 // P, 8192, 8192, 64): uly_rate}, **kw)
            valid = [c for c in plan.candidates if c.valid]
            cheapest = min(valid, key=lambda c: c.predicted_s)
            assert (cheapest.algorithm, cheapest.ulysses_degree) == ("ulysses", P), cheapest.label
            assert all_to_all_crosses_nodes(cheapest, topo) and not wire_bound(cheapest, topo)
            usp = next(c for c in valid if (c.algorithm, c.ulysses_degree, c.chunks, c.joint_fold)
                       == ("usp", u, 1, False))
            assert not all_to_all_crosses_nodes(usp, topo)
            assert (usp.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)) == usp_wins  # the case
            got = (plan.algorithm, plan.ulysses_degree, plan.chunks)
            assert got == (("usp", u, 1) if usp_wins else ("ulysses", P, 1)), plan.reason
            if usp_wins:
                assert "blocking all-to-all across nodes" in plan.reason, plan.reason
                band = [c for c in valid if c.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)]
                old = min(band, key=lambda c: (exchange_rounds(c), c.predicted_s))
                assert old.algorithm == "ulysses"  # negative control: without the key


def test_a_transfer_that_outlasts_the_compute_is_not_wire_bound_when_the_cores_pace_the_call():
    """The band's wire rule needs the transfer to be most of the predicted call (WIRE_SHARE), not
    merely longer than the modelled compute: in the 1 Gbit/s flux cells the transfer outlasted the
    compute yet was 0.49-0.70 of the call, the rest being CPU on shared cores, and a ring's token
    runs picked there ran 1.03x the unchunked plan on average. Flux-like 1024 + 256 tokens, 2x2:
    at 600 Mbit/s (transfer 1.3x the compute, 0.56 of the call) the unchunked USP inside the band
    wins; at 250 Mbit/s, 2048 + 256 (0.82 of the call) the cheapest plan's runs stay (control)."""
    from streamattn.planner import CPU_TIE, WIRE_SHARE, network_bytes, wire_bound
    from streamattn.topology import resolve_topology

    for link, seq, rate, net_cpu, paced_by_wire in (("600Mbit/s", 1024, 1e11, 2e-9, False),
                                                    ("250Mbit/s", 2048, 3e10, 0.3e-9, True)):
        p = Problem(batch=1, heads=24, kv_heads=24, head_dim=32, dtype=torch.float32,
                    seq_lens=(seq // 4,) * 4, scale=32 ** -0.5, joint_len=256)
        spec = f"2x2:inter={link},intra=3GB/s"
        topo = resolve_topology(topology=spec)
        plan = make_plan(p, spec, sync_s=0.003, overlap=0.5, net_cpu=net_cpu, compute_rate=rate,
                         memory_bandwidth=2e10)
        cheapest = min((c for c in plan.candidates if c.valid), key=lambda c: c.predicted_s)
        assert cheapest.algorithm == "usp" and cheapest.chunks > 1, cheapest  # the case
        wire = topo.link(0, 2).transfer_time(network_bytes(cheapest), concurrent=2)
        assert wire > cheapest.compute_s  # the transfer outlasts the compute in both
        assert (wire >= WIRE_SHARE * cheapest.predicted_s) == paced_by_wire
        assert wire_bound(cheapest, topo) == paced_by_wire
        assert plan.algorithm == "usp" and plan.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)
        assert plan.chunks == (cheapest.chunks if paced_by_wire else 1), plan


def test_cpu_tie_band_prefers_fewer_network_bytes():
    """On CPU groups (sync cost or core share measured) candidates predicted within CPU_TIE of the
    cheapest are ties, and the one sending the fewest bytes over the network wins; without the CPU
    terms the cheapest wins (negative control)."""
    from streamattn.planner import (CPU_TIE, all_to_all_crosses_nodes, exchange_rounds, network_bytes,
                                    wire_bound)

    p = Problem(batch=1, heads=24, kv_heads=24, head_dim=32, dtype=torch.float32,
                seq_lens=(1536,) * 4, scale=32 ** -0.5)
    # (ring kernel at 8e10, USP's at 2.8e10: the cheapest is a wire-bound ring of 4, USP 2x2 within
    # the band; at 4e10 the ring had been cheapest only while a ring of three or more was credited
    # with forwarding its runs over a link still sending mine, at 3e10 USP only while token runs
    # were charged more contention for the same transfer than the unchunked ring)
    kw = dict(compute_rate=2.8e10, memory_bandwidth=5e9, block_rates={(1, 24, 1536, 1536, 32): 8e10})
    topo = "2x2:inter=200Mbit/s,intra=5GB/s"
    plain = make_plan(p, topo, **kw)
    cpu = make_plan(p, topo, sync_s=0.003, overlap=0.5, **kw)
    cheapest = min((c for c in cpu.candidates if c.valid), key=lambda c: c.predicted_s)
    net = {(c.label, c.chunks): sum(n for k, n in c.bytes_by_kind if k == "ethernet")
           for c in cpu.candidates if c.valid}
    assert plain.predicted_s == min(c.predicted_s for c in plain.candidates if c.valid)
    assert cpu.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)
    close = [c for c in cpu.candidates if c.valid and c.predicted_s <= cheapest.predicted_s * (1 + CPU_TIE)]
    assert net[(f"{cpu.algorithm} u={cpu.ulysses_degree} x r={cpu.ring_degree} [consecutive]",
                cpu.chunks)] == min(net[(c.label, c.chunks)] for c in close)
    assert len({net[(c.label, c.chunks)] for c in close}) > 1  # the band held a choice the key had to make
    from streamattn.topology import resolve_topology

    assert wire_bound(cheapest, resolve_topology(topology=topo))  # 200 Mbit/s: the wire decides
    # compute-bound (flux-like 2048 + 256 tokens on 2x4 at 1 Gbit/s, 8 ranks on 2 cores, the cell
    # where USP 4x2 was picked for its bytes and ran 1.09-1.19x slower than Ulysses 8 in stop 33,
    # before jumbo frames; not so since):
    # the network bytes do not decide; the fewest exchange rounds (Ulysses chunks, a ring's token
    # runs, a Torus' t - 1 exchanges and outputs home), then a plan without a blocking
    # all-to-all across the nodes, then the cheapest prediction, win (the cheapest here is
    # Ulysses 8, which the rounds alone would keep: the control for the all-to-all key)
    # (16384 + 256 tokens at 4 Gbit/s: the case must separate the two rules, and as the model
    # changed the fewest-bytes plan became the cheapest at 2048 + 256 (the ring's joint rows at 1/r
    # of the bytes), then at 4096 + 256 (a Torus' further waits on peers each cost sync_s), then at
    # 1 Gbit/s (a Torus of t = 8, the cheapest there, counts its 7 exchange rounds))
    pf = Problem(batch=1, heads=24, kv_heads=24, head_dim=32, dtype=torch.float32,
                 seq_lens=(2048,) * 8, scale=32 ** -0.5, joint_len=256)
    fast = make_plan(pf, "2x4:inter=4Gbit/s,intra=5GB/s", sync_s=0.003, overlap=0.25,
                     compute_rate=3e9, memory_bandwidth=5e9)
    top = min((c for c in fast.candidates if c.valid), key=lambda c: c.predicted_s)
    band = [c for c in fast.candidates if c.valid and c.predicted_s <= top.predicted_s * (1 + CPU_TIE)]
    topo8 = resolve_topology(topology="2x4:inter=4Gbit/s,intra=5GB/s")
    want = min(band, key=lambda c: (exchange_rounds(c), all_to_all_crosses_nodes(c, topo8), c.predicted_s))
    by_bytes = min(band, key=lambda c: (network_bytes(c), exchange_rounds(c), c.predicted_s))
    by_rounds = min(band, key=lambda c: (exchange_rounds(c), c.predicted_s))
    assert by_bytes is not want  # the case separates the two rules
    assert (by_rounds.algorithm, by_rounds.ulysses_degree) == ("ulysses", 8) and by_rounds is not want
    assert (fast.algorithm, fast.ulysses_degree, fast.ring_degree, fast.chunks) == (
        want.algorithm, want.ulysses_degree, want.ring_degree, want.chunks), (fast, want)
    # spelled out, so the test does not only restate the key: the unchunked USP 4x2 (folded, the
    # cheaper of the two joint layouts here), not the cheapest Ulysses 8 nor the fewest-bytes plan
    assert (fast.algorithm, fast.ulysses_degree, fast.ring_degree, fast.chunks, fast.joint_fold) == (
        "usp", 4, 2, 1, True), fast
    # then the fewest Ulysses chunks: on one node (no network bytes at all) with the CPU terms,
    # whenever an unchunked plan is inside the band it wins over a cheaper chunked one
    for seq in (512, 1536, 4096):
        p1 = dataclasses.replace(p, seq_lens=(seq,) * 4)
        one = make_plan(p1, "1x4:intra=2GB/s", sync_s=0.0005, overlap=0.5, compute_rate=3e10,
                        memory_bandwidth=5e9)
        best = min((c for c in one.candidates if c.valid), key=lambda c: c.predicted_s)
        band = [c for c in one.candidates if c.valid and c.predicted_s <= best.predicted_s * (1 + CPU_TIE)]
        assert one.chunks == min(c.chunks for c in band), (seq, one, band)


def test_torus_waits_beyond_the_first_cost_sync_each():
    """With a measured sync cost, a Torus pays a wait on a peer for each of its t - 1 arrivals and
    t - 1 outputs home beyond those costed with their transfers (one arrival; two outputs with
    ring factor 1, one after a ring of teams); t = 2 pays none, and without a sync cost nothing is
    added (negative control)."""
    from streamattn.plan import torus_degree

    p = Problem(batch=1, heads=8, kv_heads=8, head_dim=64, dtype=torch.float32,
                seq_lens=(512,) * 8, scale=0.125)
    topo = "2x4:inter=1Gbit/s,intra=5GB/s"
    kw = dict(compute_rate=3e9, memory_bandwidth=5e9, overlap=0.25)
    for sync in (0.0, 0.002):
        plan = make_plan(p, topo, sync_s=sync, **kw)
        tori = [c for c in plan.candidates if c.valid and c.algorithm == "torus"]
        assert {torus_degree(c) for c in tori} >= {2, 4}
        for c in tori:
            t = torus_degree(c)
            waits = (t - 2) + (t - 1) - (2 if c.ring_degree == 1 else 1)
            extra = [s for s in c.steps if "more waits on peers" in s.name]
            if sync and waits > 0:
                assert len(extra) == 1 and math.isclose(extra[0].time_s, waits * sync), c
            else:
                assert not extra, c


def test_joint_all_only_where_the_saved_transfer_beats_the_added_compute():
    """On shared cores (overlap < 1) a ring's all-joint-queries twin stays only where the joint
    rows' transfer it saves outweighs the joint queries it repeats: kept and picked on a 200 Mbit/s
    link, dropped (saying why) at 1 Gbit/s; without oversubscription the model alone decides."""
    from streamattn.topology import resolve_topology

    problem = Problem(1, 24, 24, 32, torch.float32, (64,) * 8, 32 ** -0.5, joint_len=256)
    kw = dict(sync_s=0.003, overlap=0.25, compute_rate=1.9e10, memory_bandwidth=4e10)
    slow = make_plan(problem, resolve_topology(topology="2x4:inter=200Mbit/s,intra=5GB/s"), **kw)
    assert slow.joint_all and slow.algorithm == "usp", slow.explain()
    fast = make_plan(problem, resolve_topology(topology="2x4:inter=1Gbit/s,intra=5GB/s"), **kw)
    assert not fast.joint_all, fast.explain()
    dropped = [c for c in fast.candidates if c.joint_all and c.dropped]
    assert dropped and all("cost more than the joint rows' transfer it saves" in c.dropped
                           for c in dropped)
    idle = make_plan(problem, resolve_topology(topology="2x4:inter=1Gbit/s,intra=5GB/s"),
                     **dict(kw, overlap=1.0, sync_s=0.0))
    assert not any(c.joint_all and c.dropped for c in idle.candidates)


def test_schedule_prices_the_copies_the_algorithms_make():
    """The ring's stacking copy only where ring_core makes it (pure ring: torch.stack; token runs:
    each run cut out); after USP's scatter the block already lies stacked. Parts messages pay a
    packing copy on each side exactly where the transport stages them: off the shm links, or on
    every link when the wire dtype differs."""
    from streamattn.topology import resolve_topology

    def stacks(prob, u, groups, chunks=1):
        return [p.name for p in phases(prob, u, groups, chunks) if p.name.startswith("ring: stack")]

    prob = _usp_problem(P=4, seq=4096)
    assert stacks(prob, 2, ((0, 1), (2, 3))) == []
    assert len(stacks(prob, 2, ((0, 1), (2, 3)), chunks=4)) == 1
    assert len(stacks(prob, 1, ((0,), (1,), (2,), (3,)))) == 1

    topo = resolve_topology(topology="2x2")  # ranks 0, 1 | 2, 3
    m = CostModel(topo, 5e10, 5e9)
    e = 4
    for groups, crossing in ((((0, 1), (2, 3)), False), (((0, 1, 2, 3),), True)):
        for wire in (None, torch.bfloat16):
            p = dataclasses.replace(prob, wire_dtype=wire)
            w = 2 if wire else e
            u = len(groups[0])
            for ph in phases(p, u, groups):
                if not ph.name.startswith("Ulysses all-to-all"):
                    continue
                added = {x: m.phase_mem(ph).get(x, 0.0) - ph.mem.get(x, 0.0) for x in range(4)}
                want = defaultdict(float)
                for a, b, n in ph.msgs:
                    if wire or topo.node[a] != topo.node[b]:
                        want[a] += 2 * e / w * n
                        want[b] += 2 * e / w * n
                assert added == {x: want[x] for x in range(4)}, (ph.name, groups, wire)
                staged = bool(wire) or crossing
                assert any(added.values()) == staged  # negative control: nothing added on shm


def test_schedule_prices_gqa_fitting_joint_rows_and_torus_exchanges_where_staged():
    """USP with GQA heads straddling K/V groups: the fitted K/V (fit_kv_heads' index_select) is a
    copy of the block, charged for those members only; the ring's joint rows (Parts) are staged on
    every link on the cast wire; the Torus exchange and its output gather pay packing only where
    staged."""
    from streamattn.schedule import fitted_kv, head_ranges, torus_parts
    from streamattn.topology import resolve_topology

    prob = Problem(batch=1, heads=12, kv_heads=4, head_dim=16, dtype=torch.float32,
                   seq_lens=(64,) * 6, scale=0.25)
    groups = ((0, 1, 2), (3, 4, 5))
    q_r, kv_r = head_ranges(12, 4, 3)
    fitted = [j for j in range(3) if fitted_kv(q_r[j], kv_r[j], 3) != kv_r[j][1] - kv_r[j][0]]
    assert fitted and len(fitted) < 3  # some members expand, some do not
    stack = [p for p in phases(prob, 3, groups) if p.name.startswith("ring: stack")]
    assert len(stack) == 1 and set(stack[0].mem) == {g[j] for g in groups for j in fitted}
    full = dataclasses.replace(prob, kv_heads=12)  # negative control: nothing to fit, no copy
    assert not [p for p in phases(full, 3, groups) if p.name.startswith("ring: stack")]

    topo = resolve_topology(topology="2x2")
    m = CostModel(topo, 5e10, 5e9)
    joint = _usp_problem(P=4, seq=256, T=32)
    for wire, want_shm in ((None, False), (torch.bfloat16, True)):
        p = dataclasses.replace(joint, wire_dtype=wire)
        ph = next(x for x in phases(p, 1, ((0,), (1,), (2,), (3,)))
                  if x.name.startswith("all-gather the joint output rows"))
        added = {x: m.phase_mem(ph).get(x, 0.0) - ph.mem.get(x, 0.0) for x in range(4)}
        shm_msgs = [(a, b, n) for a, b, n in ph.msgs if topo.node[a] == topo.node[b]]
        assert shm_msgs
        want = defaultdict(float)
        for a, b, n in ph.msgs:
            if want_shm or topo.node[a] != topo.node[b]:
                want[a] += 2 * n
                want[b] += 2 * n
        assert added == {x: want[x] for x in range(4)}, wire

    # Torus 1 x 2 x 1 on 2 nodes of 2: the exchange crosses the nodes -> packed and unpacked;
    # declared as one node of 4 (shm everywhere) -> nothing
    tprob = _usp_problem(P=4, seq=256)
    tgroups = ((0, 1), (2, 3))
    for spec, crossing in (("2x2", True), ("1x4", False)):
        model = CostModel(resolve_topology(topology=spec), 5e10, 5e9)
        parts = torus_parts(tprob, 2, 2, tgroups)
        extra = model.torus_exchange_mem(parts)
        sent = sum(n for msgs in parts.steps for _, _, n in msgs)
        assert math.isclose(sum(extra.values()), 2 * parts.staged * sent if crossing else 0.0)
        gather = next(p for p in parts.post if p.name.startswith("Ulysses all-to-all output"))
        assert gather.staged and not gather.cast
