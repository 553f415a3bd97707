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
