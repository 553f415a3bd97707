"""Perf-regression tests on an emulated 2x2 cluster (2 nodes x 2 ranks, shaped inter-node link).

One sweep measures every plan in ONE run, configurations interleaved call by call, and the tests
assert ratios between them (never absolute times) and exact byte counts. Skipped with the
preflight's reason where root / network namespaces / tbf are unavailable (never faked).

Size choice. With M = 2 nodes, Ulysses over all 4 ranks and USP 2x2 (Ulysses inside a node, ring
across) send the SAME inter-node bytes per rank: 4(M-1)/M · E/P = 2 · E/P = 2(r-1) · E/P. The
topology-aware plan wins only by overlapping its inter-node ring step with attention compute. With
C the inter-node transfer and X the compute: t_ulysses ≈ C + X; USP with one message per ring step
t ≈ max(C, X/2) + X/2 (the second block's attention waits for all of it: the gain peaks at 1.5x at
C = X/2); USP with its ring step in n token runs (ring.ring_core: each run attended as it arrives)
t ≈ max(C + X/(2n), X), which the planner picks where the wire is the bottleneck: the gain is
(C + X) / max(C + X/(2n), X), 1.88x at C = X with n = 8, 1.5x at C = 2X, and at C = X/2 no more
than the unchunked plan's 1.5x. So the "communication-bound size" is one where the inter-node
transfer is about the compute (measured in the same run as `inter_only_s` / `compute_only_s` and
printed). Because compute time depends on how loaded the shared CPU is, the length is calibrated at
the start of the run (see _calibrated_shape); 4 heads x 32, 150 Mbit/s per uplink. C/X does not
depend on the head count (both scale with it), so the regime is at the same length with fewer heads
while every call costs less (24 heads -> 8 took the sweep from 170 s to 62 s, 8 -> 4 to 55-58 s).
Until the ring's token runs (2026-12-04) the regime was C ~ X/2 at 300 Mbit/s, the unchunked USP's
best case, and the bar 1.15x (measured 1.20-1.29x there). At 300 Mbit/s C ~ X falls at ~3000 tokens,
70 ms calls where fixed per-call costs weigh (auto 1.21x faster than Ulysses 4 there); at 150 Mbit/s
it falls at 7000-9000 tokens: auto (USP 2x2 in 2-4 runs) 1.53x and 1.56x faster, 63-80 s a test.

Torus 2x2x1 runs in the same sweep (a fixed plan like the others, exact bytes checked). At M = 2 it
moves the same inter-node bytes as Ulysses and USP but hides less: only the local block (a quarter
of the block pairs) runs while its single exchange is in flight, and the last block's output goes
home after all compute; the planner does not pick it at this size (measured 1.1-1.2x slower than
USP 2x2 here) and the ratio bars are unchanged by it.

Calibration is measured before the sweep (a probe at S0 = 6144, then a second probe at the size
the first one asks for: C/X is not exactly proportional to 1/S) and again in the sweep itself
(USP 2x2's minimum inter-comm-only / compute-only). When the load of the shared CPU moved in between and the sweep's
C/X is outside CX_WINDOW -- the precondition of the speedup bar, not its outcome -- the sweep is sized
again from its own C/X and run once more (seen here: a probe under load measured C/X = 0.49, the
sweep then 1.1, and the speedup fell to 1.17x).

Noise: ratios are medians of per-round ratios (bench.perf.perf_failures, stat="paired"): calls of
all configurations are interleaved round by round, so load that lasts longer than a round cancels.
The earlier min-of-calls ratios measured, over six runs today under other sessions' load, 1.17x,
1.24x, 1.29x, 1.39x, 1.43x and 1.48x for the same test (one lucky quiet call of the slow plan is
enough to move them), and auto = USP 2x2 at 1.15x the fixed "usp 2x2" -- the same code -- in
one run.
"""
from __future__ import annotations

import math

import pytest

from streamattn import config
from streamattn.bench.cluster import EmulatedCluster, unavailable_reason
from streamattn.bench.perf import (doc_inter_elements_per_rank, expected_bytes, paired_summary,
                                   perf_failures)

pytestmark = pytest.mark.perf

