"""yunchang / xDiT drop-in: switch an engine written for yunchang with one import line.

    # from yunchang import LongContextAttention, set_seq_parallel_pg
    from streamattn.compat.yunchang import LongContextAttention, set_seq_parallel_pg

    set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size)
    attn = LongContextAttention()                       # after set_seq_parallel_pg, like yunchang
    out = attn(q, k, v, softmax_scale=s)                # [B, S_local, H, D] in, same out
    out = attn(q, k, v, joint_tensor_query=tq, joint_tensor_key=tk, joint_tensor_value=tv,
               joint_strategy="front")                  # xDiT: [B, T + S_local, H, D], text first

`xFuserLongContextAttention` takes xDiT's signature (`forward(attn, query, key, value, *, ...)`).
Every call is `streamattn.attention(q, k, v, group, ...)` on the sequence-parallel group that
`set_seq_parallel_pg` made, with the degrees it was given (or the planner's choice with
`algorithm="auto"`), so the results are those of streamattn.attention, bit for bit.

Differences from yunchang 0.6 / xDiT (see also COMPAT below):
  * exact on every device, CPU included (yunchang's CPU ring path merges with a zero LSE);
  * any S_local per rank (yunchang needs equal shards), GQA/MQA K/V heads (H % Hk == 0);
  * joint tokens: joint K/V are replicated on every rank (as xDiT's); yunchang's own
    LongContextAttention has no joint arguments (they come from xDiT's subclass), and here they
    are accepted by both classes. The output has the joint rows concatenated in front ("front") or
    behind ("rear") the local rows, as xDiT returns them;
  * forward only (no autograd), no dropout, no sliding window, no ALiBi, no softcap: a value other
    than the default raises NotImplementedError instead of being silently ignored;
  * ring_impl_type "zigzag"/"stripe" expect load-balanced, reordered shards; with causal=True
    their global order differs from rank order, so they raise; non-causal they are identical
    (attention is order-free) and accepted. attn_type / attn_processor / use_pack_qkv / use_sync
    are accepted and ignored (streamattn picks its kernel; STREAMATTN_KERNEL forces one);
  * use_ulysses_low only changes which ranks yunchang pairs for the all-to-all; streamattn's
    planner places its Ulysses groups itself (the output is the same: shards are in rank order);
  * return_attn_probs=True: yunchang returns only the output too; so does this.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import streamattn

__all__ = ["LongContextAttention", "xFuserLongContextAttention", "UlyssesAttention",
           "set_seq_parallel_pg", "get_sp_group", "COMPAT"]

COMPAT = {
    "layout": "bshd [B, S_local, H, D] (yunchang's scatter_idx=2, gather_idx=1)",
    "uneven shards": "supported (yunchang: equal shards only)",
    "joint tokens": "joint_tensor_query/key/value + joint_strategy front|rear (xDiT), output concatenated",
    "unsupported": "dropout_p>0, window_size!=(-1,-1), softcap!=0, alibi_slopes, autograd",
}

_GROUPS: dict = {}
_STATE = {"group": None, "ulysses_degree": None, "ring_degree": None, "set": False,
          "sp_ranks": None}


def set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size, use_ulysses_low=True):
    """yunchang's signature. sp_ulysses_degree * sp_ring_degree ranks form one sequence-parallel
    group; world_size / that many data-parallel replicas each get their own (consecutive ranks,
    as in yunchang). Collective over all ranks when there is more than one replica."""
    sp = int(sp_ulysses_degree) * int(sp_ring_degree)
    if sp < 1 or world_size % sp:
        raise ValueError(f"world_size {world_size} is not a multiple of sp_ulysses_degree "
                         f"{sp_ulysses_degree} x sp_ring_degree {sp_ring_degree}")
    dp = world_size // sp
    group = None
    ranks = list(range(world_size))
    if dp > 1:
        # One group per replica, created once per (sp, world_size) (new_group is collective).
        groups = _GROUPS.get((sp, world_size))
        if groups is None:
            groups = _GROUPS[(sp, world_size)] = [
                dist.new_group(list(range(d * sp, (d + 1) * sp))) for d in range(dp)]
        group, ranks = groups[rank // sp], list(range(rank // sp * sp, (rank // sp + 1) * sp))
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but torch.distributed has {dist.get_world_size()} ranks")
    _STATE.update(group=group, ulysses_degree=int(sp_ulysses_degree), ring_degree=int(sp_ring_degree),
                  set=True, sp_ranks=ranks, use_ulysses_low=bool(use_ulysses_low))


def get_sp_group():
    """The sequence-parallel process group set_seq_parallel_pg made (None = the default group)."""
    return _STATE["group"]


def _plan_kwargs(algorithm):
    if algorithm == "auto":
        return {"algorithm": "auto"}
    if algorithm is not None:
        return {"algorithm": algorithm}
    u, r = _STATE["ulysses_degree"], _STATE["ring_degree"]
    if u * r == 1:
        return {}
    if r == 1:
        return {"algorithm": "ulysses"}
    if u == 1:
        return {"algorithm": "ring"}
    return {"algorithm": "usp", "ulysses_degree": u, "ring_degree": r}


def _unsupported(dropout_p, window_size, softcap, alibi_slopes):
    if dropout_p:
        raise NotImplementedError("streamattn compat: dropout_p > 0 is not supported")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError("streamattn compat: sliding-window attention is not supported")
    if softcap:
        raise NotImplementedError("streamattn compat: softcap is not supported")
    if alibi_slopes is not None:
        raise NotImplementedError("streamattn compat: ALiBi is not supported")


class LongContextAttention(torch.nn.Module):
    """yunchang.LongContextAttention on streamattn (USP with the degrees of set_seq_parallel_pg).

    algorithm: None (default: the degrees given to set_seq_parallel_pg), "auto" (streamattn's
    topology-aware planner picks) or any streamattn algorithm. group: override the group.
    """

    def __init__(self, scatter_idx: int = 2, gather_idx: int = 1, ring_impl_type: str = "basic",
                 use_pack_qkv: bool = False, use_sync: bool = False, attn_type=None,
                 attn_processor=None, *, algorithm=None, group=None):
        super().__init__()
        if not _STATE["set"] and group is None:
            raise RuntimeError("use set_seq_parallel_pg() first (as with yunchang)")
        if (scatter_idx, gather_idx) != (2, 1):
            raise NotImplementedError("streamattn compat: only scatter_idx=2, gather_idx=1 "
                                      "([B, S_local, H, D] inputs) is supported")
        self.ring_impl_type = ring_impl_type
        self.group = group if group is not None else _STATE["group"]
        self.plan_kwargs = _plan_kwargs(algorithm) if group is None else (
            {"algorithm": algorithm or "auto"})

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, *args, joint_tensor_query=None, joint_tensor_key=None,
                joint_tensor_value=None, joint_strategy="none"):
        _unsupported(dropout_p, window_size, softcap, alibi_slopes)
        layout = {}
        if causal and self.ring_impl_type != "basic":
            if self.ring_impl_type != "zigzag" or self.plan_kwargs.get("algorithm") != "ring":
                raise NotImplementedError(
                    f"streamattn compat: ring_impl_type={self.ring_impl_type!r} with causal=True is "
                    "supported as 'zigzag' on a pure ring (ulysses_degree=1), or pass shards in "
                    "sequence order with 'basic'")
            layout = {"seq_layout": "zigzag"}  # rank r: chunks r and 2P-1-r, as yunchang's zigzag
        joints = (joint_tensor_query, joint_tensor_key, joint_tensor_value)
        if all(j is None for j in joints):
            return streamattn.attention(query, key, value, self.group, causal=causal,
                                        scale=softmax_scale, **self.plan_kwargs, **layout)
        if any(j is None for j in joints):
            raise ValueError("joint_tensor_query, joint_tensor_key, and joint_tensor_value should be "
                             "None or not None simultaneously.")
        if joint_strategy not in ("front", "rear"):
            raise ValueError(f"joint_strategy: {joint_strategy} not supported. supported joint "
                             "strategy: ['front', 'rear']")
        out, jout = streamattn.attention(query, key, value, self.group, causal=causal,
                                         scale=softmax_scale, joint_q=joint_tensor_query,
                                         joint_k=joint_tensor_key, joint_v=joint_tensor_value,
                                         joint_strategy=joint_strategy, **self.plan_kwargs)
        return torch.cat([jout, out] if joint_strategy == "front" else [out, jout], dim=1)


class xFuserLongContextAttention(LongContextAttention):  # noqa: N801 - xDiT's name
    """xDiT's xfuser.core.long_ctx_attention.xFuserLongContextAttention signature:
    forward(attn, query, key, value, *, joint_tensor_query=..., joint_strategy=..., ...).
    use_kv_cache (PipeFusion) is not supported."""

    def __init__(self, scatter_idx: int = 2, gather_idx: int = 1, ring_impl_type: str = "basic",
                 use_pack_qkv: bool = False, use_kv_cache: bool = False, use_sync: bool = False,
                 attn_type=None, attn_processor=None, q_descale=None, k_descale=None,
                 v_descale=None, *, algorithm=None, group=None):
        if use_kv_cache:
            raise NotImplementedError("streamattn compat: use_kv_cache (PipeFusion) is not supported; "
                                      "see streamattn.stale for cross-step K/V reuse")
        super().__init__(scatter_idx, gather_idx, ring_impl_type, use_pack_qkv, use_sync, attn_type,
                         attn_processor, algorithm=algorithm, group=group)

    def forward(self, attn, query, key, value, *, joint_tensor_query=None, joint_tensor_key=None,
                joint_tensor_value=None, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                return_attn_probs=False, joint_strategy="none"):
        return super().forward(query, key, value, dropout_p, softmax_scale, causal, window_size,
                               0.0, alibi_slopes, deterministic, return_attn_probs,
                               joint_tensor_query=joint_tensor_query,
                               joint_tensor_key=joint_tensor_key,
                               joint_tensor_value=joint_tensor_value, joint_strategy=joint_strategy)


class UlyssesAttention(torch.nn.Module):
    """yunchang.UlyssesAttention(sequence_process_group, scatter_idx, gather_idx, ...): Ulysses over
    the given group (default group if None)."""

    def __init__(self, sequence_process_group=None, scatter_idx: int = 2, gather_idx: int = 1,
                 use_sync: bool = False, attn_type=None):
        super().__init__()
        if (scatter_idx, gather_idx) != (2, 1):
            raise NotImplementedError("streamattn compat: only scatter_idx=2, gather_idx=1 is supported")
        self.spg = sequence_process_group

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                return_attn_probs=False, *args):
        _unsupported(dropout_p, window_size, softcap, alibi_slopes)
        from ..api import group_size

        alg = {"algorithm": "ulysses"} if group_size(self.spg) > 1 else {}
        return streamattn.attention(query, key, value, self.spg, causal=causal, scale=softmax_scale,
                                    **alg)
