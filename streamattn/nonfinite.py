"""Attention blocks whose inputs hold NaN or +-Inf: the float64 reference's semantics.

The fused kernels do not keep them: torch's CPU flash kernel returns out 0 and lse 0 for a NaN
query row when a block has few keys (under 16 in float32), and an additive causal mask turns an
infinite *future* key into NaN for rows that must not see it. So kernels.attention_with_lse
looks at the kernel's result (`suspicious`: a non-finite value, or an exact 0 in the LSE); only
then are the inputs checked (`all_finite`), and a block with a non-finite input is recomputed here: explicit float64
matmuls, the mask applied by replacement (a masked key never reaches a row), the LSE contract of
kernels.py. A row whose every visible score is -inf returns out 0 / lse -inf, so it merges away
when another block gives the row a finite score (the reference's answer then); only when all of
its scores in the whole sequence are -inf does the result (0) differ from the reference (NaN).
"""
from __future__ import annotations

import torch


def suspicious(out, lse) -> bool:
    """Whether a kernel's result could hide a NaN/Inf input: a non-finite value in out or lse
    (also a masked key's NaN leaking into a row), or an exact 0 in lse (what the CPU flash kernel
    returns for a NaN row of a short block). A pass over out and lse, not over K/V: the check costs
    ~1/(4 * keys) of the kernel."""
    return (not bool(torch.isfinite(lse.sum() + out.sum(dtype=lse.dtype)))
            or bool((lse == 0).any()))


def all_finite(*tensors) -> bool:
    """True when no tensor holds NaN or +-Inf (sums in float32/float64; an overflow says False)."""
    for t in tensors:
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if not bool(torch.isfinite(t.sum(dtype=acc))):
            return False
    return True


def attention_with_lse(q, k, v, *, scale, causal=False, q_offset=0, k_offset=0):
    """Same contract as kernels.attention_with_lse (q [B, Hq, Sq, D], k, v [B, Hk, Sk, D];
    out in q's dtype, lse float32 or float64), computed in float64 from the definition."""
    adt = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double(), v.double()
    if g > 1:
        kd, vd = kd.repeat_interleave(g, dim=1), vd.repeat_interleave(g, dim=1)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + q_offset
        j = torch.arange(k.shape[2], device=q.device).unsqueeze(0) + k_offset
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isneginf(lse).unsqueeze(-1)  # no finite score in this block: merges away
    p = torch.exp(s - lse.unsqueeze(-1)).masked_fill(dead, 0.0)
    bad_v = ~torch.isfinite(vd)
    if causal and bool(bad_v.any()):
        # A masked key's value must not reach the row (0 * NaN would): the non-finite values are
        # added to the rows that see their key only.
        out = torch.matmul(p, vd.masked_fill(bad_v, 0.0))
        for j in bad_v.any(dim=3).any(dim=1).any(dim=0).nonzero().flatten().tolist():
            first = max(0, j + k_offset - q_offset)  # the first row that sees key j
            vb = vd[:, :, j].masked_fill(~bad_v[:, :, j], 0.0)
            out[:, :, first:] += p[:, :, first:, j, None] * vb[:, :, None, :]
    else:
        out = torch.matmul(p, vd)
    out = out.masked_fill(dead, 0.0)
    return out.to(q.dtype), lse.to(adt)
