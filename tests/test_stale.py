"""streamattn.stale.StaleKV against a float64 reference built from exactly what it promises:
fresh local + joint K/V, the other ranks' K/V of the previous step (all fresh on warm-up steps)."""
from __future__ import annotations

import pytest

from streamattn.stale import StaleKV

TOL = 1e-5

CASES = [
    dict(),                                             # joint front, exact joint
    dict(joint_mode="stale"),
    dict(joint_strategy="rear", warmup_steps=2, steps=5),
    dict(layout="bhsd", kv_heads=2, lens=None),         # GQA, other layout
    dict(joint_len=0, warmup_steps=0),
    dict(static=True),                                  # unchanged inputs: stale == exact
]


@pytest.mark.parametrize("P", [2, 4])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_stale_kv_matches_its_definition(rank_pool, P, case):
    kw = dict(CASES[case])
    if P == 4 and case == 3:
        kw["lens"] = [1, 17, 10, 12]                    # uneven, a 1-token shard
    res = rank_pool(P).run("streamattn.examples.tasks:check_stale", **kw)
    steps = kw.get("steps", 4)
    warm = max(kw.get("warmup_steps", 1), 1)
    for r in res:
        assert len(r["err"]) == steps
        assert max(r["err"]) < TOL and max(r["joint_err"]) < TOL, r
        assert r["stats"]["exact_calls"] == 2 * warm and r["stats"]["stale_calls"] == 2 * (steps - warm)
    assert all(r["joint_sums"] == res[0]["joint_sums"] for r in res)  # joint out identical


def test_arguments():
    with pytest.raises(ValueError):
        StaleKV(warmup_steps=-1)
    with pytest.raises(ValueError):
        StaleKV(joint_mode="maybe")
    with pytest.raises(ValueError):
        StaleKV(causal=True)


def test_public_op_routes_to_stale_kv_and_checks_arguments():
    import torch

    import streamattn

    calls = []

    class Fake:
        def attention(self, layer, q, k, v, **kw):
            calls.append((layer, kw["joint_strategy"], kw["layout"]))
            return q

    q = torch.zeros(1, 4, 2, 8)
    assert streamattn.attention(q, q, q, stale_kv=Fake(), layer="blocks.0") is q
    assert calls == [("blocks.0", "front", "bshd")]
    with pytest.raises(ValueError, match="layer="):
        streamattn.attention(q, q, q, stale_kv=Fake())
    with pytest.raises(ValueError, match="no causal"):
        streamattn.attention(q, q, q, stale_kv=Fake(), layer=0, causal=True)
