"""Attention forward with log-sum-exp (LSE), tiled with online softmax.

Public: ``attention_fwd(q, k, v, *, scale, causal=False, q_offset=0, k_offset=0) -> (out, lse)``
and the float64-capable torch reference ``attention_reference`` with the same contract.

Contract (shared by every local-attention backend of streamattn; see docs/algorithms.md):
- ``q`` ``[B, Hq, Sq, D]``, ``k``/``v`` ``[B, Hk, Sk, D]`` (layout "bhsd"; ANY strides, so a
  "bshd" tensor passed as ``x.transpose(1, 2)`` works without a copy). ``Hq % Hk == 0``; query
  head ``h`` reads key/value head ``h // (Hq // Hk)`` (GQA; ``Hk == 1`` is MQA).
- ``causal`` uses GLOBAL positions: query row ``i`` sits at ``q_offset + i``, key ``j`` at
  ``k_offset + j``; the query sees the key iff ``k_offset + j <= q_offset + i``. Ring / Torus steps pass
  the global start of the query block and of the key block.
- Returns ``out`` ``[B, Hq, Sq, D]`` contiguous in q's dtype and ``lse`` ``[B, Hq, Sq]`` float32 =
  natural log of the sum over visible keys of ``exp(scale * q.k)``. A row that sees no key gets
  ``out = 0`` and ``lse = -inf`` (never NaN), which the LSE merge treats as an empty partial.
- Accumulation is float32 whatever the input dtype (fp16 / bf16 / fp32). For fp32 inputs the dot
  products use IEEE fp32 (not TF32) so results match a float64 reference to ~1e-6 relative.
- Head dims: any D <= 256 (padded to a power of two >= 16 inside; 16, 32, 64, 128 are the fast ones).
Block sizes come from ``block_sizes()`` (a rule, not ``@triton.autotune``, which the interpreter
cannot run).
"""
import math

import torch

from ._jit import check_device, interpreting, lazy_jit