NODES, RPN = 2, 2
INTER_BW = config.get("STREAMATTN_PERF_BW")
SHAPE = {"seq": 6144, "heads": 4, "head_dim": 32, "joint_len": 0, "batch": 1, "dtype": "float32"}
ITERS = config.get("STREAMATTN_PERF_ITERS")
# The speedup bar: issue 12's 1.3x (config STREAMATTN_PERF_MIN_SPEEDUP). History: 1.3x as issue 6
# asked; 1.2x after ten loaded runs on 2026-11-23 (1.17-1.43x); 1.15x from 2026-12-03 at C ~ X/2,
# where 4 ranks on 2 cores gave the unchunked USP 1.20-1.29x (the overlapped plan is CPU-bound there
# while Ulysses' network wait is not all idle); 1.3x again with the ring in token runs at C ~ X.
# The ratio is taken over the rounds of every configuration that ran auto's plan
# (bench.perf.perf_failures(pool=True)). The forced-Ulysses control fails either bar.
MIN_SPEEDUP = config.get("STREAMATTN_PERF_MIN_SPEEDUP")


def _reason():
    return unavailable_reason()


@pytest.fixture(scope="module")
def sweep():
    """Every plan (and a planner forced to a bad plan) on one cluster, in one interleaved run."""
    reason = _reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")
    from streamattn.bench.launch import emulated_pool
    from streamattn.bench.runner import PoolExecutor

    with EmulatedCluster(NODES, RPN, inter_bw=INTER_BW) as cluster:
        with emulated_pool(cluster, timeout=300) as pool:
            ex = PoolExecutor(pool, ranks_per_node=RPN, nodes=NODES)
            obs = []
            shape = _calibrated_shape(ex, cluster.inter_bw, obs)
            records = _sweep(ex, shape, cluster.inter_bw)
            ok, cx = _in_regime(records)
            if not ok and not config.get("STREAMATTN_PERF_SEQ"):
                # The load of the shared CPU moved between calibration and sweep: the precondition
                # (not the result) failed, so size again from the sweep's own C/X and run once more.
                seq = _seq_for(obs + [(shape["seq"], cx)])
                print(f"\nsweep at seq {shape['seq']} had C/X = {cx:.2f} (outside {CX_WINDOW}): "
                      f"re-run at seq {seq}")
                shape = dict(shape, seq=seq)
                records = _sweep(ex, shape, cluster.inter_bw)
    return _show(records, shape)


# C/X the calibration aims at: where the transfer is about the compute, the chunked ring's best case
# (module docstring). Measured at the old aim (0.5, for the unchunked USP) the sweep landed at
# 0.8-1.3x the aim, so the window below is wide.
TARGET_CX = 1.0
CX_WINDOW = (0.7, 1.6)
# With 4 heads the calibration asked for 7936-8448 on an idle machine (C/X 0.43-0.55 there): a cap
# at 8192 would leave a re-run nowhere to go when the sweep's C/X came out high. A first probe at
# 2048 tokens measured C/X 1.3-2.6 (fixed per-call costs weigh most there) and once sent the second
# probe to 12288 and the sweep to 11008 (145 s instead of 55 s): the first probe runs at 6144 and
# the cap is 10240 (a sweep there costs ~1.5x one at 8448).
SEQ_CAP = 10240


def _seq_for(obs):
    """The S where C/X = TARGET_CX, from [(S, C/X), ...] measured so far, rounded to 256 tokens,
    within [1024, SEQ_CAP]. C/X falls like S^-a: a = 1 in theory (C grows like S, X like S^2), but
    fixed per-call costs and the shared cores bend it (measured 1.9 between 3328 and 5888 tokens),
    so with two points a is fitted from the last two (clamped to 0.5-2.5)."""
    (s1, cx1), a = obs[-1], 1.0
    if len(obs) > 1 and obs[-2][0] != s1 and obs[-2][1] > 0 and cx1 > 0:
        s0, cx0 = obs[-2]
        a = min(2.5, max(0.5, math.log(cx0 / cx1) / math.log(s1 / s0)))
    return min(SEQ_CAP, max(1024, int(round(s1 * (cx1 / TARGET_CX) ** (1 / a) / 256)) * 256))


