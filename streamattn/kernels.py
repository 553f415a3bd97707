"""Local attention that also returns the log-sum-exp (LSE), on whatever device the tensors live.

Contract of every backend (the "LSE contract" of docs/algorithms.md):
    attention_with_lse(q, k, v, scale=..., causal=..., q_offset=..., k_offset=...) -> (out, lse)
    q: [B, Hq, Sq, D], k, v: [B, Hk, Sk, D] (layout "bhsd"; any strides), Hq % Hk == 0 and query head h
    uses key/value head h // (Hq // Hk) (GQA/MQA).
    out: [B, Hq, Sq, D] in q's dtype; lse: [B, Hq, Sq], float32 (float64 for float64 inputs),
    natural log of the sum over visible keys of exp(scale * q.k).
    causal=True masks with GLOBAL positions: query i (position q_offset + i) sees key j (position
    k_offset + j) iff k_offset + j <= q_offset + i. A row that sees no key gets out 0 and lse -inf.

Backends, chosen in one place (`select_backend`):
    cpu-flash   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (exact LSE, ~5e-7)
    flash-attn  flash_attn_func(..., return_attn_probs=True) on CUDA fp16/bf16, when installed
    torch-flash torch.ops.aten._scaled_dot_product_flash_attention on CUDA fp16/bf16
    torch-efficient  torch.ops.aten._scaled_dot_product_efficient_attention (CUDA; masks, fp32)
    triton      streamattn.triton_kernels.attention_fwd (only when forced: STREAMATTN_KERNEL=triton)
    math        explicit matmuls in the accumulation dtype (fallback, float64 on CUDA)
A backend that cannot return a true LSE is never used: ring and torus steps depend on it.

Besides attention, the LSE merge (merge.update_out_and_lse) and the Ulysses all-to-all packing run
the Triton kernels of streamattn.triton_kernels where `triton_kernels.enabled_for` says so — on CUDA tensors
(one fused pass instead of several torch element-wise ops and copies) and wherever
STREAMATTN_TRITON=1 forces them (CPU tensors under TRITON_INTERPRET=1: how CI runs them
inside the real algorithms). Elsewhere their torch references (same signatures) run.
"""
from __future__ import annotations

import functools
import logging

import torch

from . import config, core_turns, nonfinite
from .merge import acc_dtype

log = logging.getLogger("streamattn.kernels")

BACKENDS = ("cpu-flash", "flash-attn", "torch-flash", "torch-efficient", "triton", "math")
_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_attn_func():
    try:
        from flash_attn import flash_attn_func  # type: ignore

        return flash_attn_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None


def select_backend(device_type: str, dtype: torch.dtype, masked: bool) -> str:
    """The one kernel-selection rule. `masked`: the call needs a mask that is neither none nor
    top-left causal (partial ring/torus blocks). STREAMATTN_KERNEL is read (and validated) on
    every call; the rule itself is cached."""
    return _select_backend(device_type, dtype, masked, config.kernel())


@functools.lru_cache(maxsize=None)
def _select_backend(device_type: str, dtype: torch.dtype, masked: bool, forced: str) -> str:
    if forced:
        choice = forced
    elif device_type == "cpu":
        choice = "cpu-flash"
    elif device_type == "cuda":
        if masked:
            choice = "torch-efficient"
        elif dtype in _HALF and flash_attn_func() is not None:
            choice = "flash-attn"
        elif dtype in _HALF:
            choice = "torch-flash"
        elif dtype == torch.float32:
            choice = "torch-efficient"
        else:
            choice = "math"
    else:
        choice = "math"
    log.debug("kernel for %s/%s masked=%s: %s", device_type, dtype, masked, choice)
    return choice


select_backend.cache_clear = _select_backend.cache_clear  # kept for callers that reset it