try:  # only for the kernel's annotations/body; the module imports without triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only without triton
    class tl:  # noqa: N801 - stand-in so the kernel's annotations evaluate
        constexpr = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_sizes(sq: int, sk: int, d: int, dtype: torch.dtype, on_gpu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for one launch.

    GPU: the usual FlashAttention-2 forward shapes (128x64 tiles; 64x64 for D > 128 or fp32, whose
    tiles take twice the registers/shared memory). Interpreter: tiles no larger than the sequence
    (each tile is one numpy op, so fewer larger tiles run faster), capped at 64.
    """
    bd = max(16, _next_pow2(d))
    if bd > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the Triton attention kernel")
    if on_gpu:
        wide = dtype == torch.float32 or bd > 128
        bm = 64 if wide else 128
        bn = 32 if (wide and bd > 128) else 64
        warps = 8 if bd >= 128 else 4
        stages = 2 if wide else 3
    else:
        bm = min(64, max(16, _next_pow2(sq)))
        bn = min(64, max(16, _next_pow2(sk)))
        warps, stages = 1, 1
    return bm, bn, bd, warps, stages


def _attn_fwd_kernel(
    Q, K, V, O, L,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    slb, slh, slm,
    HQ, GROUP, SQ, SK, HEAD_D,
    q_offset, k_offset, qk_scale_log2,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // HQ
    off_h = pid_bh % HQ
    off_hk = off_h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < SQ
    d_valid = offs_d < HEAD_D

    q_ptrs = Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_b * skb + off_hk * skh
    v_base = V + off_b * svb + off_hk * svh
    q_pos = q_offset + offs_m  # global query positions

    hi = SK
    if CAUSAL:
        # last key any row of this tile may see: k_offset + j <= q_offset + last row
        last = q_offset + pid_m * BLOCK_M + BLOCK_M - 1 - k_offset + 1
        hi = tl.minimum(tl.maximum(last, 0), SK)

    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_valid = cols < SK
        k_ptrs = k_base + cols[None, :] * skn + offs_d[:, None] * skd
        kt = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale_log2
        visible = n_valid[None, :]
        if CAUSAL:
            visible = visible & ((k_offset + cols)[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet keep m = -inf; subtract 0 there so exp2 gives 0, not NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v_ptrs = v_base + cols[:, None] * svn + offs_d[None, :] * svd
        vt = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = tl.where(has_key[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))

    o_ptrs = O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    l_ptrs = L + off_b * slb + off_h * slh + offs_m * slm
    tl.store(l_ptrs, lse, mask=m_valid)


_attn_fwd = lazy_jit(_attn_fwd_kernel)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, S, D] (bhsd)")
    B, Hq, Sq, D = q.shape
    Bk, Hk, Sk, Dk = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of key/value heads {Hk}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    return B, Hq, Sq, D, Hk, Sk


def attention_fwd(q, k, v, *, scale=None, causal=False, q_offset=0, k_offset=0,
                  block_m=None, block_n=None):
    """Attention with LSE. See the module docstring for the exact contract.

    ``scale`` defaults to ``1/sqrt(D)``. ``block_m`` / ``block_n`` (powers of two >= 16) override
    the block rule; tests use them to put masks on block edges.
    Returns ``(out [B, Hq, Sq, D] q.dtype contiguous, lse [B, Hq, Sq] float32 contiguous)``.
    """
    B, Hq, Sq, D, Hk, Sk = _validate(q, k, v)
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use one of {_DTYPES}")
    check_device(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    on_gpu = q.device.type == "cuda" and not interpreting()
    bm, bn, bd, warps, stages = block_sizes(Sq, Sk, D, q.dtype, on_gpu)
    if block_m is not None:
        bm = int(block_m)
    if block_n is not None:
        bn = int(block_n)
    for name, b in (("block_m", bm), ("block_n", bn)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name}={b} must be a power of two >= 16")
    # fp32 inputs: IEEE fp32 dots (TF32 would cost ~1e-3 relative). bf16 under the interpreter:
    # Triton 3.9's interpreter computes bf16 tl.dot wrongly (|err| ~1e10 seen here), so the kernel
    # upcasts bf16 tiles to fp32 before each dot there; on a GPU bf16 uses the tensor-core dot.
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpreting())
    grid = (triton_cdiv(Sq, bm), B * Hq)
    extra = {} if interpreting() else {"num_warps": warps, "num_stages": stages}
    _attn_fwd[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        Hq, Hq // Hk, Sq, Sk, D,
        int(q_offset), int(k_offset), float(scale) * LOG2E,
        CAUSAL=bool(causal), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DOT_FP32=dot_fp32,
        **extra,
    )
    return out, lse


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def attention_reference(q, k, v, *, scale=None, causal=False, q_offset=0, k_offset=0,
                        compute_dtype=None):
    """Torch reference with the exact contract of ``attention_fwd`` (use float64 in tests).

    Computes in ``compute_dtype`` (default: float64 for float64 inputs, else float32) and returns
    ``out`` in q's dtype and ``lse`` in float32 (float64 when computing in float64).
    """
    B, Hq, Sq, D, Hk, Sk = _validate(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    cd = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    g = Hq // Hk
    kk = k.to(cd).repeat_interleave(g, dim=1)
    vv = v.to(cd).repeat_interleave(g, dim=1)
    s = torch.matmul(q.to(cd), kk.transpose(-1, -2)) * scale
    if causal:
        qi = torch.arange(Sq, device=q.device) + int(q_offset)
        kj = torch.arange(Sk, device=q.device) + int(k_offset)
        s = s.masked_fill(kj[None, :] > qi[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    out = torch.matmul(p, vv).masked_fill(empty[..., None], 0.0)
    return out.to(q.dtype), lse.to(torch.float64 if cd == torch.float64 else torch.float32)
