"""Float64 reference attention over the full (unsharded) sequence: the oracle for every test.

Written independently of kernels.py (plain matmul + softmax) so a kernel bug cannot hide in both.
"""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, *, scale=None, causal=False, joint_q=None, joint_k=None,
                        joint_v=None, joint_strategy="front"):
    """Full attention in float64.

    q: [B, S, H, D], k, v: [B, S, Hk, D] (layout "bshd", the whole sequence), H % Hk == 0.
    joint_*: [B, T, H|Hk, D] text tokens, concatenated in front of ("front") or behind ("rear") the
    image tokens for queries and keys alike. Returns out [B, S, H, D] float64, and with joint tokens
    (out, joint_out [B, T, H, D]).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    has_joint = joint_q is not None
    if has_joint:
        if joint_strategy == "front":
            q, k, v = (torch.cat([j, x], 1) for j, x in ((joint_q, q), (joint_k, k), (joint_v, v)))
        else:
            q, k, v = (torch.cat([x, j], 1) for j, x in ((joint_q, q), (joint_k, k), (joint_v, v)))
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # -> [B, H, S, D]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        S = s.shape[-1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = (torch.softmax(s, dim=-1) @ v).transpose(1, 2)
    if not has_joint:
        return out
    T = joint_q.shape[1]
    if joint_strategy == "front":
        return out[:, T:], out[:, :T]
    return out[:, :-T], out[:, -T:]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 (0 for an empty reference): the error every check
    in the tests and the bench reports."""
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
