"""The one LSE merge every algorithm uses.

Partial attention results over disjoint key sets combine exactly through their log-sum-exp:
    l = log(exp(l1) + exp(l2)),   o = o1 * exp(l1 - l) + o2 * exp(l2 - l)
Rows that saw no key at all (causal blocks, empty shards) carry l = -inf and o = 0; they must merge
without producing NaN, which the naive formula does (-inf - -inf).
"""
from __future__ import annotations

import torch

from . import triton_kernels


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_out_and_lse(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Merge a partial result into the running one, in place.

    out: [B, H, S, D] accumulator (float32/float64), lse: [B, H, S] same dtype.
    block_out: [B, H, S, D] any float dtype, block_lse: [B, H, S] (cast to lse's dtype).
    """
    block_lse = block_lse.to(lse.dtype)
    if out.dtype == torch.float32 and triton_kernels.enabled_for(out):
        triton_kernels.merge_(out, lse, block_out, block_lse)
        return
    new_lse = torch.logaddexp(lse, block_lse)
    # Where both sides are -inf the row stays empty; shifting by 0 there keeps exp() at 0, not NaN.
    shift = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - shift).unsqueeze(-1)
    w_new = torch.exp(block_lse - shift).unsqueeze(-1)
    out.mul_(w_old).addcmul_(block_out, w_new)  # no temporary of out's size (was * then add_)
    lse.copy_(new_lse)


def start_accumulator(block_out: torch.Tensor, block_lse: torch.Tensor) -> tuple:
    """The running (out, lse) after the first partial: the partial itself in the accumulation dtype.
    Merging it into an empty accumulator gives exactly these values (weights exp(-inf) = 0 and
    exp(l - l) = 1), so the zero fill and that merge are skipped; the result keeps the kernel's
    layout, which the later merges then read in step. Takes ownership of fresh kernel outputs."""
    adt = acc_dtype(block_out.dtype)
    return block_out.to(adt), block_lse.to(adt)


def empty_accumulator(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, device) -> tuple:
    """(out, lse) for a row set that has seen no key yet: out 0, lse -inf."""
    adt = acc_dtype(dtype)
    out = torch.zeros(batch, heads, seq, dim, dtype=adt, device=device)
    lse = torch.full((batch, heads, seq), float("-inf"), dtype=adt, device=device)
    return out, lse


def merge_all(parts: list) -> tuple:
    """Merge a list of (out, lse) partials in list order; deterministic for a fixed order."""
    out, lse = parts[0]
    out = out.to(acc_dtype(out.dtype)).clone()
    lse = lse.to(out.dtype).clone()
    for o, l in parts[1:]:
        update_out_and_lse(out, lse, o, l)
    return out, lse
