"""torch.compile(fullgraph=True) of a DiT block that calls streamattn.attention: zero graph
breaks, eager results within 1e-6, one recompile at most when the sequence length changes."""
from __future__ import annotations

import pytest

from streamattn.testing.grad_cases import compile_block


def _check(res):
    assert res["graph_breaks"] == 0, res["break_reasons"]
    assert res["rel_diff"] < 1e-6, res
    # the first length compiles static shapes, the second recompiles once with dynamic ones
    assert res["graphs"] <= 2, res


def test_compile_single_process():
    # aot_eager: dynamo's graph and its autograd (the op's fake kernel and registered backward) in
    # the bhsd layout, without Inductor's C++ build (8 s instead of 32 s); Inductor runs in
    # test_compile_two_ranks below
    _check(compile_block(0, 1, layout="bhsd", backend="aot_eager"))


@pytest.mark.parametrize("P", [2])
def test_compile_two_ranks(rank_pool, P):
    for res in rank_pool(P).run("streamattn.testing.grad_cases:compile_block", timeout=600):
        _check(res)