def _calibrated_shape(ex, inter_bw, obs):
    """The size where USP 2x2's inter-node transfer C is about its compute X on this machine
    now (X depends on how loaded the shared CPU is; see TARGET_CX): measure both at S0 = 6144
    (minimum of 3 compute-only / inter-comm-only calls each: other load only adds time), then
    _seq_for, then once more AT that size (C/X is not exactly proportional to 1/S: _seq_for fits
    the exponent from the two probes). Appends every (S, C/X) it measured to `obs`."""
    from streamattn.bench.runner import SweepSpec, run_sweep

    if config.get("STREAMATTN_PERF_SEQ"):
        return dict(SHAPE, seq=config.get("STREAMATTN_PERF_SEQ"))
    seq = SHAPE["seq"]
    for _ in range(2):
        probe = SweepSpec(shapes=[dict(SHAPE, seq=seq)], algorithms=["usp"], degrees=[(2, 2)],
                          iters=1, warmup=1, overlap=True, overlap_iters=3, check=False,
                          yunchang=False, trace_iters=0, limit=False)
        r = run_sweep(ex, probe, inter_bw=inter_bw, progress=False)[0]
        c, x = r["inter_only_min_s"], r["compute_only_min_s"]
        obs.append((seq, c / x))
        new = _seq_for(obs)
        print(f"\ncalibration at seq {seq}: inter-comm {c * 1e3:.0f} ms, compute {x * 1e3:.0f} ms"
              f" (C/X {c / x:.2f}) -> seq {new}")
        if abs(new - seq) <= 256:
            break
        seq = new
    return dict(SHAPE, seq=new)


def _ideal(cx, runs=8):
    """t_ulysses / t_usp in runs (module docstring) at C/X = cx."""
    return (1 + cx) / max(cx + 1 / (2 * runs), 1.0)


def _in_regime(records):
    """(ok, C/X) of USP 2x2 in the sweep itself: the size is communication-bound in the sense of
    the module docstring when its inter-node transfer is 0.7-1.6x its compute, where the ideal
    gain of the ring in runs is at least 1.5x (a 1.3x bar needs that headroom: 4 ranks share 2
    cores)."""
    r = next(x for x in records if x["config"] == "usp 2x2")
    cx = r["inter_only_min_s"] / r["compute_only_min_s"]
    return CX_WINDOW[0] <= cx <= CX_WINDOW[1], cx


def _sweep(ex, shape, inter_bw):
    from streamattn.bench.runner import SweepSpec, run_sweep

    spec = SweepSpec(shapes=[shape], algorithms=["auto", "ulysses", "ring", "usp", "torus"],
                     iters=ITERS, warmup=1, overlap=True, overlap_iters=2, check=True,
                     yunchang=False, force_auto="ulysses", trace_iters=0, limit=False)
    return run_sweep(ex, spec, inter_bw=inter_bw, progress=False)


def _show(records, shape):
    by = {r["config"]: r for r in records}
    by["_shape"] = shape
    print(f"\nperf sweep on emulated {NODES}x{RPN} at {INTER_BW}, seq {shape['seq']}:")
    for r in records:
        print(f"  {r['config']:<24} {r.get('plan', '')[:40]:<40} median "
              f"{r['latency_s']['median'] * 1e3:7.1f} ms  min {r['latency_s']['min'] * 1e3:7.1f}  compute-only "
              f"{(r.get('compute_only_s') or 0) * 1e3:6.1f}  inter-comm-only "
              f"{(r.get('inter_only_s') or 0) * 1e3:6.1f}  overlap {r.get('overlap_efficiency', 0):.2f}")
    return by


def _records(by, auto_name):
    """The records the checks look at, with `auto_name`'s record playing "auto"."""
    keep = [r for name, r in by.items() if not name.startswith(("auto", "_"))]
    return keep + [dict(by[auto_name], config="auto")]


def test_results_exact_and_plans_as_expected(sweep):
    for name, r in sweep.items():
        if not name.startswith("_"):
            assert r["err"] < 1e-5, (name, r["err"])
    # the cost-model planner may pick USP 2x2 (Ulysses inside a node), the ring, a Torus (intra
    # Ulysses 2 x torus 2, or torus 4 over single ranks), or Ulysses pipelined in head-group chunks
    # (its all-to-alls overlap attention) when they cost about the same, the rings in token runs
    # or not; never the one-shot Ulysses across nodes at this size
    a = sweep["auto"]
    assert (a["algorithm"], a["ulysses_degree"], a.get("torus_degree", 1), a["ring_degree"]) in (
        ("usp", 2, 1, 2), ("ring", 1, 1, 4), ("torus", 2, 2, 1), ("torus", 1, 4, 1)) or (
        a["algorithm"] == "ulysses" and a.get("chunks", 1) > 1), a["plan"]
    forced = sweep["auto(forced ulysses)"]
    assert forced["algorithm"] == "ulysses" and "FORCED" in forced["plan"], forced["plan"]


def test_auto_within_10_percent_of_best_fixed_plan(sweep):
    fails = perf_failures(_records(sweep, "auto"))
    assert not [f for f in fails if "best fixed" in f], fails