def attention_with_lse(q, k, v, *, scale: float, causal: bool = False, q_offset: int = 0, k_offset: int = 0):
    """See the module docstring for shapes and semantics."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if Sq == 0 or Sk == 0:
        return _empty(q, Sq)
    core_turns.before_kernel(q.device.type)
    out, lse = _attention_with_lse(q, k, v, scale, causal, q_offset, k_offset)
    if nonfinite.suspicious(out, lse) and not nonfinite.all_finite(q, k, v):
        # NaN/Inf inputs: the reference's semantics, not the kernel's (see nonfinite.py)
        return nonfinite.attention_with_lse(q, k, v, scale=scale, causal=causal, q_offset=q_offset,
                                            k_offset=k_offset)
    return out, lse


def _attention_with_lse(q, k, v, scale, causal, q_offset, k_offset):
    Sk = k.shape[2]
    Sq = q.shape[2]
    if not causal:
        return _dispatch(q, k, v, scale, diag=None)
    d = q_offset - k_offset  # row i sees key j iff j <= i + d
    if d >= Sk - 1:
        return _dispatch(q, k, v, scale, diag=None)
    if d + Sq - 1 < 0:
        return _empty(q, Sq)
    dead = max(0, -d)
    if dead == 0:
        return _dispatch(q, k, v, scale, diag=d)
    out, lse = _dispatch(q[:, :, dead:], k, v, scale, diag=d + dead)
    head_out, head_lse = _empty(q, dead)
    return torch.cat([head_out, out], dim=2), torch.cat([head_lse.to(lse.dtype), lse], dim=2)


def _empty(q, rows):
    B, Hq, _, D = q.shape
    out = torch.zeros(B, Hq, rows, D, dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, rows), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    return out, lse


def _dispatch(q, k, v, scale, diag):
    """diag None: no mask; 0: top-left causal; > 0: row i sees keys j <= i + diag."""
    backend = select_backend(q.device.type, q.dtype, bool(diag))
    return _RUNNERS[backend](q, k, v, scale, diag)


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _offset_mask(Sq, Sk, diag, dtype, device):
    """Additive mask: 0 where key j <= i + diag, -inf elsewhere."""
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(Sk, device=device).unsqueeze(0)
    return torch.zeros(Sq, Sk, dtype=dtype, device=device).masked_fill(j > i + diag, float("-inf"))


def _grouped(fn, q, k, v, scale):
    """Unmasked GQA without copying K/V: the g query heads that share a K/V head are stacked along
    the sequence, which is exact when no mask depends on the query position."""
    B, Hq, Sq, D = q.shape
    Hk = k.shape[1]
    g = Hq // Hk
    if g == 1:
        return fn(q, k, v)
    qg = q.reshape(B, Hk, g * Sq, D)
    out, lse = fn(qg, k, v)
    return out.reshape(B, Hq, Sq, D), lse.reshape(B, Hq, Sq)


def _run_cpu_flash(q, k, v, scale, diag):
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if diag is None:
        return _grouped(lambda a, b, c: op(a, b, c, 0.0, False, scale=scale), q, k, v, scale)
    k, v = _expand_kv(q, k, v)
    if diag == 0:
        return op(q, k, v, 0.0, True, scale=scale)
    mask = _offset_mask(q.shape[2], k.shape[2], diag, q.dtype, q.device)
    return op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


def _run_math(q, k, v, scale, diag):
    adt = acc_dtype(q.dtype)
    k, v = _expand_kv(q, k, v)
    s = torch.matmul(q.to(adt), k.to(adt).transpose(-1, -2)) * scale
    if diag is not None:
        s = s + _offset_mask(q.shape[2], k.shape[2], diag, adt, q.device)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.matmul(p, v.to(adt)).to(q.dtype), lse


def _run_flash_attn(q, k, v, scale, diag):
    fa = flash_attn_func()
    # flash-attn takes bshd and handles GQA itself; its causal mask is aligned bottom-right, which
    # equals top-left only for square blocks, so non-square causal goes to the masked path.
    if diag is not None and (diag != 0 or q.shape[2] != k.shape[2]):
        return _run_torch_efficient(q, k, v, scale, diag)
    out, lse, _ = fa(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        dropout_p=0.0, softmax_scale=scale, causal=diag == 0, return_attn_probs=True,
    )
    return out.transpose(1, 2), lse


def _run_torch_flash(q, k, v, scale, diag):
    if diag is not None and (diag != 0 or q.shape[2] != k.shape[2]):
        return _run_torch_efficient(q, k, v, scale, diag)
    k, v = _expand_kv(q, k, v)
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, diag == 0, False, scale=scale
    )
    return res[0], res[1]


# The memory-efficient kernel reads an additive bias through its strides and requires every stride
# but the last to be a multiple of 16 bytes (4 fp32 / 8 fp16 or bf16 elements) and the base pointer
# 16-byte aligned; torch's public SDPA pads masks for it, the raw op does not. 16 elements covers
# every dtype.
BIAS_ALIGN_ELEMS = 16


def _efficient_op():
    """torch.ops.aten._scaled_dot_product_efficient_attention (a function: tests substitute a CPU
    stand-in that enforces the CUDA kernel's checks)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention


def efficient_bias(B, H, Sq, Sk, diag, dtype, device):
    """Additive mask for the efficient kernel: [B, H, Sq, Sk] where row i sees keys j <= i + diag.
    One [Sq, Sk_pad] allocation (Sk_pad = Sk rounded up to BIAS_ALIGN_ELEMS) sliced to Sk and
    expanded with zero strides over B and H: aligned rows, O(Sq * Sk) memory whatever B * H."""
    pad = -(-Sk // BIAS_ALIGN_ELEMS) * BIAS_ALIGN_ELEMS
    store = torch.zeros(Sq, pad, dtype=dtype, device=device)
    i = torch.arange(Sq, device=device).unsqueeze(1)
    j = torch.arange(pad, device=device).unsqueeze(0)
    store.masked_fill_(j > i + diag, float("-inf"))
    return store[:, :Sk].expand(B, H, Sq, Sk)


def _run_torch_efficient(q, k, v, scale, diag):
    k, v = _expand_kv(q, k, v)
    bias = None
    # diag 0 is the kernel's own top-left causal mask (no bias tensor at all); other offsets need one.
    if diag:
        bias = efficient_bias(q.shape[0], q.shape[1], q.shape[2], k.shape[2], diag, q.dtype, q.device)
    res = _efficient_op()(q, k, v, bias, True, 0.0, diag == 0, scale=scale)
    # The LSE comes back padded to a multiple of 32 rows.
    return res[0], res[1][..., : q.shape[2]]


def _run_triton(q, k, v, scale, diag):
    from . import triton_kernels

    if diag is None:
        return triton_kernels.attention_fwd(q, k, v, scale=scale)
    # diag expresses the offsets relative to this (already trimmed) block.
    return triton_kernels.attention_fwd(q, k, v, scale=scale, causal=True, q_offset=diag, k_offset=0)


_RUNNERS = {
    "cpu-flash": _run_cpu_flash,
    "flash-attn": _run_flash_attn,
    "torch-flash": _run_torch_flash,
    "torch-efficient": _run_torch_efficient,
    "triton": _run_triton,
    "math": _run_math,
}
