"""Joint (text) tokens folded into the sharded sequence, around any joint-free algorithm.

The replicated text tokens of an MMDiT call ([B, T, H|Hk, D] on every rank) normally take their
own steps in every algorithm (attended separately, (out, lse) partials merged over the ring, the
joint output gathered over the Ulysses group). Folded, rank r instead prepends its share of the
text rows (sharding.fold_lengths) to its q, k, v shard, the plan runs plain attention over S + T
tokens (sharding.folded_problem), and the text rows of the output are all-gathered, so every rank
returns the whole joint output as before. Exact for non-causal attention: a query's output does
not depend on the order of the keys, and every text query sees every key exactly once.

With the LSE (with_lse, the op): the text rows' LSE are all-gathered too, so the backward gets
the final (out, lse) of every row, which is all it needs of the forward.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import tags, trace
from ..sharding import can_fold, fold_lengths, folded_problem, shard

TAG_FOLD, TAG_FOLD_LSE = tags.JOINT_FOLD, tags.JOINT_FOLD_LSE


def folded_attention(run: Callable, transport, problem, q, k, v, joint, with_lse=False):
    """run(folded_problem, q', k', v') -> (out', None) is the plan's joint-free algorithm; q, k, v:
    this rank's [B, S_r, H|Hk, D] shard (bshd), joint: (jq [B, T, H, D], jk, jv [B, T, Hk, D]),
    identical on every rank. Returns (out [B, S_r, H, D], joint_out [B, T, H, D]).
    with_lse: run returns (out', None, lse' [B, H, t_r + S_r], None) and so does this, with lse
    [B, H, S_r] and joint_lse [B, H, T] (identical on every rank)."""
    if not can_fold(problem):
        raise ValueError("streamattn: the joint tokens can be folded only into non-causal attention "
                         "in the contiguous layout")
    lens = fold_lengths(problem)
    me = transport.rank
    t = lens[me]
    with trace.span("pack"):
        fq, fk, fv = (torch.cat([shard(j, lens, me), x], 1) for j, x in zip(joint, (q, k, v)))
    res = run(folded_problem(problem), fq, fk, fv)
    out = res[0]
    jout = transport.all_gather_rows(out[:, :t], lens, TAG_FOLD)
    if not with_lse:
        return out[:, t:], jout
    lse = res[2]
    jlse = transport.all_gather_rows(lse[:, :, :t].transpose(1, 2), lens, TAG_FOLD_LSE)
    return out[:, t:], jout, lse[:, :, t:], jlse.transpose(1, 2)
