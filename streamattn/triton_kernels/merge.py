"""In-place log-sum-exp merge of a partial attention result (one kernel, one torch reference).

``merge_(out, lse, block_out, block_lse)`` updates ``out`` ``[B, H, S, D]`` float32 and ``lse``
``[B, H, S]`` float32 IN PLACE with a partial ``(block_out, block_lse)`` computed over keys disjoint
from those already in ``(out, lse)``:

    l = max(l1, l2) + log(exp(l1 - max) + exp(l2 - max))
    o = o1 * exp(l1 - l) + o2 * exp(l2 - l)

``block_out`` may be any float dtype (fp16 / bf16 / fp32), ``block_lse`` float32. All four tensors
may have ANY strides (a "bshd" output can be passed as ``x.transpose(1, 2)``). A row whose both
lse are -inf gets ``o = 0, l = -inf``; a row with one side -inf
takes the other side unchanged. No NaN arises from -inf rows. Start a running result with
``out = zeros``, ``lse = full(-inf)`` (``merge_init``) and merge every partial into it.
"""
import torch

from ._jit import check_device, interpreting, lazy_jit

try:
    import triton.language as tl
except Exception:  # pragma: no cover
    class tl:  # noqa: N801
        constexpr = None


def _merge_kernel(
    O, L, BO, BL,
    sob, soh, sos, sod,
    slb, slh, sls,
    sbob, sboh, sbos, sbod,
    sblb, sblh, sbls,
    H, S, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < S
    mask = s_ok[:, None] & (offs_d < D)[None, :]

    l1 = tl.load(L + b * slb + h * slh + offs_s * sls, mask=s_ok, other=float("-inf"))
    l2 = tl.load(BL + b * sblb + h * sblh + offs_s * sbls, mask=s_ok, other=float("-inf")).to(tl.float32)
    mx = tl.maximum(l1, l2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # both empty: exp(-inf - 0) = 0, no NaN
    w1 = tl.exp(l1 - mx)
    w2 = tl.exp(l2 - mx)
    tot = w1 + w2
    nonempty = tot > 0.0
    tot_safe = tl.where(nonempty, tot, 1.0)
    l_new = tl.where(nonempty, mx + tl.log(tot_safe), float("-inf"))
    c1 = w1 / tot_safe
    c2 = w2 / tot_safe

    o_ptrs = O + b * sob + h * soh + offs_s[:, None] * sos + offs_d[None, :] * sod
    bo_ptrs = BO + b * sbob + h * sboh + offs_s[:, None] * sbos + offs_d[None, :] * sbod
    o1 = tl.load(o_ptrs, mask=mask, other=0.0)
    o2 = tl.load(bo_ptrs, mask=mask, other=0.0).to(tl.float32)
    # c == 0 exactly for an empty side, so a non-finite garbage value there is still dropped
    o_new = tl.where(c1[:, None] > 0.0, o1 * c1[:, None], 0.0) + tl.where(c2[:, None] > 0.0, o2 * c2[:, None], 0.0)
    tl.store(o_ptrs, o_new, mask=mask)
    tl.store(L + b * slb + h * slh + offs_s * sls, l_new, mask=s_ok)


_merge = lazy_jit(_merge_kernel)


def _check(out, lse, block_out, block_lse):
    if out.dim() != 4 or block_out.shape != out.shape:
        raise ValueError(f"out {tuple(out.shape)} and block_out {tuple(block_out.shape)} must be equal [B, H, S, D]")
    if lse.shape != out.shape[:3] or block_lse.shape != out.shape[:3]:
        raise ValueError(f"lse {tuple(lse.shape)} / block_lse {tuple(block_lse.shape)} must be {tuple(out.shape[:3])}")


def merge_(out, lse, block_out, block_lse):
    """Merge ``(block_out, block_lse)`` into ``(out, lse)`` in place; returns ``(out, lse)``.

    ``out`` and ``lse`` must be float32 (the running accumulator); see the module docstring.
    """
    _check(out, lse, block_out, block_lse)
    if out.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"out and lse must be float32 accumulators, got {out.dtype}, {lse.dtype}")
    if block_lse.dtype != torch.float32:
        raise ValueError(f"block_lse must be float32, got {block_lse.dtype}")
    if not block_out.is_floating_point():
        raise ValueError(f"block_out must be a float tensor, got {block_out.dtype}")
    check_device(out, lse, block_out, block_lse)
    B, H, S, D = out.shape
    if out.numel() == 0:
        return out, lse
    bd = max(16, 1 << (D - 1).bit_length())
    if interpreting() or out.device.type != "cuda":
        bs = min(64, max(16, 1 << (S - 1).bit_length()))
        extra = {}
    else:
        bs = max(16, min(128, 8192 // bd))
        extra = {"num_warps": 4}
    grid = ((S + bs - 1) // bs, B * H)
    _merge[grid](
        out, lse, block_out, block_lse,
        *out.stride(), *lse.stride(), *block_out.stride(), *block_lse.stride(),
        H, S, D, BLOCK_S=bs, BLOCK_D=bd, **extra,
    )
    return out, lse


def merge_reference(out, lse, block_out, block_lse):
    """Torch version of ``merge_`` (in place, same semantics); works for float32 and float64 ``out``."""
    _check(out, lse, block_out, block_lse)
    l1 = lse
    l2 = block_lse.to(lse.dtype)
    mx = torch.maximum(l1, l2)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    w1 = torch.exp(l1 - mx)
    w2 = torch.exp(l2 - mx)
    tot = w1 + w2
    nonempty = tot > 0
    tot_safe = torch.where(nonempty, tot, torch.ones_like(tot))
    l_new = torch.where(nonempty, mx + torch.log(tot_safe), torch.full_like(tot, float("-inf")))
    c1 = (w1 / tot_safe)[..., None]
    c2 = (w2 / tot_safe)[..., None]
    o2 = block_out.to(out.dtype)
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    o_new = torch.where(c1 > 0, out * c1, zero) + torch.where(c2 > 0, o2 * c2, zero)
    out.copy_(o_new)
    lse.copy_(l_new)
    return out, lse


def merge_init(B, H, S, D, device=None):
    """An empty running result: ``out = zeros [B,H,S,D] float32``, ``lse = -inf [B,H,S] float32``."""
    return (torch.zeros((B, H, S, D), dtype=torch.float32, device=device),
            torch.full((B, H, S), float("-inf"), dtype=torch.float32, device=device))
