"""Faults planted on purpose: the negative controls that prove an exactness check can fail."""
from __future__ import annotations

from typing import Callable


def break_ring_lse() -> Callable[[], None]:
    """Make Ring's local kernel return LSE = 0 (the known CPU bug of a peer library: the merge then
    weighs every block equally); returns the function that undoes it."""
    import torch

    import streamattn.algorithms.ring as ring_mod

    real = ring_mod.attention_with_lse

    def zero_lse(*a, **kw):
        out, lse = real(*a, **kw)
        return out, torch.zeros_like(lse)

    ring_mod.attention_with_lse = zero_lse

    def undo():
        ring_mod.attention_with_lse = real
    return undo


def reverse_folded_joint_rows() -> Callable[[], None]:
    """Make the folded-joint path return its joint output rows in reverse order (a gather that puts
    the ranks' text rows in the wrong places); returns the function that undoes it."""
    import streamattn.algorithms as algorithms_pkg

    real = algorithms_pkg.folded_attention

    def reversed_rows(*a, **kw):
        out, jout = real(*a, **kw)
        return out, jout.flip(1)

    algorithms_pkg.folded_attention = reversed_rows

    def undo():
        algorithms_pkg.folded_attention = real
    return undo
