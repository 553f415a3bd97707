"""Attention of one rank's query block against key/value blocks it already holds (no communication).

Used for a group of size 1 and after Ulysses' all-to-all, where each rank holds the whole sequence
for its heads. Joint text tokens are concatenated so the whole call is one kernel launch.
"""
from __future__ import annotations

import torch

from ..kernels import attention_with_lse


def attend(q, k, v, *, scale, causal=False, joint=None, joint_strategy="front", with_lse=False,
           joint_len=None):
    """q: [B, Sq, h, D], k, v: [B, Sk, hk, D] (bshd views are fine).
    joint: None or (jq [B, T, h, D], jk, jv [B, T, hk, D]), placed in front of or behind the image
    tokens for queries and keys alike. Returns (out [B, Sq, h, D], joint_out [B, T, h, D] or None)
    in q's dtype. with_lse: also (lse [B, h, Sq], joint_lse [B, h, T] or None) appended.
    joint_len: instead of `joint`, q, k, v already hold T = joint_len joint tokens in the
    joint_strategy's place (Sq, Sk count them; the returned out does not)."""
    T = joint_len or 0
    if joint is not None:
        jq, jk, jv = joint
        T = jq.shape[1]
        if joint_strategy == "front":
            q, k, v = torch.cat([jq, q], 1), torch.cat([jk, k], 1), torch.cat([jv, v], 1)
        else:
            q, k, v = torch.cat([q, jq], 1), torch.cat([k, jk], 1), torch.cat([v, jv], 1)
    out, lse = attention_with_lse(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, causal=causal
    )
    out = out.transpose(1, 2)
    if joint is None and joint_len is None:
        return (out, None, lse, None) if with_lse else (out, None)
    n = T if joint_strategy == "front" else out.shape[1] - T
    parts = (out[:, T:], out[:, :T]) if joint_strategy == "front" else (out[:, :n], out[:, n:])
    if not with_lse:
        return parts
    lparts = (lse[:, :, T:], lse[:, :, :T]) if joint_strategy == "front" else (lse[:, :, :n], lse[:, :, n:])
    return parts + lparts
