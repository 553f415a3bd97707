"""Sequence-parallel attention algorithms, each written once against the Transport interface.

Every algorithm takes (transport, problem, q, k, v, joint) with q: [B, S_local, H, D] and
k, v: [B, S_local, Hk, D] (bshd) and returns (out [B, S_local, H, D], joint_out or None).
"""
from .joint_fold import folded_attention
from .local import attend
from .ring import ring_attention
from .torus import torus_attention
from .ulysses import ulysses_attention
from .usp import usp_attention
from .zigzag import zigzag_ring_attention

__all__ = ["attend", "folded_attention", "ring_attention", "torus_attention", "ulysses_attention", "usp_attention",
           "zigzag_ring_attention"]
