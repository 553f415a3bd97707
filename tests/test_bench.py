"""Tests of `streamattn bench`: local ranks end to end, the refusal to run unshaped, and that the
emulated-cluster mode leaves no namespace, link, qdisc or process behind (also on Ctrl-C)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from streamattn.bench import cli
from streamattn.bench.cluster import ClusterUnavailable, unavailable_reason
from streamattn.bench.perf import expected_bytes
from streamattn.bench.runner import make_configs

TINY = ["--seq", "64,128", "--heads", "4", "--head-dim", "8", "--joint-len", "8", "--iters", "2",
        "--overlap-iters", "1", "--no-progress"]


def _reason():
    return unavailable_reason()


needs_netns = pytest.mark.skipif(_reason() is not None, reason=f"emulated cluster unavailable: {_reason()}")


def test_configs_cover_every_factorization():
    names = [c["name"] for c in make_configs(8, 24, ["auto", "ulysses", "ring", "usp"], yunchang=True)]
    assert names == ["auto", "ulysses 8", "ring 8", "usp 2x4", "usp 4x2",
                     "yunchang 1x8", "yunchang 2x4", "yunchang 4x2", "yunchang 8x1"]
    # 12 heads on 8 ranks: no Ulysses 8
    assert "ulysses 8" not in [c["name"] for c in make_configs(8, 12, ["ulysses", "ring"])]
    assert [c["name"] for c in make_configs(4, 24, ["auto"], force_auto="ulysses")] == [
        "auto", "auto(forced ulysses)"]


def test_torus_configs():
    """Torus runs with Ulysses over a whole node (u = ranks per node), every valid t x r."""
    cfgs = make_configs(4, 24, ["auto", "usp", "torus"], ranks_per_node=2)
    assert [c["name"] for c in cfgs] == ["auto", "usp 2x2", "torus 2x2x1"]
    assert cfgs[-1] == {"name": "torus 2x2x1", "kind": "streamattn", "algorithm": "torus",
                        "ulysses_degree": 2, "ring_degree": 1, "torus_degree": 2}
    assert [c["name"] for c in make_configs(8, 24, ["torus"], ranks_per_node=4)] == ["torus 4x2x1"]
    # 12 heads on 4x2: only the ring factor makes torus valid
    assert [c["name"] for c in make_configs(8, 12, ["torus"], ranks_per_node=2)] == ["torus 2x2x2"]
    assert make_configs(8, 24, ["torus"], degrees=[(2, 4)], ranks_per_node=4) == []
    assert [c["name"] for c in make_configs(2, 4, ["torus"])] == ["torus 1x2x1"]  # one node


def test_expected_bytes_formulas():
    # Ulysses 4 on 2x2: 3 peers x 4 messages' worth of S_l*H/4*D; 2 of the 3 peers are remote
    b = expected_bytes("ulysses", 4, 1, seq=64, heads=4, head_dim=8, ranks_per_node=2)
    per_peer = 16 * 1 * 8 * 4 * 4  # S_l * H/u * 4D * 4 bytes
    assert b == [{"intra": per_peer, "inter": 2 * per_peer, "messages": 6}] * 4
    ring = expected_bytes("ring", 1, 4, seq=64, heads=4, head_dim=8, ranks_per_node=2)
    step = 2 * 16 * 4 * 8 * 4
    assert [x["inter"] for x in ring] == [0, 3 * step, 0, 3 * step]


def test_perf_failures_pool_only_identical_plans():
    """Paired per-round ratios (default), and for min/median the calls of records that ran the same
    plan pooled (auto == usp 2x2 here); a planner forced to Ulysses still fails both checks."""
    from streamattn.bench.perf import perf_failures

    def rec(name, algo, u, r, ts, t=1):
        return {"config": name, "kind": "streamattn", "cfg": {"algorithm": algo}, "algorithm": algo,
                "ulysses_degree": u, "ring_degree": r, "torus_degree": t,
                "latency_s": {"min": min(ts), "median": sorted(ts)[len(ts) // 2], "all": ts}}

    fixed = [rec("ulysses 4", "ulysses", 4, 1, [1.65, 1.9]), rec("usp 2x2", "usp", 2, 2, [1.0, 1.4]),
             rec("torus 2x2x1", "torus", 2, 1, [1.19, 1.5], t=2)]
    auto = rec("auto", "usp", 2, 2, [1.15, 1.4])
    forced_recs = fixed + [rec("auto", "ulysses", 4, 1, [1.49, 1.8])]
    for stat in ("paired", "min"):  # paired: per-round ratios 1.15 and 1.0 -> 1.075
        assert perf_failures(fixed + [auto], stat=stat) == []
        forced = perf_failures(forced_recs, stat=stat)
        assert any("best fixed" in f for f in forced) and any("faster than" in f for f in forced)
    assert "1.15x the best fixed" in perf_failures(fixed + [auto], stat="min", pool=False)[0]
    # paired + pool: the rounds of auto and of the fixed run of its plan all count (6 ratios, median
    # 1.2x); auto's own 3 rounds alone have a median of 1.09x
    uly = rec("ulysses 4", "ulysses", 4, 1, [1.2, 1.2, 1.2])
    twin = rec("usp 2x2", "usp", 2, 2, [1.0, 1.0, 1.0])
    auto = rec("auto", "usp", 2, 2, [1.0, 1.1, 1.1])
    assert perf_failures([uly, twin, auto], min_speedup=1.15) == []
    assert "only 1.09x faster" in perf_failures([uly, twin, auto], min_speedup=1.15, pool=False)[0]


@pytest.mark.parametrize("u,t,r,rpn,heads", [(2, 2, 1, 2, 24), (4, 2, 1, 4, 24), (1, 4, 1, 2, 24),
                                             (2, 2, 2, 2, 12), (2, 3, 1, 2, 24), (1, 2, 4, 4, 8)])
def test_expected_torus_bytes_equal_the_cost_model(u, t, r, rpn, heads):
    """bench.perf's torus formula (written from docs/algorithms.md) and the cost model's message list
    (written from torus.py, checked against it in test_planner) agree per rank and link class."""
    import torch

    from streamattn.schedule import consecutive_groups, messages
    from streamattn.problem import Problem

    P, seq, D = u * t * r, 96, 8
    b = expected_bytes("torus", u, r, t=t, seq=seq, heads=heads, head_dim=D, ranks_per_node=rpn)
    prob = Problem(1, heads, heads, D, torch.float32, (seq // P,) * P, D ** -0.5)
    want = [{"intra": 0, "inter": 0, "messages": 0} for _ in range(P)]
    for _, msgs in messages(prob, u, consecutive_groups(P, u), torus_degree=t):
        for a, dst, n in msgs:
            want[a]["inter" if a // rpn != dst // rpn else "intra"] += n
            want[a]["messages"] += 1
    assert b == want
    if u == rpn and r == 1:  # docs/algorithms.md's Torus row: 4 (M-1)/M E/P across nodes
        E = seq * heads * D * 4
        assert all(x["inter"] == 4 * (t - 1) * E // (t * P) for x in b)


def test_timed_rounds():
    """--min-time: more rounds for cheap shapes, the slowest configuration deciding; never fewer
    than --iters, never more than --max-iters."""
    from streamattn.bench.runner import SweepSpec, timed_rounds

    spec = SweepSpec(shapes=[], algorithms=[], iters=5, min_time=1.0, max_iters=40)
    assert timed_rounds(spec, [0.03, 0.1]) == 10       # the slowest: 10 x 0.1 s
    assert timed_rounds(spec, [0.4, 0.5]) == 5         # already long: --iters
    assert timed_rounds(spec, [0.001]) == 40           # capped
    assert timed_rounds(SweepSpec(shapes=[], algorithms=[], iters=5), [0.001]) == 5  # off by default


def _order_balance(order, n, rounds):
    """(positions[c] = how often c ran at each place, pairs[(a, b)] = how often b ran right after a)."""
    from collections import Counter

    pos, pairs = Counter(), Counter()
    for i in range(rounds):
        row = order(n, i)
        assert sorted(row) == list(range(n))
        pos.update((c, j) for j, c in enumerate(row))
        pairs.update(zip(row, row[1:]))
    return pos, pairs


@pytest.mark.parametrize("n", range(1, 12))
def test_round_order_balances_positions_and_neighbours(n):
    """Every n rounds (2n for odd n) each configuration runs once (twice) in each position and
    right after each other configuration once (twice); the old rotation keeps one neighbour."""
    from streamattn.bench.runner import round_order

    rounds = n if n % 2 == 0 else 2 * n
    pos, pairs = _order_balance(round_order, n, rounds)
    assert set(pos.values()) == {rounds // n}
    want = {(a, b) for a in range(n) for b in range(n) if a != b}
    assert set(pairs) == want and set(pairs.values()) <= {rounds // n}
    if n >= 3:  # negative control: a rotation puts "auto" (0) behind the same configuration always
        _, rot = _order_balance(lambda m, i: list(range(i % m, m)) + list(range(i % m)), n, rounds)
        assert {a for (a, b) in rot if b == 0} == {n - 1}
        assert set(rot) != want


def test_local_bench_end_to_end(tmp_path, capsys):
    # --min-time far above what 2 calls take: every configuration gets --max-iters rounds
    # 127 + 8 tokens do not split in two equal shards: no yunchang rows there, and a note says so
    args = TINY[:]
    args[1] = "64,127"
    rc = cli.main(["--nproc", "2", "--out", str(tmp_path)] + args + ["--min-time", "600", "--max-iters", "3"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out
    assert "no yunchang rows for seq 127 + text 8" in captured.out + captured.err
    assert "rows for seq 64" not in captured.out + captured.err
    data = json.loads((tmp_path / "bench.json").read_text())
    env = data["environment"]
    assert env["torch"] and env["cpu_count"] and env["topology"] == "1x2" and env["mode"] == "local"
    assert env["cpu_malloc"] == ["retain"]  # set in every rank before the first timing
    runs = data["runs"]
    explained = 0
    assert {r["shape"]["seq"] for r in runs} == {64, 127}
    yunchang_seqs = {r["shape"]["seq"] for r in runs if r["kind"] == "yunchang"}
    assert yunchang_seqs == {64}, yunchang_seqs  # present where it fits (the control)
    for r in runs:
        assert r["err"] < 1e-5, r
        if r.get("cfg", {}).get("native"):
            continue
        lat = r["latency_s"]
        assert lat["min"] <= lat["median"] <= lat["max"] and lat["n"] == 3
        assert r["cpu_s"] > 0  # CPU seconds of a call, summed over the ranks
        assert r["page_faults"] >= 0  # minor faults of a call, summed over the ranks
        assert 0 <= r["start_late_s"] < 1  # local ranks share a clock: every call starts together
        if r["kind"] == "streamattn":
            assert r["bytes"]["intra_total"] > 0 and r["bytes"]["inter_total"] == 0
            assert r["compute_only_s"] > 0 and r["comm_only_s"] > 0 and r["overlap_efficiency"] > 0
            assert r["compute_only_cpu_s"] > 0 and r["comm_only_cpu_s"] > 0
            assert "predicted_s" in r
            # what the prediction was made from, for reading a miss later: the planner's context
            # and the chosen candidate's steps, which add up to the prediction
            if r["predicted_s"] is not None:
                explained += 1
                assert "Problem:" in r["plan_context"], r["plan_context"]
                total = sum(s["time_s"] for s in r["predicted_steps"])
                assert abs(total - r["predicted_s"]) <= 1e-9 * max(1.0, total), (total, r)
    assert explained > 0
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "median ms" in out and "auto" in out and "ulysses 2" in out


def test_refuses_to_run_unshaped(monkeypatch, capsys, tmp_path):
    """No root / no netns: say why and exit non-zero, never fall back to local ranks."""
    import streamattn.bench.cluster as cluster
    import streamattn.testing as testing

    def no(need_netem=False):
        raise ClusterUnavailable("emulated cluster needs root (test)")

    def must_not_spawn(*a, **k):
        raise AssertionError("spawned ranks without a cluster")

    monkeypatch.setattr(cluster, "preflight", no)
    monkeypatch.setattr(testing, "RankPool", must_not_spawn)
    rc = cli.main(["--emulate", "2x2", "--out", str(tmp_path)] + TINY)
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs root (test)" in err and "refusing to run unshaped" in err
    assert not (tmp_path / "bench.json").exists()


# ─────────────────────────────────────────────────── emulated cluster: nothing left behind


def _leftovers(pid: int, tag: str) -> dict:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    qd = subprocess.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    procs = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if tag.encode() in f.read():
                        procs.append(int(d))
            except OSError:
                pass
    hexpid = f"{pid:06x}"
    return {"netns": [l for l in ns.splitlines() if f"streamattn-{pid}-" in l],
            "links": [l for l in links.splitlines() if hexpid in l],
            "qdiscs": [l for l in qd.splitlines() if hexpid in l],
            "procs": procs}


def _start_cli(tmp_path, extra):
    tag = f"STREAMATTN_BENCH_TEST_TAG={uuid.uuid4().hex}"
    env = dict(os.environ, STREAMATTN_BENCH_TEST_TAG=tag.split("=", 1)[1])
    p = subprocess.Popen([sys.executable, "-m", "streamattn.bench", "--emulate", "2x2",
                          "--inter-bw", "1gbit", "--out", str(tmp_path)] + extra,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return p, tag


@needs_netns
def test_emulated_cli_runs_and_leaves_nothing_behind(tmp_path):
    p, tag = _start_cli(tmp_path, TINY + ["--algorithms", "auto,ulysses,usp"])
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, out + err
    assert "emulated 2x2" in out and "measured node0->node1" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["environment"]["topology"] == "2x2" and data["environment"]["inter_bw_bit_s"] == 1e9
    assert data["environment"]["mtu"] == 9000 and "MTU 9000" in out  # jumbo frames by default
    assert data["environment"]["tcp_congestion_control"] == "cubic" and "TCP cubic" in out
    auto = [r for r in data["runs"] if r["config"] == "auto"]
    assert auto and all(r["algorithm"] in ("usp", "ring", "ulysses", "torus") for r in auto)
    assert all(r["bytes"]["inter_total"] > 0 for r in auto)
    assert (tmp_path / "bench.png").exists()
    assert _leftovers(p.pid, tag) == {"netns": [], "links": [], "qdiscs": [], "procs": []}


@needs_netns
def test_emulated_cli_ctrl_c_leaves_nothing_behind(tmp_path):
    # iterations enough that the run is still going when SIGINT comes (50 had finished in the 2 s
    # below on a warm calibration cache, and the bench rightly exited 0)
    p, tag = _start_cli(tmp_path, ["--seq", "4096", "--heads", "4", "--head-dim", "16",
                                   "--iters", "5000", "--no-progress"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the ranks are up inside the namespaces
        if len(_leftovers(p.pid, tag)["procs"]) >= 4 + 1 and _leftovers(p.pid, tag)["netns"]:
            break
        time.sleep(0.2)
    else:
        p.kill()
        pytest.fail("bench did not start its ranks")
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert _leftovers(p.pid, tag) == {"netns": [], "links": [], "qdiscs": [], "procs": []}


# ─────────────────────────────────────────────────── breakdown (trace), limit, comm_dtype


def test_trace_hooks_are_noops_when_off_and_cheap():
    from streamattn import trace

    assert not trace.enabled()
    assert trace.span("kernel") is trace.span("pack")  # one shared no-op object, nothing recorded
    trace.add("wait", 0.0, 1.0, peer=1, inter=True)
    trace.event("post", peer=1, nbytes=10)
    # a disabled hook costs well under a microsecond-scale budget: 25 hooks per call (what a
    # traced 2x2 call records) stay far below 1% of even a 10 ms call
    assert trace.hook_cost_s(20000) < 4e-6
    with trace.recording() as rec:
        assert trace.enabled()
        with trace.span("kernel"):
            pass
        t = trace.now()
        trace.add("wait", t, t + 0.002, peer=3, inter=True)
        trace.add("wait", t + 0.002, t + 0.003, peer=3, inter=True)  # contiguous: folded
        trace.add("wait", t + 0.003, t + 0.004, peer=1, inter=False)
    assert not trace.enabled()
    assert [s[0] for s in rec.spans] == ["kernel", "wait", "wait"]
    summ = trace.summarize(rec.spans, 0.010)
    assert abs(summ["wait_inter"] - 0.003) < 1e-9 and abs(summ["wait_intra"] - 0.001) < 1e-9
    assert summ["wait_by_peer"] == {"3": pytest.approx(0.003), "1": pytest.approx(0.001)}
    assert abs(sum(summ[k] for k in ("kernel", "merge", "pack", "post", "copy", "wait_intra",
                                     "wait_inter", "other")) - 0.010) < 1e-9


def _traced_usp_2x2(rank_pool, transport):
    """Each rank's bench_call result for one traced USP 2x2 call (seq 256, 4 heads x 8) on 4 ranks
    declared as 2 nodes x 2, after one checked call."""
    pool = rank_pool(4, env={"STREAMATTN_TOPOLOGY": "2x2", "STREAMATTN_TRANSPORT": transport})
    shape = {"seq": 256, "heads": 4, "head_dim": 8, "joint_len": 0, "batch": 1, "dtype": "float32"}
    cfg = {"name": "usp 2x2", "kind": "streamattn", "algorithm": "usp", "ulysses_degree": 2,
           "ring_degree": 2}
    pool.run("streamattn.bench.tasks:bench_call", shape=shape, cfg=cfg, mode="full", check=True)
    return pool.run("streamattn.bench.tasks:bench_call", shape=shape, cfg=cfg, mode="full", trace=True)


def test_traced_call_breakdown_adds_up_and_bytes_equal_the_schedule(rank_pool):
    """A traced USP 2x2 call on 4 ranks (declared 2 nodes): every rank records kernel spans and
    waits on the peers the schedule says it receives from; spans never exceed the rank's own time;
    the transport byte counters equal streamattn.schedule's per-rank bytes (the same numbers the
    cost model times and bench.perf expects). Negative control: a schedule for the other placement
    (USP's ring over Ulysses 4x1) does not match."""
    from streamattn import trace

    res = _traced_usp_2x2(rank_pool, "torch")
    want = expected_bytes("usp", 2, 2, seq=256, heads=4, head_dim=8, ranks_per_node=2)
    assert [r["bytes"] for r in res] == want
    assert [r["bytes"] for r in res] != expected_bytes("ulysses", 4, 1, seq=256, heads=4, head_dim=8,
                                                        ranks_per_node=2)
    for rank, r in enumerate(res):
        kinds = {s[0] for s in r["spans"]}
        assert {"kernel", "merge", "pack", "post"} <= kinds, kinds
        summ = trace.summarize(r["spans"], r["t_rank"])
        assert summ["other"] >= 0 and sum(summ[k] for k in ("kernel", "merge", "pack", "post", "copy",
                                                            "wait_intra", "wait_inter")) <= r["t_rank"] + 1e-4
        waited = {int(p) for p in summ["wait_by_peer"]}
        # USP 2x2 on 2x2: the Ulysses partner (same node) and the ring partner (other node)
        assert waited <= {rank ^ 1, rank ^ 2}, waited
        posts = [e for e in r["events"] if e[0] == "post"]
        assert sum(e[4] for e in posts) == want[rank]["intra"] + want[rank]["inter"]
        assert all(e[3] == (e[2] // 2 != rank // 2) for e in posts)  # inter flag = other node


def test_traced_call_sets_up_its_recorder_before_the_common_start(rank_pool):
    """The recorder and its wrapped kernel/merge hooks are set up before the ranks' common start:
    set up after it, the first traced call of each process found the algorithm modules on disk
    and the ranks entered the call up to 9 ms apart (4 ranks / 2 cores), a skew no untraced call
    has, shown in every breakdown and timeline (traced/untraced 1.14-1.32). Negative control: the
    untraced call reaches the start with no recorder."""
    got = rank_pool(2).run("streamattn.bench.tasks:recorder_at_common_start")
    assert got == [[True, False]] * 2


def test_shm_transport_files_inter_node_waits_as_waits(rank_pool):
    """With the one-sided shm transport, inter-node messages ride the base transport (counted by
    the shm transport, so count=False there). Their waits are "wait" on the other node's peer, not
    "agree": "agree" is only the agreement exchange (tags.AGREEMENT). The mislabel this guards
    against made a 200 Mbit/s run's breakdown show 80 ms of "agree" and 0 ms of wait_inter."""
    from streamattn import trace

    res = _traced_usp_2x2(rank_pool, "shm")
    for rank, r in enumerate(res):
        inter_waits = {s[3] for s in r["spans"] if s[0] == "wait" and s[4]}
        assert inter_waits == {rank ^ 2}, (rank, inter_waits)  # the ring partner on the other node
        summ = trace.summarize(r["spans"], r["t_rank"])
        assert set(summ["wait_by_peer"]) <= {str(rank ^ 1), str(rank ^ 2)}


def test_limit_and_comm_dtype_in_a_local_run(tmp_path, capsys):
    """The limit is timed and every record carries measured/limit; the bfloat16 wire runs as an
    extra auto configuration, sends fewer bytes and reports its (larger, bounded) error."""
    rc = cli.main(["--nproc", "2", "--out", str(tmp_path), "--seq", "128", "--heads", "4",
                   "--head-dim", "8", "--joint-len", "0", "--iters", "1", "--no-overlap",
                   "--no-progress", "--algorithms", "auto,ring", "--comm-dtype", "bfloat16",
                   "--breakdown", "--trace-iters", "1", "--autotune", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    by = {r["config"]: r for r in runs}
    lim = by["auto"]["limit"]
    assert lim["compute_s"] > 0 and lim["bound_by"] == "compute" and by["auto"]["over_limit"] > 0
    assert lim["compute_cpu_s"] > 0 and by["auto"]["cpu_over_limit"] > 0
    wire = by["auto bfloat16 wire"]
    assert wire["bytes"]["intra_total"] * 2 == by["auto"]["bytes"]["intra_total"]
    assert 1e-5 < wire["err"] < 3e-2 and by["auto"]["err"] < 1e-5
    assert by["auto"]["breakdown"]["per_rank"][0]["kernel"] > 0
    tuned = by["auto tuned"]  # STREAMATTN_AUTOTUNE=1: its trials ran in the warm-up
    assert tuned["err"] < 1e-5 and tuned["latency_s"]["median"] > 0
    assert "measured/limit" in out and "wait_inter" in out and "cpu ms" in out
    assert (tmp_path / "timeline-auto-128.png").stat().st_size > 1000


# ─────────────────────────────────────────────────── the collective all-to-all (gloo)

A2A = {"STREAMATTN_ALLTOALL": "collective", "STREAMATTN_TRANSPORT": "torch"}


@pytest.mark.parametrize("kw", [dict(seq=37, heads=8), dict(seq=40, heads=8, kv_heads=2, joint_len=5),
                                dict(seq=36, heads=8, causal=True)])
def test_collective_all_to_all_is_exact_and_sends_the_schedule(rank_pool, kw):
    """Ulysses over ONE all_to_all_single per exchange (STREAMATTN_ALLTOALL=collective): exact
    against float64 (uneven shards, GQA, joint tokens, causal) and the same payload bytes as the
    point-to-point path."""
    pool = rank_pool(4, env=A2A)
    res = pool.run("streamattn.testing.cases:check_attention", algorithm="ulysses", **kw)
    assert all(r["err"] < 1e-5 for r in res), res
    assert all(r["joint_err"] is None or r["joint_err"] < 1e-5 for r in res), res
    got = pool.run("streamattn.testing.cases:bytes_per_call", seq=64, heads=8, head_dim=8,
                   algorithm="ulysses")
    want = expected_bytes("ulysses", 4, 1, seq=64, heads=8, head_dim=8, ranks_per_node=4)
    assert [{k: g[k] for k in ("intra", "inter", "messages")} for g in got] == want


def test_collective_all_to_all_timeout_names_the_silent_peer(rank_pool):
    pool = rank_pool(4, env=dict(A2A, STREAMATTN_TIMEOUT_S="3", POOL_VARIANT="a2a-silent"))
    res = pool.run("streamattn.testing.perf_cases:collective_silent_peer", silent_rank=2)
    for rank, r in enumerate(res):
        if rank == 2:
            continue
        assert r["type"] == "PeerTimeoutError", r
        # the per-call signature (streamattn.agreement) precedes the collective and names the
        # silent peer point-to-point, before any all_to_all_single is posted
        assert "rank 2" in r["error"] and r["peer"] == 2, r


def test_matrix_rows_and_checks_from_records():
    """bench --matrix's summary of one run: best fixed / yunchang's best / limit ratios and the
    acceptance checks (a slow auto is flagged, a loaded run too)."""
    from streamattn.bench.matrix import format_matrix, summarize

    def rec(name, kind, algo, ts, **kw):
        cfg_algo = "auto" if name.startswith("auto") else algo
        return {"config": name, "kind": kind, "cfg": {"algorithm": cfg_algo, **kw.pop("cfg", {})},
                "algorithm": algo, "ulysses_degree": 2, "ring_degree": 2, "shape": {"seq": 1024, "joint_len": 0},
                "latency_s": {"median": sorted(ts)[len(ts) // 2], "all": ts}, **kw}

    lim = {"limit_s": 0.100, "bound_by": "wire", "compute_s": 0.08, "wire_s": 0.100}
    records = [rec("auto", "streamattn", "usp", [0.105, 0.106], limit=dict(lim, compute_cpu_s=0.15),
                   predicted_s=0.1, err=1e-7, cpu_s=0.2),
               rec("usp 2x2", "streamattn", "usp", [0.104, 0.107]),
               rec("ulysses 4", "streamattn", "ulysses", [0.2, 0.21]),
               rec("yunchang 2x2", "yunchang", None, [0.16, 0.17], cpu_s=0.3),
               rec("auto bfloat16 wire", "streamattn", "usp", [0.09, 0.09], err=4e-3,
                   cfg={"comm_dtype": "bfloat16"})]
    run = {"cell": "2x2:200mbit", "shape": "flux", "busy_before": 0.02, "load_before": 2.9,
           "load_after": 0.2, "seconds": 60, "rc": 0}  # the load average still carries the last run
    (row,) = summarize(records, run, 0.10)
    assert row["best_fixed"] == "usp 2x2" and row["yunchang_best"] == "yunchang 2x2"
    assert row["auto_over_limit"] == pytest.approx(1.06, abs=0.01)
    assert row["auto_vs_yunchang"] == pytest.approx(0.17 / 0.106, rel=1e-3)
    assert row["bf16_wire_err"] == 4e-3
    assert row["checks"] == []  # within 1.10x of the limit, 1.56x over yunchang
    slow = [dict(records[0], latency_s={"median": 0.2, "all": [0.2, 0.2]})] + records[1:]
    (bad,) = summarize(slow, dict(run, busy_before=0.4), 0.10)
    assert any("limit" in c for c in bad["checks"]) and any("LOADED" in c for c in bad["checks"])
    assert any("1.4x yunchang" in c for c in bad["checks"])
    text = format_matrix([row, bad], [run], 60.0)
    assert "| 2x2:200mbit | flux | 1024+0 | wire |" in text and "total 1.0 min" in text
    assert "| 200 / - / 300 / 150 |" in text  # CPU ms: auto / best fixed (none) / yunchang / limit


@pytest.mark.parametrize("algorithm,u,r", [("usp", 2, 2), ("torus", 2, 1), ("ulysses", 4, 1)])
def test_comm_dtype_is_priced_at_the_wire_bytes(rank_pool, algorithm, u, r):
    """A bfloat16-wire call sends what schedule.per_rank_bytes states for Problem(wire_dtype=
    bfloat16): half the q/k/v and output bytes, the joint (out, lse) partials exact; so the planner
    costs (and picks) the plan at the bytes it sends. The control: the float32 count differs."""
    import dataclasses

    import torch

    from streamattn.problem import Problem
    from streamattn.schedule import consecutive_groups, per_rank_bytes

    P, seq, heads, D, T = 4, 48, 4, 8, 6
    got = rank_pool(P).run("streamattn.testing.cases:bytes_per_call", seq=seq, heads=heads,
                           head_dim=D, algorithm=algorithm, ulysses_degree=u, ring_degree=r,
                           joint_len=T, comm_dtype="bfloat16")
    exact = Problem(1, heads, heads, D, torch.float32, (seq // P,) * P, D ** -0.5, joint_len=T)
    groups = consecutive_groups(P, u)
    kw = dict(torus_degree=P // (u * r)) if algorithm == "torus" else {}
    want = per_rank_bytes(dataclasses.replace(exact, wire_dtype=torch.bfloat16), u, groups,
                          [0] * P, **kw)
    fp32 = per_rank_bytes(exact, u, groups, [0] * P, **kw)
    for rank in range(P):
        assert got[rank]["intra"] == want[rank]["intra"] != fp32[rank]["intra"], (rank, got[rank])
        assert got[rank]["messages"] == want[rank]["messages"]


def test_comm_dtype_must_agree_and_is_bounded(rank_pool):
    """comm_dtype=torch.bfloat16 on every rank: bounded error (not exact); on some ranks only: the
    same ValueError on every rank, no hang; with float16 inputs: a clear error everywhere."""
    pool = rank_pool(4, env={"STREAMATTN_TRANSPORT": "torch"})
    run = "streamattn.testing.perf_cases:comm_dtype_call"
    ok = pool.run(run, wire_ranks=[0, 1, 2, 3], seq=36)
    assert all(r["type"] is None and 1e-5 < r["err"] < 3e-2 for r in ok), ok
    exact = pool.run(run, wire_ranks=[], seq=36)
    assert all(r["err"] < 1e-5 for r in exact), exact
    mixed = pool.run(run, wire_ranks=[1], seq=40)
    assert len({r["error"] for r in mixed}) == 1 and all(r["type"] == "ValueError" for r in mixed), mixed
    assert "disagree on comm_dtype" in mixed[0]["error"] and "rank 1: torch.bfloat16" in mixed[0]["error"]
    half = pool.run(run, wire_ranks=[0, 1, 2, 3], seq=44, dtype="float16")
    assert all(r["type"] == "ValueError" and "float32 or bfloat16" in r["error"] for r in half), half


def test_back_to_back_runs_under_torchrun(tmp_path):
    """`python -m streamattn.bench.back_to_back` on a torchrun group: the planned call and a forced
    one report a time, CPU and the plan they ran (the forced plan's name proves the flags reach it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for extra, want in (([], "Plan("), (["--algorithm", "ring"], "Plan(ring, ulysses=1 x ring=3")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port",
               str(port), "-m", "streamattn.bench.back_to_back", "--seq", "61", "--joint-len", "5",
               "--heads", "6", "--head-dim", "8", "--calls", "5", "--warmup", "1"] + extra
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1", STREAMATTN_TIMEOUT_S="60",
                                      TMPDIR=str(tmp_path)))  # torchrun's log directory
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert want in out.stdout and "ms per call (slowest rank's mean)" in out.stdout, out.stdout
