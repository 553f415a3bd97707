"""The Triton kernels inside the real algorithms (not only in their unit tests): attention with
LSE, the LSE merge and the Ulysses output packing, on CPU under TRITON_INTERPRET=1."""
import pytest

from streamattn import triton_kernels

pytest.importorskip("triton")

ENV = {"TRITON_INTERPRET": "1", "STREAMATTN_TRITON": "1", "STREAMATTN_KERNEL": "triton"}


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("algorithm,u", [("ring", None), ("ulysses", None), ("usp", 2)])
def test_algorithms_on_triton_kernels(rank_pool, P, algorithm, u):
    pool = rank_pool(P, ENV)
    res = pool.run("streamattn.testing.cases:triton_usage", seq=10, heads=4, kv_heads=2,
                   head_dim=16, joint_len=3, algorithm=algorithm, ulysses_degree=u, timeout=300)
    for r in res:
        assert r["err"] <= 1e-5 and r["joint_err"] <= 1e-5, r
        assert r["calls"]["attention_fwd"] > 0, r
        if algorithm != "ulysses":  # pure Ulysses attends in one kernel call: nothing to merge
            assert r["calls"]["merge_"] > 0, r
        if algorithm != "ring":
            for name in ("pack_heads", "unpack_seq", "pack_seq", "unpack_heads"):
                assert r["calls"][name] > 0, (name, r)
