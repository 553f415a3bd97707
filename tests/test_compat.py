"""streamattn.compat.yunchang: the shim returns exactly streamattn.attention's result for the same
inputs, in yunchang's / xDiT's calling convention; and matches yunchang's own USP (when installed,
with a true-LSE CPU kernel through its attn_processor hook)."""
from __future__ import annotations

import pytest
import torch

from streamattn.compat import yunchang as shim

CASES = [
    dict(ulysses_degree=2, ring_degree=2),
    dict(ulysses_degree=4, ring_degree=1),
    dict(ulysses_degree=1, ring_degree=4),
    dict(ulysses_degree=2, ring_degree=2, joint_len=8),
    dict(ulysses_degree=2, ring_degree=2, joint_len=8, joint_strategy="rear", seq=63),
    dict(ulysses_degree=1, ring_degree=4, joint_len=5, seq=61, kv_heads=2),
    dict(ulysses_degree=2, ring_degree=2, causal=True, softmax_scale=0.3),
    dict(ulysses_degree=2, ring_degree=1),                # 2 data-parallel replicas of SP 2
]


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_shim_identical_to_streamattn(rank_pool, P, case):
    kw = dict(CASES[case])
    res = rank_pool(P).run("streamattn.examples.tasks:check_yunchang_shim", **kw)
    for r in res:
        assert r["identical"] and r["xfuser_identical"], r
        if r["yunchang_err"] is not None:
            assert r["yunchang_err"] < 1e-5, r


@pytest.mark.parametrize("P", [2])
def test_shim_two_ranks(rank_pool, P):
    res = rank_pool(P).run("streamattn.examples.tasks:check_yunchang_shim", ulysses_degree=2,
                           ring_degree=1, joint_len=4, seq=33)
    assert all(r["identical"] for r in res)
    assert res[0]["shape"] == [1, 4 + 17, 8, 16]


def test_single_rank_and_unsupported():
    shim.set_seq_parallel_pg(1, 1, 0, 1)
    layer = shim.LongContextAttention()
    q, k, v = (torch.randn(1, 10, 4, 8) for _ in range(3))
    jq, jk, jv = (torch.randn(1, 3, 4, 8) for _ in range(3))
    import streamattn

    torch.testing.assert_close(layer(q, k, v), streamattn.attention(q, k, v), rtol=0, atol=0)
    out = layer(q, k, v, joint_tensor_query=jq, joint_tensor_key=jk, joint_tensor_value=jv,
                joint_strategy="rear")
    assert out.shape == (1, 13, 4, 8)
    with pytest.raises(ValueError, match="joint_strategy"):
        layer(q, k, v, joint_tensor_query=jq, joint_tensor_key=jk, joint_tensor_value=jv)
    with pytest.raises(ValueError, match="simultaneously"):
        layer(q, k, v, joint_tensor_query=jq)
    for bad in (dict(dropout_p=0.1), dict(window_size=(8, 8)), dict(softcap=1.0),
                dict(alibi_slopes=torch.ones(4))):
        with pytest.raises(NotImplementedError):
            layer(q, k, v, **bad)
    with pytest.raises(NotImplementedError):
        shim.LongContextAttention(ring_impl_type="zigzag")(q, k, v, causal=True)
    with pytest.raises(NotImplementedError):
        shim.xFuserLongContextAttention(use_kv_cache=True)
    with pytest.raises(ValueError):
        shim.set_seq_parallel_pg(3, 1, 0, 4)
