"""NCCL's point-to-point semantics on CPU (STREAMATTN_TRANSPORT=inorder, transport/inorder.py):
every exchange is one group, groups run in posting order, sends rendezvous with the matching
receive, messages match by order per pair. Every algorithm and factorization, Torus with several
torus groups and with a ring factor included, must be exact over it; the pre-fix Torus posting
order (issue 16, item 1) must hang there and end in a timeout naming a peer."""
import pytest

CASES = "streamattn.testing.cases:check_attention"
# emulated topology -> ranks: 2x2 (torus t=2), 4x2 (t=4: several torus groups), 2x4 (u=4 on 8
# ranks, the trigger), 3x1 and 4x1 (one rank per node: torus over t = 3 or 4 single-rank
# groups; t = 3 is where a pairwise out-exchange order would form a cycle)
SPECS = {"2x2": 4, "3x1": 3, "4x1": 4, "2x4": 8, "4x2": 8}
SCENARIOS = {
    "gqa_joint_rear_b2": dict(heads=24, kv_heads=8, batch=2, joint_len=5, joint_strategy="rear"),
    "causal_gqa": dict(heads=24, kv_heads=6, causal=True),
}


def env(spec, **extra):
    return {"STREAMATTN_TOPOLOGY": spec, "STREAMATTN_TRANSPORT": "inorder",
            "STREAMATTN_TIMEOUT_S": "60", **extra}


def configs(P, G):
    out = [("torus", None, None), ("ulysses", None, None), ("ring", None, None), ("auto", None, None)]
    if 1 < G < P:
        out.append(("usp", G, None))
    if P == 8:
        out += [("usp", 2, None), ("usp", 4, None)] if G not in (2, 4) else [("usp", 8 // G, None)]
    if P == 8 and G == 2:
        out.append(("torus", 2, 2))  # u=2 x t=2 x ring factor 2 (12 heads)
    return list(dict.fromkeys(out))


def _params():
    for spec, P in SPECS.items():
        G = int(spec.split("x")[1])
        for name in SCENARIOS:
            for algo, u, r in configs(P, G):
                yield pytest.param(P, spec, name, algo, u, r, id=f"{spec}-{name}-{algo}{u or ''}{r or ''}")


@pytest.mark.parametrize("P,spec,scenario,algorithm,u,r", list(_params()))
def test_every_algorithm_on_nccl_order(rank_pool, P, spec, scenario, algorithm, u, r):
    sc = dict(SCENARIOS[scenario])
    if algorithm == "torus" and r:
        sc["heads"] = 12
        sc.pop("kv_heads", None)
    lens = [5 + (i * 3) % 7 for i in range(P)]
    res = rank_pool(P, env(spec)).run(CASES, seq=sum(lens), lens=lens, head_dim=8, algorithm=algorithm,
                                      ulysses_degree=u, ring_degree=r, **sc)
    assert max(x["err"] for x in res) <= 1e-5, res
    if sc.get("joint_len"):
        assert max(x["joint_err"] for x in res) <= 1e-5
    assert "transport=inorder" in res[0]["plan"], res[0]["plan"]
    if algorithm != "auto":
        assert res[0]["plan"].startswith(f"Plan({algorithm}"), res[0]["plan"]


@pytest.mark.parametrize("P", [8])
def test_pipelined_ulysses_on_nccl_order(rank_pool, P):
    res = rank_pool(P, env("2x4", STREAMATTN_ULYSSES_CHUNKS="3")).run(
        CASES, seq=53, heads=24, head_dim=8, algorithm="ulysses", joint_len=3)
    assert max(x["err"] for x in res) <= 1e-5 and max(x["joint_err"] for x in res) <= 1e-5


@pytest.mark.parametrize("P", [8])
def test_ring_runs_on_nccl_order(rank_pool, P):
    """Ring steps in token runs (STREAMATTN_RING_CHUNKS) across emulated nodes: each run's
    exchange is its own group, forwarded in arrival order, matched by order per pair."""
    pool = rank_pool(P, env("2x4"))
    for algorithm, u in (("usp", 4), ("usp", 2), ("ring", None)):
        res = pool.run(CASES, seq=53, heads=8, kv_heads=2, head_dim=8, algorithm=algorithm,
                       ulysses_degree=u, joint_len=3, causal=False,
                       settings={"STREAMATTN_RING_CHUNKS": "3"})
        assert max(x["err"] for x in res) <= 1e-5 and max(x["joint_err"] for x in res) <= 1e-5


@pytest.mark.parametrize("P", [4])
def test_negative_control_old_torus_order_hangs(rank_pool, P):
    """The pre-fix posting order times out on the in-order transport (it would hang on NCCL), with
    an error naming a peer; the fixed order passes on the same pool first."""
    pool = rank_pool(P, env("2x2", STREAMATTN_TIMEOUT_S="4"))
    ok = pool.run(CASES, seq=30, heads=8, head_dim=8, algorithm="torus")
    assert max(x["err"] for x in ok) <= 1e-5
    res = pool.run("streamattn.testing.nccl_order:legacy_torus", seq=30, heads=8, head_dim=8, seed=1,
                   timeout=90)
    print("negative control (pre-fix torus order on NCCL semantics):", *res, sep="\n  ")
    assert all(x["type"] in ("PeerTimeoutError", "PeerError") for x in res), res
    assert any(x["type"] == "PeerTimeoutError" and "in-order" in x["error"] and "rank" in x["error"]
               for x in res), res
    assert all(x["seconds"] < 30 for x in res), res


@pytest.mark.parametrize("P", [4])
def test_old_torus_order_passes_on_plain_gloo(rank_pool, P):
    """Why the in-order transport is needed: gloo buffers sends and matches tags out of order, so
    the order that hangs on NCCL passes (exactly) on the plain torch/gloo transport."""
    pool = rank_pool(P, {"STREAMATTN_TOPOLOGY": "2x2", "STREAMATTN_TRANSPORT": "torch"})
    res = pool.run("streamattn.testing.nccl_order:legacy_torus", seq=30, heads=8, head_dim=8, seed=1)
    assert all(x["type"] is None and x["err"] <= 1e-5 for x in res), res


def _posted_after_arrival(events, t):
    """Whether every torus exchange k+1 was posted after exchange k arrived (one call's events)."""
    at = {tuple(e): i for i, e in enumerate(events)}
    return all(at[("post", k + 1)] > at[("arrived", k)] for k in range(1, t - 1))


@pytest.mark.parametrize("P", [4])
def test_torus_exchanges_go_one_at_a_time(rank_pool, P):
    """A Torus of t = 4 (four single-rank nodes) posts exchange k+1 only once exchange k has
    arrived (together they would share the link and all land at the end), and stays exact.
    Negative control: the order before (every exchange posted at once) fails the check."""
    pool = rank_pool(P, {"STREAMATTN_TOPOLOGY": "4x1", "STREAMATTN_TRANSPORT": "torch"})
    kw = dict(seq=37, heads=8, head_dim=8, joint_len=3, seed=2)
    res = pool.run("streamattn.testing.nccl_order:torus_post_order", **kw)
    for x in res:
        assert x["err"] <= 1e-5, x
        assert [e for e in x["events"] if e[0] == "post"] == [["post", k] for k in (1, 2, 3)], x
        assert _posted_after_arrival(x["events"], 4), x["events"]
    old = pool.run("streamattn.testing.nccl_order:torus_post_order", one_at_a_time=False, **kw)
    assert all(x["err"] <= 1e-5 for x in old), old
    assert not any(_posted_after_arrival(x["events"], 4) for x in old), old