def test_topology_aware_plan_faster_than_ulysses_across_nodes(sweep):
    r = sweep["auto"]
    # the size is in the regime the docstring describes (inter-node transfer ~ compute / 2)
    assert r.get("inter_only_s") and r.get("compute_only_s")
    ok, cx = _in_regime([sweep["usp 2x2"]])
    print(f"\nUSP 2x2 inter-comm / compute at the tested size: {cx:.2f} (ideal speedup of the "
          f"ring in 8 runs {_ideal(cx):.2f}x)")
    s = paired_summary(_records(sweep, "auto"))
    print(f"auto vs ulysses 4: {s['speedup'][0]:.2f}x faster (bar {MIN_SPEEDUP}x); auto / "
          f"{s['worst'][1]['config']}: {s['worst'][0]:.2f}x (bar 1.10x)")
    fails = perf_failures(_records(sweep, "auto"), min_speedup=MIN_SPEEDUP)
    assert not [f for f in fails if "faster than" in f], fails


def test_checks_fail_when_planner_forced_to_a_bad_plan(sweep):
    """Negative control: the same checks on a real run whose planner answered "auto" with Ulysses
    over all 4 ranks must fail (a check that cannot fail proves nothing)."""
    fails = perf_failures(_records(sweep, "auto(forced ulysses)"), min_speedup=MIN_SPEEDUP)
    print("\nforced-bad-plan failures (expected):\n  " + "\n  ".join(fails))
    assert any("faster than" in f for f in fails), fails
    assert any("best fixed" in f for f in fails), fails


@pytest.mark.parametrize("name,algorithm,u,r,t", [
    ("ulysses 4", "ulysses", 4, 1, 1), ("ring 4", "ring", 1, 4, 1), ("usp 2x2", "usp", 2, 2, 1),
    ("torus 2x2x1", "torus", 2, 1, 2), ("auto", None, None, None, None)])
def test_exact_bytes_per_rank(sweep, name, algorithm, u, r, t):
    chunks = 1
    if name == "auto":  # whatever plan auto chose (chunks / runs: the same bytes in more messages)
        a = sweep["auto"]
        algorithm, u, r, t = a["algorithm"], a["ulysses_degree"], a["ring_degree"], a.get("torus_degree", 1)
        chunks = a.get("chunks", 1)
    got = sweep[name]["bytes_per_rank"]
    seq = sweep["_shape"]["seq"]
    want = expected_bytes(algorithm, u, r, t=t, seq=seq, heads=SHAPE["heads"],
                          head_dim=SHAPE["head_dim"], ranks_per_node=RPN, chunks=chunks)
    assert got == want, (name, got, want)
    assert not sweep[name].get("bytes_vary")
    # docs/algorithms.md volumes (elements per rank) for the node-crossing traffic
    P, E = NODES * RPN, seq * SHAPE["heads"] * SHAPE["head_dim"]
    inter_elems = [x["inter"] / 4 for x in got]
    if algorithm == "ulysses":
        assert inter_elems == [doc_inter_elements_per_rank("ulysses", NODES, P, E)] * P
    elif algorithm == "usp":
        assert inter_elems == [doc_inter_elements_per_rank("usp", NODES, P, E, r=r)] * P
    elif algorithm == "torus":
        if u == RPN:  # docs/algorithms.md's Torus row (intra Ulysses over the node, t = M)
            assert inter_elems == [doc_inter_elements_per_rank("torus", NODES, P, E)] * P
    else:  # ring: 2(P-1)E/P per rank in all, sent only by the ranks whose next hop crosses nodes
        total = [(x["inter"] + x["intra"]) / 4 for x in got]
        assert total == [doc_inter_elements_per_rank("ring", NODES, P, E)] * P
        assert [e > 0 for e in inter_elems] == [False, True, False, True]


def test_wire_bytes_match_counters(sweep):
    """The veth tx counters of each node's uplink agree with streamattn's payload counters
    (headers, ACKs and barrier bytes add a few percent at most)."""
    for name in ("ulysses 4", "usp 2x2", "ring 4", "torus 2x2x1"):
        r = sweep[name]
        payload = [sum(x["inter"] for x in r["bytes_per_rank"][n * RPN:(n + 1) * RPN])
                   for n in range(NODES)]
        for p, w in zip(payload, r["wire_tx_per_node"]):
            assert p <= w <= p * 1.08 + 65536, (name, payload, r["wire_tx_per_node"])
