"""Ring steps in token runs (plan.chunks > 1 for ring and USP, STREAMATTN_RING_CHUNKS): exact
against float64 forward and backward on real groups, really cut into runs (the message count the
schedule states, unlike the unchunked count), priced from the same schedule, and chosen by the
planner where the wire is the bottleneck."""
from __future__ import annotations

import dataclasses

import pytest
import torch

CASES = "streamattn.testing.cases:check_attention"
RUNS = {"STREAMATTN_RING_CHUNKS": "3"}

FORWARD = {
    2: [dict(seq=13, algorithm="ring"), dict(seq=13, algorithm="ring", causal=True, kv_heads=2),
        dict(seq=13, algorithm="ring", joint_len=3, joint_strategy="rear", batch=2),
        dict(seq=12, algorithm="ring", dtype="bfloat16", joint_len=2)],
    3: [dict(seq=17, heads=6, kv_heads=2, algorithm="ring", causal=True, lens=[7, 4, 6]),
        dict(seq=17, heads=3, algorithm="ring", joint_len=2)],
    4: [dict(seq=19, algorithm="usp", ulysses_degree=2, ring_degree=2, joint_len=3, kv_heads=2),
        dict(seq=19, algorithm="usp", ulysses_degree=2, ring_degree=2, causal=True),
        dict(seq=18, algorithm="ring", dtype="float16", joint_len=4, joint_strategy="rear"),
        dict(seq=21, algorithm="ring", causal=True, layout="bhsd", lens=[9, 2, 6, 4])],
    6: [dict(seq=25, heads=6, algorithm="usp", ulysses_degree=2, ring_degree=3, joint_len=2),
        dict(seq=25, heads=6, kv_heads=3, algorithm="usp", ulysses_degree=3, ring_degree=2,
             causal=True)],
    8: [dict(seq=35, heads=8, algorithm="usp", ulysses_degree=2, ring_degree=4, joint_len=3,
             kv_heads=2),
        dict(seq=34, heads=4, algorithm="ring", causal=True, batch=2)],
}
TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}


@pytest.mark.parametrize("P", sorted(FORWARD))
def test_ring_runs_exact(rank_pool, P):
    pool = rank_pool(P)
    for case in FORWARD[P]:
        res = pool.run(CASES, settings=RUNS, **case)
        tol = TOL[case.get("dtype", "float32")]
        assert max(r["err"] for r in res) <= tol, case
        if case.get("joint_len"):
            assert max(r["joint_err"] for r in res) <= tol, case
            assert len({r["joint_digest"] for r in res}) == 1, case


def test_more_runs_than_tokens_is_clamped_and_exact(rank_pool):
    """STREAMATTN_RING_CHUNKS above the shortest block's length runs one token per run."""
    res = rank_pool(4).run(CASES, seq=11, algorithm="ring", lens=[2, 3, 3, 3], causal=True,
                           settings={"STREAMATTN_RING_CHUNKS": "50"})
    assert max(r["err"] for r in res) <= 1e-5


@pytest.mark.parametrize("P,algorithm,u,r", [(4, "ring", 1, 4), (4, "usp", 2, 2)])
def test_ring_runs_gradients(rank_pool, P, algorithm, u, r):
    cases = [dict(seq=19, heads=4, kv_heads=2, algorithm=algorithm, ulysses_degree=u, ring_degree=r,
                  joint_len=3, settings=RUNS),
             dict(seq=19, heads=4, algorithm=algorithm, ulysses_degree=u, ring_degree=r, causal=True,
                  settings=RUNS)]
    per_rank = rank_pool(P).run("streamattn.testing.grad_cases:check_cases", cases=cases)
    for res in per_rank:
        for c in res:
            for name in ("out", "nograd_out", "dq", "dk", "dv", "jout", "djq", "djk", "djv"):
                assert c[name] is None or c[name] < 1e-5, (name, c[name])


