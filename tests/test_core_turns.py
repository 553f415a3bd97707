"""CPU kernels yield their core first when the machine's ranks outnumber its cores
(streamattn.core_turns): only then, only on CPU, once per kernel call, forward and backward."""
import pytest
import torch

from streamattn import core_turns, kernels, kernels_backward
from streamattn.topology import usable_cores


@pytest.fixture
def yields(monkeypatch):
    count = [0]
    monkeypatch.setattr(core_turns.os, "sched_yield", lambda: count.__setitem__(0, count[0] + 1))
    return count


def _blocks(sq=8, sk=16, h=2, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, s, d, generator=g) for s in (sq, sk, sk)]


@pytest.mark.parametrize("shared", [True, False])
def test_kernels_yield_once_per_call_only_on_shared_cores(monkeypatch, yields, shared):
    monkeypatch.setattr(core_turns, "_shared", shared)
    q, k, v = _blocks()
    out, lse = kernels.attention_with_lse(q, k, v, scale=0.3)
    kernels_backward.attention_block_backward(torch.ones_like(out), q, k, v, out, lse, scale=0.3)
    # negative control: cores not shared, no yield at all
    assert yields[0] == (2 if shared else 0)
    core_turns.before_kernel("cuda")  # a GPU kernel's launch holds no core
    assert yields[0] == (2 if shared else 0)


def test_sharing_is_sticky_per_process(monkeypatch):
    monkeypatch.setattr(core_turns, "_shared", False)
    core_turns.share(True)
    core_turns.share(False)  # a later group on idle cores does not undo it
    assert core_turns.shared()


def test_the_shm_transport_turns_it_on_when_ranks_outnumber_cores(rank_pool):
    if usable_cores() >= 3:
        pytest.skip("needs fewer than 3 usable cores (CI has 2)")
    res = rank_pool(3).run("streamattn.testing.cases:core_turns_state")
    for r in res:
        assert r["oversubscribed"] is True and r["shared"] is True, r
        assert r["yields"] >= 2, r  # a ring of 3 attends 3 blocks per call
