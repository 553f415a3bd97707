"""Emulated multi-node topologies (STREAMATTN_TOPOLOGY=MxG): every algorithm, Torus included, on
the one-sided shm transport inside nodes (torch between nodes), exact against float64; and the
bytes each rank sends per link class equal docs/algorithms.md's formulas exactly."""
import pytest

CASES = "streamattn.testing.cases:check_attention"
SPECS = {"2x2": 4, "2x4": 8, "3x2": 6, "4x2": 8}


def env(spec, transport="shm"):
    return {"STREAMATTN_TOPOLOGY": spec, "STREAMATTN_TRANSPORT": transport}


def configs(P, G):
    out = [("torus", None, None), ("ulysses", None, None), ("ring", None, None), ("usp", G, None),
           ("auto", None, None)]
    if P == 8 and G == 2:
        out.append(("torus", 2, 2))  # Torus with a ring factor: 12 heads do not divide 8 ranks
        out.append(("torus", 1, 4))  # a ring of 4 teams: its receive buffers are reused
    return out


SCENARIOS = {
    "plain_b2_uneven": dict(heads=24, batch=2),
    "gqa_joint_front": dict(heads=24, kv_heads=8, joint_len=5),
    "mqa_joint_rear": dict(heads=24, kv_heads=1, joint_len=4, joint_strategy="rear"),
    "causal_gqa": dict(heads=24, kv_heads=6, causal=True),
    "bf16_joint": dict(heads=24, joint_len=6, dtype="bfloat16"),
}


def _params():
    for spec, P in SPECS.items():
        G = int(spec.split("x")[1])
        for name, sc in SCENARIOS.items():
            for algo, u, r in configs(P, G):
                yield pytest.param(P, spec, name, algo, u, r, id=f"{spec}-{name}-{algo}{u or ''}{r or ''}")


@pytest.mark.parametrize("P,spec,scenario,algorithm,u,r", list(_params()))
def test_exact_on_emulated_topology(rank_pool, P, spec, scenario, algorithm, u, r):
    sc = dict(SCENARIOS[scenario])
    if algorithm == "torus" and r:
        sc["heads"] = 12  # heads % 8 != 0: only the ring factor makes Torus valid
        sc.pop("kv_heads", None)
    lens = [5 + (i * 3) % 7 for i in range(P)]
    res = rank_pool(P, env(spec)).run(CASES, seq=sum(lens), lens=lens, head_dim=16,
                                      algorithm=algorithm, ulysses_degree=u, ring_degree=r, **sc)
    tol = 2e-2 if sc.get("dtype") == "bfloat16" else 1e-5
    assert max(x["err"] for x in res) <= tol, res
    if sc.get("joint_len"):
        assert max(x["joint_err"] for x in res) <= tol
        assert len({x["joint_digest"] for x in res}) == 1
    if algorithm != "auto":
        assert res[0]["plan"].startswith(f"Plan({algorithm}"), res[0]["plan"]
        assert "transport=shm" in res[0]["plan"]


# -- bytes -------------------------------------------------------------------------------------
B, S, H, D, ELEM = 1, 96, 24, 8, 4  # S and H divisible by every P and u used below


def expected_bytes(algorithm, M, G, rank):
    """docs/algorithms.md's per-rank volumes, exact for an even split with H_kv = H, no joint tokens."""
    P = M * G
    E = B * S * H * D * ELEM
    node = rank // G
    if algorithm == "ulysses":  # q,k,v out + o back to every peer: 4 E / P^2 each
        return {"intra": 4 * (G - 1) * E // P**2, "inter": 4 * (P - G) * E // P**2}
    if algorithm == "ring":  # K,V of one shard per step, P-1 steps, always to the next rank
        vol = 2 * (P - 1) * E // P
        crosses = ((rank + 1) % P) // G != node
        return {"intra": 0 if crosses else vol, "inter": vol if crosses else 0}
    if algorithm == "usp":  # Ulysses over the node (u = G), ring of r = M over the nodes
        uly = 4 * (G - 1) * E // (P * G)
        return {"intra": uly, "inter": 2 * (M - 1) * E // P}
    if algorithm == "torus":  # intra Ulysses (u = G), then 4 (M-1)/M E/P across nodes
        uly = 4 * (G - 1) * E // (P * G)
        return {"intra": uly, "inter": 4 * (M - 1) * E // (M * P)}
    raise AssertionError(algorithm)


@pytest.mark.parametrize("P,spec", [(4, "2x2"), (8, "2x4"), (6, "3x2"), (8, "4x2")])
@pytest.mark.parametrize("algorithm", ["ulysses", "ring", "usp", "torus"])
def test_bytes_match_formulas(rank_pool, P, spec, algorithm):
    M, G = (int(x) for x in spec.split("x"))
    u = G if algorithm == "usp" else None
    res = rank_pool(P, env(spec)).run("streamattn.testing.cases:bytes_per_call", seq=S, heads=H,
                                      head_dim=D, algorithm=algorithm, ulysses_degree=u)
    for rank, got in enumerate(res):
        want = expected_bytes(algorithm, M, G, rank)
        assert (got["intra"], got["inter"]) == (want["intra"], want["inter"]), (rank, got, want)


@pytest.fixture(scope="module")
def interleaved_topology(tmp_path_factory):
    """2 nodes x 2 ranks with ranks 0, 2 on node 0 and 1, 3 on node 1 (an interleaved map)."""
    from streamattn.topology import parse_spec

    topo = parse_spec("2x2:inter=100Mbit/s").replace(node=(0, 1, 0, 1), local_index=(0, 0, 1, 1),
                                                    name="interleaved-2x2")
    path = tmp_path_factory.mktemp("topo") / "interleaved.json"
    path.write_text(topo.to_json())
    return str(path)


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("algorithm,u", [("usp", 2), ("auto", None), ("ring", None)])
def test_interleaved_node_map_keeps_ulysses_in_a_node_and_is_exact(rank_pool, P, interleaved_topology,
                                                                   algorithm, u):
    pool = rank_pool(P, {"STREAMATTN_TOPOLOGY": interleaved_topology})
    res = pool.run(CASES, seq=37, heads=8, kv_heads=2, head_dim=16, joint_len=3, algorithm=algorithm,
                   ulysses_degree=u)
    assert max(r["err"] for r in res) <= 1e-5 and max(r["joint_err"] for r in res) <= 1e-5
    assert len({r["joint_digest"] for r in res}) == 1
    if algorithm == "usp":
        assert "[per-node]" in res[0]["plan"], res[0]["plan"]  # groups (0, 2), (1, 3)


@pytest.mark.parametrize("P,spec", [(8, "2x4")])
def test_identical_plan_on_every_rank(rank_pool, P, spec):
    res = rank_pool(P, env(spec)).run(CASES, seq=8 * 40, heads=24, head_dim=16, joint_len=16)
    assert len({r["plan"] for r in res}) == 1, {r["plan"] for r in res}