@pytest.mark.parametrize("algorithm,u,r", [("ring", 1, 4), ("usp", 2, 2)])
def test_ring_runs_send_what_the_schedule_states(rank_pool, algorithm, u, r):
    """The byte counters of a run-cut call equal schedule.per_rank_bytes(chunks=3): the same bytes as
    unchunked, in more messages (the control: the unchunked count differs, so the check sees the
    runs)."""
    from streamattn.problem import Problem
    from streamattn.schedule import consecutive_groups, per_rank_bytes

    P, seq, heads, D = 4, 48, 4, 8
    pool = rank_pool(P)
    kw = dict(seq=seq, heads=heads, head_dim=D, algorithm=algorithm, ulysses_degree=u, ring_degree=r)
    chunked = pool.run("streamattn.testing.cases:bytes_per_call", settings=RUNS, **kw)
    plain = pool.run("streamattn.testing.cases:bytes_per_call", **kw)
    problem = Problem(1, heads, heads, D, torch.float32, (seq // P,) * P, D ** -0.5)
    groups = consecutive_groups(P, u)
    node_of = [0] * P  # one node: every byte is intra-node
    want = per_rank_bytes(problem, u, groups, node_of, chunks=3)
    want1 = per_rank_bytes(problem, u, groups, node_of)
    for rank in range(P):
        assert chunked[rank]["intra"] == want[rank]["intra"] == plain[rank]["intra"]
        assert chunked[rank]["messages"] == want[rank]["messages"]
        assert plain[rank]["messages"] == want1[rank]["messages"] != want[rank]["messages"]


@pytest.mark.parametrize("algorithm,u,r", [("ring", 1, 4), ("usp", 2, 2)])
def test_joint_all_sends_what_the_schedule_states(rank_pool, algorithm, u, r):
    """With joint tokens, every ring member attending all joint queries (STREAMATTN_JOINT_ALL):
    the byte counters equal schedule.per_rank_bytes(joint_all=True), without the joint rows'
    all-gather over the ring (the control: the split variant's count differs)."""
    from streamattn.problem import Problem
    from streamattn.schedule import consecutive_groups, per_rank_bytes

    P, seq, heads, D, T = 4, 48, 4, 8, 6
    pool = rank_pool(P)
    kw = dict(seq=seq, heads=heads, head_dim=D, algorithm=algorithm, ulysses_degree=u,
              ring_degree=r, joint_len=T)
    every = pool.run("streamattn.testing.cases:bytes_per_call",
                     settings={"STREAMATTN_JOINT_ALL": "always"}, **kw)
    split = pool.run("streamattn.testing.cases:bytes_per_call", **kw)
    problem = Problem(1, heads, heads, D, torch.float32, (seq // P,) * P, D ** -0.5, joint_len=T)
    groups = consecutive_groups(P, u)
    node_of = [0] * P
    want = per_rank_bytes(problem, u, groups, node_of, joint_all=True)
    want_split = per_rank_bytes(problem, u, groups, node_of)
    assert "all joint queries on every ring member" in every[0]["plan"], every[0]["plan"]
    for rank in range(P):
        assert every[rank]["intra"] == want[rank]["intra"], (rank, every[rank], want[rank])
        assert every[rank]["messages"] == want[rank]["messages"]
        assert split[rank]["intra"] == want_split[rank]["intra"] > want[rank]["intra"]


def _problem(P, seq, heads=8, D=64):
    from streamattn.problem import Problem

    return Problem(1, heads, heads, D, torch.float32, (seq // P,) * P, D ** -0.5)


def test_one_run_prices_as_the_unchunked_ring():
    """cost_ring_chunked's recurrence with one run is the unchunked ring's sum of max(c, m)."""
    from streamattn.costmodel import CostModel
    from streamattn.schedule import consecutive_groups
    from streamattn.topology import parse_spec

    topo = parse_spec("2x2:intra=5GB/s,inter=200Mbit/s")
    model = CostModel(topo, 4e10, 5e9)
    for u in (1, 2):
        groups = consecutive_groups(4, u)
        problem = _problem(4, 4096)
        algo = "ring" if u == 1 else "usp"
        plain = model.cost(problem, algo, u, groups)
        one = model.cost_ring_chunked(problem, algo, u, groups, 1)
        assert one.predicted_s == pytest.approx(plain.predicted_s, rel=1e-9)
        four = model.cost(problem, algo, u, groups, chunks=4)
        assert four.chunks == 4 and four.predicted_s < plain.predicted_s


def test_runs_compute_at_the_rate_calibrated_for_a_run():
    """A kernel call's fixed cost does not shrink with its keys, so a ring attended in token runs
    is priced at the rate calibrated for one run (calibration.run_shape): slower runs make the
    chunked plan dearer by what its attended-run-by-run steps compute, the first step (attended
    whole) excepted; the run rate equal to the block's changes nothing (the control)."""
    from streamattn.costmodel import CostModel
    from streamattn.schedule import consecutive_groups, phases
    from streamattn.topology import parse_spec

    topo = parse_spec("2x2:intra=5GB/s,inter=25Gbit/s")
    rate = 4e10
    model = CostModel(topo, rate, 5e9)
    problem = _problem(4, 2048)
    groups = consecutive_groups(4, 2)
    linear = model.cost(problem, "usp", 2, groups, chunks=4)
    same = model.cost(problem, "usp", 2, groups, chunks=4, run_rate=rate)
    slow = model.cost(problem, "usp", 2, groups, chunks=4, run_rate=rate / 2)
    assert same.predicted_s == pytest.approx(linear.predicted_s, rel=1e-12)
    ring = [p for p in phases(problem, 2, groups, 4) if p.name.startswith("ring step")]
    later = sum(max(p.compute.values()) for p in ring[1:]) / rate  # attended run by run
    assert slow.predicted_s - linear.predicted_s == pytest.approx(later, rel=0.05), (
        slow.predicted_s, linear.predicted_s, later)


def test_calibration_times_the_runs_of_a_chunked_ring():
    """calibration_shapes lists, for every chunked ring candidate, the finest token run of its
    block (the block's rows against a run's keys, 8 runs) -- not the coarser ones, whose rate is
    interpolated -- and make_plan prices those candidates at the runs' rate: runs calibrated slow
    move the choice off the chunked ring, runs at the block's rate keep it (the control)."""
    from streamattn.calibration import run_shape
    from streamattn.planner import (RING_CHUNKS, calibration_shapes, candidate_block_shape,
                                    candidate_run_shape, make_plan)
    from streamattn.topology import parse_spec

    topo = parse_spec("2x2:intra=5GB/s,inter=200Mbit/s")
    problem = _problem(4, 8192)
    kw = dict(compute_rate=4.5e10, memory_bandwidth=5e9, sync_s=0.002, overlap=0.5, net_cpu=0.45e-9)
    base = make_plan(problem, topo, **kw)
    assert base.chunks > 1, base
    shapes = calibration_shapes(problem, topo)
    for c in base.candidates:
        run = candidate_run_shape(problem, c)
        if c.valid and c.chunks > 1 and c.ring_degree > 1:
            block = candidate_block_shape(problem, c)
            assert run == run_shape(block, c.chunks) and run[3] < block[3], c
            assert run_shape(block, max(RING_CHUNKS)) in shapes
            assert (run in shapes) == (c.chunks == max(RING_CHUNKS)), c
        else:
            assert run is None, c
    even = {s: 4.5e10 for s in shapes}
    assert make_plan(problem, topo, block_rates=even, **kw).chunks == base.chunks
    slow = {s: (4.5e9 if s[3] < s[2] else 4.5e10) for s in shapes}
    assert make_plan(problem, topo, block_rates=slow, **kw).chunks == 1


def test_run_rate_interpolates_a_call_between_the_block_and_its_finest_run():
    """calibration.run_rate: a listed run's own rate; else the call's time affine in its keys
    between the block (256 keys) and the shortest run listed (32); None without both ends."""
    from streamattn.calibration import attention_flops, run_rate

    block, r2, r4, r8 = ((1, 12, 256, k, 32) for k in (256, 128, 64, 32))
    t = {block: 2.57e-3, r8: 0.54e-3}
    rates = {s: attention_flops(1, 256 * s[3], 12, 32) / x for s, x in t.items()}
    time_of = lambda s: attention_flops(1, 256 * s[3], 12, 32) / run_rate(rates, block, s)  # noqa: E731
    assert time_of(r8) == pytest.approx(0.54e-3)
    assert time_of(r2) == pytest.approx(0.54e-3 + 2.03e-3 * 96 / 224)
    assert time_of(r4) == pytest.approx(0.54e-3 + 2.03e-3 * 32 / 224)
    assert run_rate({**rates, r4: 1.0}, block, r4) == 1.0
    assert run_rate({block: rates[block]}, block, r4) is None
    assert run_rate({r8: rates[r8]}, block, r4) is None


@pytest.mark.parametrize("spec, u", [("3x1", 1), ("4x1", 1), ("3x2", 2), ("2x2", 1)])
def test_forwarded_runs_queue_behind_my_own_on_the_link(spec, u):
    """A ring of r >= 3 nodes sends r - 1 blocks over each node's uplink, one connection to the
    successor in posting order: in runs it can pipeline its compute, never its transfers, so on
    a wire-bound link it costs at least the r - 1 transfers back to back (a 3x2 emulated cluster
    ran USP 2x3 in runs at 201 ms where this was priced 121 ms, below the wire's 139 ms). The
    ring of 2 nodes (2x2, r = 4 over 2 uplinks: two of its three steps cross) is held to the
    same floor."""
    from streamattn.costmodel import CostModel
    from streamattn.schedule import consecutive_groups, phases
    from streamattn.topology import parse_spec

    n, g = map(int, spec.split("x"))
    P = n * g
    topo = parse_spec(f"{spec}:intra=5GB/s,inter=200Mbit/s")
    model = CostModel(topo, 1e12, 1e12)  # compute ~free: the wire decides
    groups = consecutive_groups(P, u)
    problem = _problem(P, 4096 * P)
    algo = "ring" if u == 1 else "usp"
    ring = [p for p in phases(problem, u, groups, 1) if p.name.startswith("ring step")]
    wire = sum(model.comm_time(p.msgs)[0] for p in ring[:-1])
    assert wire > 0
    for chunks in (2, 4, 8):
        c = model.cost(problem, algo, u, groups, chunks=chunks)
        assert c.chunks == chunks and c.predicted_s >= 0.99 * wire, (chunks, c.predicted_s, wire)


def test_planner_cuts_ring_steps_only_where_the_wire_is_the_bottleneck():
    """Wire-bound (200 Mbit/s): the last block's compute hides behind its own arrival, so the plan
    runs the ring in token runs; compute-bound (a fast link): each run costs a wait and buys nothing,
    so it does not. The control is the same problem on the two links."""
    from streamattn.planner import make_plan
    from streamattn.topology import parse_spec

    kw = dict(compute_rate=4.5e10, memory_bandwidth=5e9, sync_s=0.002, overlap=0.5, net_cpu=0.45e-9)
    slow = make_plan(_problem(4, 8192), parse_spec("2x2:intra=5GB/s,inter=200Mbit/s"), **kw)
    fast = make_plan(_problem(4, 8192), parse_spec("2x2:intra=5GB/s,inter=25Gbit/s"), **kw)
    assert slow.algorithm in ("usp", "ring") and slow.chunks > 1, slow
    assert fast.chunks == 1, fast
    forced = make_plan(_problem(4, 8192), parse_spec("2x2:intra=5GB/s,inter=200Mbit/s"),
                       algorithm="usp", ulysses_degree=2, **kw)
    assert forced.chunks == 1  # a forced configuration runs as asked


ORDER_CASES = [
    (2, dict(algorithm="ring", joint_strategy="front")),
    (4, dict(algorithm="ring", joint_strategy="rear", settings=RUNS)),
    (4, dict(algorithm="ring", settings={"STREAMATTN_JOINT_ALL": "always"})),
    (4, dict(algorithm="ring", settings=dict(RUNS, STREAMATTN_JOINT_ALL="always"))),
    (4, dict(algorithm="usp", ulysses_degree=2, ring_degree=2)),
]


@pytest.mark.parametrize("P,case", ORDER_CASES)
def test_first_ring_step_posted_before_any_attention(rank_pool, P, case):
    """The joint K/V work (ring.ring_core) runs once the first step's block is posted: before any
    kernel every rank has handed its block (all its token runs) to its ring successor, so a slow
    link starts at once (the schedule prices it so: ring step 1 overlaps it). Verified to fail
    with the joint work first (the order before 46a541a): no post to the successor precedes the
    first kernel."""
    res = rank_pool(P).run("streamattn.testing.cases:posts_before_first_kernel", **case)
    u = case.get("ulysses_degree") or 1
    runs = int(case.get("settings", {}).get("STREAMATTN_RING_CHUNKS", 1))
    for rank, got in enumerate(res):
        assert got["err"] <= 1e-5 and got["kernels"] > 0, got
        g, j = divmod(rank, u)
        successor = ((g + 1) % (P // u)) * u + j
        block = [n for peer, n in got["posts"] if peer == successor and n >= 1024]
        assert len(block) == runs, (rank, successor, got)


@pytest.mark.parametrize("causal", [False, True])
def test_usp_posts_its_own_runs_before_the_all_to_all_lands(rank_pool, causal):
    """USP in token runs (usp.py, sharding.run_starts): each member's block is read from its own
    tokens on, which it holds before the Ulysses all-to-all has landed, so runs of them reach the
    ring successor before the rank first waits for the all-to-all. Causal blocks are cut from
    their first token (masks want each run contiguous): only member 0 of each group has runs at
    hand then, member 1 posts none early (the control)."""
    P, u = 4, 2
    res = rank_pool(P).run("streamattn.testing.cases:posts_and_waits", seq=64, heads=4,
                           head_dim=16, algorithm="usp", ulysses_degree=u, ring_degree=2,
                           causal=causal, settings={"STREAMATTN_RING_CHUNKS": "4"})
    for rank, got in enumerate(res):
        assert got["err"] <= 1e-5, got
        g, j = divmod(rank, u)
        successor = predecessor = ((g + 1) % 2) * u + j  # a ring of two
        # the all-to-all's wait: on the Ulysses partner, or a collective's (peer None)
        first_wait = min(t for peer, t in got["waits"] if peer != predecessor)
        early = [n for peer, n, t in got["posts"] if peer == successor and t < first_wait]
        ring_posts = [n for peer, n, t in got["posts"] if peer == successor]
        assert len(ring_posts) == 4, (rank, got)
        if causal and j == 1:
            assert early == [], (rank, got)
        else:
            # 16 own tokens of 32: the run boundary nearest them moves to them (run_pieces)
            assert early == [2 * 16 * 2 * 16 * 4], (rank, got)


def test_run_pieces_cut_every_token_once():
    """sharding.run_lengths / run_pieces: every token of the block in exactly one run, no run
    empty, the last two shorter (half and a quarter of the others), a run across the wrap in two
    ranges, and a boundary moved to `lead` when no run empties."""
    from streamattn.sharding import KEY_GRANULE, run_lengths, run_pieces, split_lengths

    assert run_lengths(2048, 8) == [304, 304, 304, 304, 304, 304, 144, 80]
    assert run_lengths(128, 4) == [48, 48, 16, 16]  # 46, 47, 23, 12 cost 3.2x the block's kernel
    assert run_lengths(130, 4) == [50, 48, 16, 16]  # the remainder rides in the first run
    assert run_lengths(9, 8) == split_lengths(9, 8)  # too short to taper: a run would be empty
    assert run_lengths(7, 1) == [7]
    for total in (1, 2, 5, 13, 64, 1000):
        for runs in range(1, min(total, 9) + 1):
            for first in (0, total // 3, total - 1):
                for lead in (0, 1, total // 2, total):
                    cut = run_pieces(total, runs, first, lead)
                    rows = sorted(t for p in cut for s, n in p for t in range(s, s + n))
                    assert rows == list(range(total)), (total, runs, first, lead, cut)
                    assert len(cut) == runs and all(sum(n for _, n in p) > 0 for p in cut)
                    assert all(len(p) == 1 for p in cut) or first > 0
    assert run_pieces(10, 3, 7) == [[(7, 3), (0, 3)], [(3, 3)], [(6, 1)]]
    # Blocks with a granule per run: every run but the first a whole number of granules, also
    # with the boundary moved towards `lead` (to the last granule edge at or before it, so that
    # the run before it still holds only tokens below `lead`)
    for total in (64, 100, 130, 256, 1000, 1037):
        for runs in range(2, min(total // KEY_GRANULE, 9) + 1):
            for lead in (0, 17, total // 2, total // 2 + 5):
                cut = run_pieces(total, runs, total // 3, lead)
                sizes = [sum(n for _, n in p) for p in cut]
                assert all(n % KEY_GRANULE == 0 for n in sizes[1:]), (total, runs, lead, sizes)
                assert sizes[0] % KEY_GRANULE == total % KEY_GRANULE, (total, runs, lead, sizes)
    assert run_pieces(256, 4, 128, 120)[0] == [(128, 112)]  # 120 own tokens: 112 of them go first
    assert run_pieces(128, 4, 64, 64) == [[(64, 64)], [(0, 32)], [(32, 16)], [(48, 16)]]
    assert run_lengths(48, 4) == [17, 18, 9, 4]  # fewer tokens than a granule per run: in tokens
    assert run_pieces(32, 4, 16, 16) == [[(16, 16)], [(0, 7)], [(7, 6)], [(13, 3)]]
    assert run_pieces(32, 4, 16, 0) == [[(16, 12)], [(28, 4), (0, 7)], [(7, 6)], [(13, 3)]]


@pytest.mark.parametrize("causal", [False, True])
def test_ring_runs_are_the_messages_the_schedule_states(rank_pool, causal):
    """Each run a USP member posts to its ring successor has the size schedule.phases states for
    it, in order (both read sharding.run_starts / run_pieces), with uneven shards; the control:
    the cut from each block's first token (what causal runs) differs from the non-causal one."""
    from streamattn.problem import Problem
    from streamattn.schedule import consecutive_groups, phases

    P, u, seq, heads, D = 4, 2, 50, 4, 8
    lens = [14, 11, 12, 13]
    res = rank_pool(P).run("streamattn.testing.cases:posts_and_waits", seq=seq, heads=heads,
                           head_dim=D, algorithm="usp", ulysses_degree=u, ring_degree=2, lens=lens,
                           causal=causal, settings={"STREAMATTN_RING_CHUNKS": "4"})
    problem = Problem(1, heads, heads, D, torch.float32, tuple(lens), D ** -0.5, causal=causal)
    ring = [p for p in phases(problem, u, consecutive_groups(P, u), 4) if p.name.startswith("ring step")]
    other = dataclasses.replace(problem, causal=not causal)
    ring_other = [p for p in phases(other, u, consecutive_groups(P, u), 4)
                  if p.name.startswith("ring step")]
    for rank, got in enumerate(res):
        g, j = divmod(rank, u)
        successor = ((g + 1) % 2) * u + j
        sent = [n for peer, n, _ in got["posts"] if peer == successor]
        want = [n for a, b, n in ring[0].msgs if a == rank and b == successor]
        assert sent == want and len(want) == 4, (rank, sent, want)
        if j == 1:  # member 0's cut is the same either way; member 1's is not (the control)
            assert want != [n for a, b, n in ring_other[0].msgs if a == rank and b == successor]
