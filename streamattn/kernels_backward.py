"""The backward of one (query block, key/value block) pair, given the GLOBAL output and LSE of the
query rows (flash-style recomputation: the scores of the pair are recomputed, never stored).

    attention_block_backward(dout, q, k, v, out, lse, *, scale, causal=False, q_offset=0,
                             k_offset=0) -> (dq, dk, dv)
    q, dout, out: [B, Hq, Sq, D] (layout "bhsd"); k, v: [B, Hk, Sk, D], Hq % Hk == 0 (GQA/MQA:
    dk, dv are summed over the query heads sharing a key/value head).
    lse: [B, Hq, Sq], the log-sum-exp of each query row over ALL the keys it sees (the final one
    of the forward), so exp(s - lse) is the true softmax restricted to this block and
    delta = rowsum(dout * out) the true one: the partial gradients of every block add up to the
    exact gradient (ring-flash-attention's decomposition).
    Returns dq [B, Hq, Sq, D], dk, dv [B, Hk, Sk, D] in the accumulation dtype (float32, float64
    for float64 inputs). Causal masks use global positions as in kernels.attention_with_lse.

Backends: "cpu-flash" (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward) on
CPU, "math" (explicit matmuls in the accumulation dtype) elsewhere and when STREAMATTN_KERNEL=math.
"""
from __future__ import annotations


import torch

from . import core_turns
from .config import kernel
from .merge import acc_dtype


def attention_block_backward(dout, q, k, v, out, lse, *, scale: float, causal: bool = False,
                             q_offset: int = 0, k_offset: int = 0):
    """See the module docstring."""
    B, Hq, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    adt = acc_dtype(q.dtype)
    if Sq == 0 or Sk == 0:
        return _zeros(q, k, adt)
    diag = None
    if causal:
        d = q_offset - k_offset  # row i sees key j iff j <= i + d
        if d + Sq - 1 < 0:
            return _zeros(q, k, adt)
        if d < Sk - 1:
            diag = d
    dead = 0 if diag is None else max(0, -diag)
    if dead:
        dq_tail, dk, dv = attention_block_backward(
            dout[:, :, dead:], q[:, :, dead:], k, v, out[:, :, dead:], lse[:, :, dead:],
            scale=scale, causal=True, q_offset=q_offset + dead, k_offset=k_offset)
        dq = torch.zeros(B, Hq, Sq, D, dtype=adt, device=q.device)
        dq[:, :, dead:] = dq_tail
        return dq, dk, dv
    # A row that saw no key at all (lse = -inf) has out 0 and gets no gradient: +inf makes its
    # probabilities exp(s - inf) = 0 instead of NaN.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    backend = "math" if (q.device.type != "cpu" or kernel() == "math") \
        else "cpu-flash"
    g = Hq // Hk
    core_turns.before_kernel(q.device.type)
    ke, ve = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    if backend == "cpu-flash":
        dq, dk, dv = _cpu_flash(dout, q, ke, ve, out, lse, scale, diag)
    else:
        dq, dk, dv = _math(dout, q, ke, ve, out, lse, scale, diag)
    dq, dk, dv = dq.to(adt), dk.to(adt), dv.to(adt)
    if g > 1:
        dk = dk.view(B, Hk, g, Sk, D).sum(2)
        dv = dv.view(B, Hk, g, Sk, D).sum(2)
    return dq, dk, dv


def _zeros(q, k, adt):
    return (torch.zeros(q.shape, dtype=adt, device=q.device),
            torch.zeros(k.shape, dtype=adt, device=q.device),
            torch.zeros(k.shape, dtype=adt, device=q.device))


def _mask(Sq, Sk, diag, dtype, device):
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(Sk, device=device).unsqueeze(0)
    return torch.zeros(Sq, Sk, dtype=dtype, device=device).masked_fill(j > i + diag, float("-inf"))


def _cpu_flash(dout, q, k, v, out, lse, scale, diag):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    # The kernel wants contiguous bhsd tensors and an LSE in its own accumulation dtype.
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out.to(q.dtype)))
    lse = lse.to(acc_dtype(q.dtype)).contiguous()
    if diag is None:
        return op(dout, q, k, v, out, lse, 0.0, False, scale=scale)
    if diag == 0:
        return op(dout, q, k, v, out, lse, 0.0, True, scale=scale)
    mask = _mask(q.shape[2], k.shape[2], diag, q.dtype, q.device)
    return op(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)


def _math(dout, q, k, v, out, lse, scale, diag):
    adt = acc_dtype(q.dtype)
    q, k, v, dout, out = (t.to(adt) for t in (q, k, v, dout, out))
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if diag is not None:
        s = s + _mask(q.shape[2], k.shape[2], diag, adt, q.device)
    p = torch.exp(s - lse.to(adt).unsqueeze(-1))
    delta = (dout * out).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), dout)
    ds = p * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, k) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, dk, dv
