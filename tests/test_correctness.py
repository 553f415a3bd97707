"""Every algorithm, every valid factorization, P in {1,2,3,4,6,8}, on real gloo groups, against the
float64 reference: fp32 within 1e-5 (relative to max |ref|), fp16/bf16 within 2e-2."""
import pytest

from streamattn.plan import valid_ulysses_degrees

CASES = "streamattn.testing.cases:check_attention"
WORLD_SIZES = [1, 2, 3, 4, 6, 8]
TOL = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}


def configs(P, heads):
    """(algorithm, ulysses_degree): Ulysses, Ring and every USP factorization valid for `heads`."""
    if P == 1:
        return [("auto", None)]
    out = [("ring", None)]
    for u in valid_ulysses_degrees(P, heads):
        if u == P:
            out.append(("ulysses", None))
        elif u > 1:
            out.append(("usp", u))
    return out


def odd_lens(P, seed):
    """Deliberately uneven shards, incl. a 1-token shard when P > 2."""
    lens = [7 + ((r * 5 + seed) % 11) for r in range(P)]
    if P > 2:
        lens[P // 2] = 1
    return lens


# name -> kwargs; heads chosen so Ulysses is possible for every P (24) unless stated.
SCENARIOS = {
    "fp32_b2_uneven": dict(heads=24, head_dim=16, batch=2, lens="odd"),
    "gqa_8_2": dict(heads=8, kv_heads=2, head_dim=16, lens="odd"),
    "mqa": dict(heads=24, kv_heads=1, head_dim=16, lens="odd"),
    "gqa_24_8_straddle": dict(heads=24, kv_heads=8, head_dim=16, lens="odd"),
    "causal_gqa": dict(heads=24, kv_heads=6, head_dim=16, causal=True, lens="odd"),
    "causal_even": dict(heads=24, head_dim=32, causal=True, seq_per_rank=16),
    "joint_front": dict(heads=24, kv_heads=8, head_dim=16, joint_len=7, joint_strategy="front", lens="odd"),
    "joint_rear_b2": dict(heads=24, head_dim=16, batch=2, joint_len=5, joint_strategy="rear", lens="odd"),
    "bhsd": dict(heads=24, kv_heads=12, head_dim=16, layout="bhsd", lens="odd", batch=2),
    "bhsd_joint": dict(heads=24, head_dim=16, layout="bhsd", joint_len=3, lens="odd"),
    "fp16": dict(heads=24, kv_heads=8, head_dim=32, dtype="float16", lens="odd"),
    "bf16_joint": dict(heads=24, head_dim=32, dtype="bfloat16", joint_len=6, lens="odd"),
    "bf16_causal": dict(heads=24, head_dim=32, dtype="bfloat16", causal=True, lens="odd"),
}


def _params():
    for P in WORLD_SIZES:
        for name, sc in SCENARIOS.items():
            for algo, u in configs(P, sc["heads"]):
                yield pytest.param(P, name, algo, u, id=f"P{P}-{name}-{algo}{u or ''}")


@pytest.mark.parametrize("P,scenario,algorithm,u", list(_params()))
def test_exact(rank_pool, P, scenario, algorithm, u):
    sc = dict(SCENARIOS[scenario])
    kind = sc.pop("lens", None)
    per = sc.pop("seq_per_rank", None)
    lens = odd_lens(P, len(scenario)) if kind == "odd" else [per] * P
    pool = rank_pool(P)
    res = pool.run(CASES, seq=sum(lens), lens=lens, algorithm=algorithm, ulysses_degree=u, seed=P, **sc)
    tol = TOL[sc.get("dtype", "float32")]
    errs = [r["err"] for r in res]
    assert max(errs) <= tol, f"{scenario} {algorithm} u={u} P={P}: errors {errs} > {tol}; plan {res[0]['plan']}"
    if sc.get("joint_len"):
        jerrs = [r["joint_err"] for r in res]
        assert max(jerrs) <= tol, f"joint errors {jerrs}"
        digests = {r["joint_digest"] for r in res}
        assert len(digests) == 1, f"joint_out differs between ranks: {digests}"
    if algorithm != "auto":
        want = {"ring": "ring", "ulysses": "ulysses", "usp": "usp"}[algorithm]
        assert res[0]["plan"].startswith(f"Plan({want}"), res[0]["plan"]


JOINT_SCENARIOS = [n for n, sc in SCENARIOS.items() if sc.get("joint_len")]
FOLD = {"STREAMATTN_JOINT_FOLD": "always"}


def _joint_params(algorithms=("ring", "ulysses", "usp")):
    # largest groups first: test_exact just left those pools alive (the harness keeps 20 ranks);
    # every joint scenario on 3 and 8 ranks, the GQA and bf16 ones on every P; auto too
    for P in WORLD_SIZES[1:][::-1]:
        for name in JOINT_SCENARIOS:
            if P not in (3, 8) and name not in ("joint_front", "bf16_joint"):
                continue
            cfgs = [c for c in configs(P, SCENARIOS[name]["heads"]) if c[0] in algorithms]
            for algo, u in cfgs + [("auto", None)]:
                yield pytest.param(P, name, algo, u, id=f"P{P}-{name}-{algo}{u or ''}")


@pytest.mark.parametrize("P,scenario,algorithm,u", list(_joint_params()))
def test_exact_joint_folded(rank_pool, P, scenario, algorithm, u):
    """The joint tokens folded into the sequence (algorithms/joint_fold.py, forced on with
    STREAMATTN_JOINT_FOLD=always) around every algorithm: the same float64 check, the same joint
    output on every rank, and the plan says it folded."""
    sc = dict(SCENARIOS[scenario])
    sc.pop("lens")
    lens = odd_lens(P, len(scenario))
    res = rank_pool(P).run(CASES, seq=sum(lens), lens=lens, algorithm=algorithm, ulysses_degree=u,
                           seed=P + 1, settings=FOLD, **sc)
    tol = TOL[sc.get("dtype", "float32")]
    assert max(r["err"] for r in res) <= tol, res
    assert max(r["joint_err"] for r in res) <= tol, res
    assert len({r["joint_digest"] for r in res}) == 1, res
    assert "joint folded" in res[0]["plan"], res[0]["plan"]


@pytest.mark.parametrize("P,T", [(3, 30), (8, 5), (6, 1), (4, 3)])
def test_joint_folded_torus_and_short_text(rank_pool, P, T):
    """Fewer text rows than ranks (some ranks fold none) and more than the image tokens; Torus
    folded too."""
    lens = odd_lens(P, T)
    pool = rank_pool(P)
    for algo in ("auto", "torus") if P in (4, 8) else ("auto",):
        res = pool.run(CASES, seq=sum(lens), lens=lens, heads=8, kv_heads=2, joint_len=T,
                       algorithm=algo, seed=T, settings=FOLD)
        assert max(max(r["err"], r["joint_err"]) for r in res) <= 1e-5, (algo, res)
        assert "joint folded" in res[0]["plan"] and f"Plan({algo if algo != 'auto' else ''}" in res[0]["plan"]


JALL = {"STREAMATTN_JOINT_ALL": "always"}


# rings and USPs only: the variant has no meaning without a ring (auto may still pick Ulysses)
@pytest.mark.parametrize("P,scenario,algorithm,u", list(_joint_params(("ring", "usp"))))
def test_exact_joint_all(rank_pool, P, scenario, algorithm, u):
    """Every ring member attends all joint queries (STREAMATTN_JOINT_ALL=always; ring.ring_core),
    one message per step and in 3 token runs: the float64 check, a bit-identical joint output on
    every rank, and the plan says it ran the variant."""
    sc = dict(SCENARIOS[scenario])
    sc.pop("lens")
    lens = odd_lens(P, len(scenario) + 1)
    for runs in ("1", "3"):
        res = rank_pool(P).run(CASES, seq=sum(lens), lens=lens, algorithm=algorithm, ulysses_degree=u,
                               seed=P + 2, settings=dict(JALL, STREAMATTN_RING_CHUNKS=runs), **sc)
        tol = TOL[sc.get("dtype", "float32")]
        assert max(r["err"] for r in res) <= tol, (runs, res)
        assert max(r["joint_err"] for r in res) <= tol, (runs, res)
        assert len({r["joint_digest"] for r in res}) == 1, (runs, res)
        if algorithm != "auto":
            assert "all joint queries on every ring member" in res[0]["plan"], res[0]["plan"]


@pytest.mark.parametrize("P", [4])
def test_negative_control_unordered_joint_all(rank_pool, P):
    """The all-joint-queries ring merging its joint partials in each member's own ring order: still
    exact to rounding, but the joint outputs differ between ranks (the digest check above fails)."""
    res = rank_pool(P).run("streamattn.testing.cases:unordered_joint_all")
    assert max(max(r["err"], r["joint_err"]) for r in res) <= 1e-5, res
    assert "all joint queries on every ring member" in res[0]["plan"], res[0]["plan"]
    assert len({r["joint_digest"] for r in res}) > 1, res


@pytest.mark.parametrize("P", [3])
def test_negative_control_reversed_fold_rows(rank_pool, P):
    """The folded path's joint rows in the wrong order must fail the joint check."""
    res = rank_pool(P).run("streamattn.testing.cases:reversed_fold_rows")
    assert min(r["joint_err"] for r in res) > 1e-2, res
    assert max(r["err"] for r in res) <= 1e-5, res  # the image rows are untouched


@pytest.mark.parametrize("P", [4])
def test_uneven_4097_on_4(rank_pool, P):
    """The issue's example: 4097 tokens on 4 ranks, 1025/1024/1024/1024, every algorithm."""
    pool = rank_pool(P)
    for algo, u in [("ring", None), ("ulysses", None), ("usp", 2)]:
        res = pool.run(CASES, seq=4097, heads=4, head_dim=8, algorithm=algo, ulysses_degree=u)
        assert [r["shape"][1] for r in res] == [1025, 1024, 1024, 1024]
        assert max(r["err"] for r in res) <= 1e-5, (algo, res)


@pytest.mark.parametrize("P", [2])
def test_negative_control_zero_lse(rank_pool, P):
    """A kernel returning LSE = 0 (a peer library's CPU bug) must be caught by the same check."""
    res = rank_pool(P).run("streamattn.testing.cases:zero_lse_ring")
    assert min(r["err"] for r in res) > 1e-2, res
