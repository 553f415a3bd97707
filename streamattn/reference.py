"""Float64 reference attention over the full (unsharded) sequence: the oracle for every test.

Written independently of kernels.py (plain matmul + softmax) so a kernel bug cannot hide in both.
"""
from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, *, scale=None, causal=False, joint_q=None, joint_k=None,
                        joint_v=None, joint_strategy="front", rows=None):
    """Full attention in float64.

    q: [B, S, H, D], k, v: [B, S, Hk, D] (layout "bshd", the whole sequence), H % Hk == 0.
    joint_*: [B, T, H|Hk, D] text tokens, concatenated in front of ("front") or behind ("rear") the
    image tokens for queries and keys alike. rows: (start, stop) -- only these image query rows
    (every key; the joint rows, if any, in full): one rank's shard costs 1/P of the whole.
    Returns out [B, S or stop - start, H, D] float64, and with joint tokens
    (out, joint_out [B, T, H, D]).
    """
    D = q.shape[-1]
    S = q.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    has_joint = joint_q is not None
    T = joint_q.shape[1] if has_joint else 0
    start, stop = rows if rows is not None else (0, S)
    img0 = T if has_joint and joint_strategy == "front" else 0  # where image row 0 sits
    txt0 = 0 if joint_strategy == "front" else S  # where joint row 0 sits
    if has_joint:
        if joint_strategy == "front":
            q, k, v = (torch.cat([j, x], 1) for j, x in ((joint_q, q), (joint_k, k), (joint_v, v)))
        else:
            q, k, v = (torch.cat([x, j], 1) for j, x in ((joint_q, q), (joint_k, k), (joint_v, v)))
    # the query positions (in the concatenated sequence) computed: the image rows asked, then text
    pos = torch.cat([torch.arange(img0 + start, img0 + stop), torch.arange(txt0, txt0 + T)])
    q = q[:, pos]
    H, Hk = q.shape[2], k.shape[2]
    mask = torch.arange(k.shape[1])[None, :] > pos[:, None] if causal else None
    out = torch.empty(q.shape[0], len(pos), H, D, dtype=torch.float64)
    for h in range(H):  # head by head: the float64 scores of one head at a time
        qh, kh, vh = q[:, :, h].double(), k[:, :, h * Hk // H].double(), v[:, :, h * Hk // H].double()
        s = (qh @ kh.transpose(1, 2)) * scale
        if causal:
            s = s.masked_fill(mask, float("-inf"))
        out[:, :, h] = torch.softmax(s, dim=-1) @ vh
    n = stop - start
    if not has_joint:
        return out
    return out[:, :n], out[:, n:]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64 (0 for an empty reference): the error every check
    in the tests and the bench reports."""
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
