"""Ulysses pipelined over head groups (STREAMATTN_ULYSSES_CHUNKS): exact on both transports, and
really chunked (one all-to-all per head group, visible in the message count)."""
import pytest

CASES = "streamattn.testing.cases:check_attention"


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("transport", ["shm", "torch"])
@pytest.mark.parametrize("kw", [dict(), dict(joint_len=5), dict(causal=True, kv_heads=12),
                                dict(joint_len=4, joint_strategy="rear", kv_heads=4)],
                         ids=["plain", "joint", "causal_gqa", "gqa_unchunkable"])
def test_pipelined_ulysses_exact(rank_pool, P, transport, kw):
    pool = rank_pool(P, {"STREAMATTN_ULYSSES_CHUNKS": "3", "STREAMATTN_TRANSPORT": transport})
    res = pool.run(CASES, seq=31, heads=24, head_dim=16, batch=2, algorithm="ulysses", **kw)
    assert max(r["err"] for r in res) <= 1e-5
    if kw.get("joint_len"):
        assert max(r["joint_err"] for r in res) <= 1e-5 and len({r["joint_digest"] for r in res}) == 1


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("transport", ["shm", "torch"])
def test_pipelined_ulysses_sends_one_all_to_all_per_chunk(rank_pool, P, transport):
    pool = rank_pool(P, {"STREAMATTN_ULYSSES_CHUNKS": "3", "STREAMATTN_TRANSPORT": transport})
    res = pool.run("streamattn.testing.cases:bytes_per_call", seq=48, heads=24, head_dim=8,
                   algorithm="ulysses")
    for r in res:
        assert r["messages"] == 3 * 2 * (P - 1)  # chunks x (scatter + gather) x peers
        assert r["intra"] == 4 * (P - 1) * 48 * 24 * 8 * 4 // P**2  # same bytes as unchunked
