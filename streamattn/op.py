"""`streamattn.attention` as a registered torch op: exact gradients and torch.compile.

Two custom ops (torch.library.custom_op), both opaque to torch.compile, with fake (meta)
implementations so dynamo traces through them with symbolic sequence lengths:

    streamattn::attention(q, k, v, jq?, jk?, jv?, group_id, causal, scale, joint_strategy,
                          algorithm, ulysses_degree, ring_degree, zigzag) -> (out, jout, lse, jlse)
    streamattn::attention_backward(dout, djout?, q, k, v, jq?, jk?, jv?, out, jout?, lse, jlse?,
                                   <same options>) -> (dq, dk, dv, djq, djk, djv)

Tensors are bshd: q [B, S_local, H, D], k, v [B, S_local, Hk, D], joint [B, T, H|Hk, D]; lse
[B, H, S_local] and jlse [B, H, T] in the accumulation dtype (float32; float64 for float64). A
missing joint gives empty jout / jlse / djq / djk / djv. The process group travels as an int
(`group_id`, a registry of the groups this process has seen; 0 is the default group), because a
ProcessGroup cannot be an op argument.

The first-call metadata exchange, the agreement check and the plan happen inside the eager
implementations (cached per shape by streamattn.api.plan_call), so the traced graph holds only
the op, and a new sequence length costs one exchange, not a recompile per value.

Gradients: Ulysses runs the reverse all-to-alls around one local backward
(algorithms.ulysses_backward); every other algorithm the ring schedule of algorithms.ring_backward
over the whole group (rank order or the zigzag layout), using the forward's final LSE (torus,
whose forward does not return the LSE, recomputes (out, lse) with the ring forward first). Joint tokens: the gradient of the
joint output must be the same full gradient on every rank (as when everything after the
attention is replicated), and the joint inputs' gradients come back full and identical on every
rank. `stale_kv` has no backward (it raises when a gradient is required).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import algorithms, api
from .algorithms.ring_backward import local_backward, ring_backward
from .algorithms.ulysses_backward import ulysses_backward
from .config import ring_chunks_override
from .merge import acc_dtype
from .validate import check_local

__all__ = ["group_id"]  # and the ops torch.ops.streamattn.attention / attention_backward

# id -> group (0: the default group). Weak: a destroyed group must be freed inside
# destroy_process_group, not kept until interpreter exit (its gloo threads abort the process
# then); ids are never reused.
_groups = weakref.WeakValueDictionary()
_next_id = itertools.count(1)


@torch.compiler.assume_constant_result
def group_id(group) -> int:
    """The int standing for `group` in the op's arguments (registered on first use)."""
    if group is None:
        return 0
    for gid, g in _groups.items():
        if g is group:
            return gid
    gid = next(_next_id)
    _groups[gid] = group
    return gid


def _group(gid: int):
    if gid == 0:
        return None
    group = _groups.get(gid)
    if group is None:
        raise RuntimeError(f"streamattn: the process group of this call (op group id {gid}) has "
                           "been destroyed")
    return group


# ------------------------------------------------------------------------------------ forward


@torch.library.custom_op("streamattn::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, jq: Optional[Tensor], jk: Optional[Tensor],
                  jv: Optional[Tensor], group_id: int, causal: bool, scale: float,
                  joint_strategy: str, algorithm: str, ulysses_degree: int,
                  ring_degree: int, zigzag: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    group = _group(group_id)
    joint = None if jq is None else (jq, jk, jv)
    if api.group_size(group) == 1:
        out, jout, lse, jlse = algorithms.attend(q, k, v, scale=scale, causal=causal, joint=joint,
                                                 joint_strategy=joint_strategy, with_lse=True)
    else:
        transport, problem, plan = _planned(group, q, k, v, joint, causal, scale, joint_strategy,
                                            algorithm, ulysses_degree, ring_degree, zigzag)
        out, jout, lse, jlse = _forward(plan, transport, problem, q, k, v, joint)
    return _outputs(q, jq, out, jout, lse, jlse)


@_attention_op.register_fake
def _attention_fake(q, k, v, jq, jk, jv, group_id, causal, scale, joint_strategy, algorithm,
                    ulysses_degree, ring_degree, zigzag):
    B, S, H, D = q.shape
    adt = acc_dtype(q.dtype)
    out = q.new_empty((B, S, H, D))
    lse = q.new_empty((B, H, S), dtype=adt)
    if jq is None:
        return out, q.new_empty((0,)), lse, q.new_empty((0,), dtype=adt)
    T = jq.shape[1]
    return out, q.new_empty((B, T, H, D)), lse, q.new_empty((B, H, T), dtype=adt)


def _planned(group, q, k, v, joint, causal, scale, joint_strategy, algorithm, u, r, zigzag):
    causal = "zigzag" if zigzag and causal else causal
    err = check_local(q, k, v, "bshd", causal, scale, *(joint or (None, None, None)),
                      joint_strategy, algorithm, u or None, r or None)
    transport, problem, plan = api.plan_call(group, err, q, k, "bshd", causal, scale, joint,
                                             joint_strategy, algorithm, u or None, r or None)
    # the backward needs nothing of the forward's schedule but the final (out, lse) of every row,
    # which the folded schedule and a ring's all-joint-queries variant (+jall) return as well
    return transport, problem, plan


def _forward(plan, transport, problem, q, k, v, joint):
    """The plan's algorithm, with the final LSEs (torus: NaN placeholders, see the backward)."""
    if plan.joint_fold and joint is not None:
        run = lambda p, fq, fk, fv: _forward(plan, transport, p, fq, fk, fv, None)  # noqa: E731
        if plan.algorithm != "torus":
            return algorithms.folded_attention(run, transport, problem, q, k, v, joint,
                                               with_lse=True)
        # the torus' LSE are placeholders: not worth an all-gather (the backward recomputes)
        out, jout = algorithms.folded_attention(run, transport, problem, q, k, v, joint)
        return (out, jout) + _nan_lse(q, joint)
    me = transport.rank
    if problem.zigzag:
        return algorithms.zigzag_ring_attention(transport, problem, q, k, v, joint, with_lse=True)
    if plan.algorithm == "ulysses":
        return algorithms.ulysses_attention(transport, problem, q, k, v, joint,
                                            members=plan.ulysses_group(me), with_lse=True)
    if plan.algorithm == "ring":
        return algorithms.ring_attention(transport, problem, q, k, v, joint,
                                         members=plan.ring_group(me), with_lse=True,
                                         chunks=ring_chunks_override() or plan.chunks,
                                         joint_all=plan.joint_all)
    if plan.algorithm == "usp":
        return algorithms.usp_attention(transport, problem, q, k, v, joint, plan=plan, with_lse=True,
                                        chunks=ring_chunks_override() or plan.chunks)
    if plan.algorithm == "torus":
        out, jout = algorithms.torus_attention(transport, problem, q, k, v, joint, plan=plan)
        return (out, jout) + _nan_lse(q, joint)
    raise AssertionError(f"no algorithm for {plan}")


def _nan_lse(q, joint):
    """(lse [B, H, S], joint lse [B, H, T] or None) placeholders, NaN: the Torus returns no LSE."""
    B, S, H, _ = q.shape
    lse = torch.full((B, H, S), float("nan"), dtype=acc_dtype(q.dtype), device=q.device)
    jlse = None if joint is None else torch.full((B, H, joint[0].shape[1]), float("nan"),
                                                 dtype=lse.dtype, device=q.device)
    return lse, jlse


def _outputs(q, jq, out, jout, lse, jlse):
    """Fresh contiguous tensors (a custom op's outputs may not alias its inputs or each other)."""
    adt = acc_dtype(q.dtype)
    res = [out.to(q.dtype).contiguous().clone(), None, lse.to(adt).contiguous().clone(), None]
    if jq is None:
        res[1], res[3] = q.new_empty((0,)), q.new_empty((0,), dtype=adt)
    else:
        res[1], res[3] = jout.to(q.dtype).contiguous().clone(), jlse.to(adt).contiguous().clone()
    return tuple(res)


# ----------------------------------------------------------------------------------- backward


@torch.library.custom_op("streamattn::attention_backward", mutates_args=())
def _backward_op(dout: Tensor, djout: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                 jq: Optional[Tensor], jk: Optional[Tensor], jv: Optional[Tensor], out: Tensor,
                 jout: Optional[Tensor], lse: Tensor, jlse: Optional[Tensor], group_id: int,
                 causal: bool, scale: float, joint_strategy: str, algorithm: str,
                 ulysses_degree: int, ring_degree: int, zigzag: bool) -> tuple[Tensor, Tensor, Tensor,
                                                                               Tensor, Tensor, Tensor]:
    group = _group(group_id)
    joint = None if jq is None else (jq, jk, jv)
    if api.group_size(group) == 1:
        dq, dk, dv, jg = local_backward(dout, q, k, v, out, lse, scale=scale, causal=causal,
                                        joint=None if joint is None else (djout, jq, jk, jv, jout, jlse),
                                        joint_strategy=joint_strategy)
    else:
        transport, problem, plan = _planned(group, q, k, v, joint, causal, scale, joint_strategy,
                                            algorithm, ulysses_degree, ring_degree, zigzag)
        if plan.algorithm == "torus" and not problem.zigzag:
            # the torus forward does not return the LSE: recompute (out, lse) with the ring
            out, jout, lse, jlse = algorithms.ring_attention(transport, problem, q, k, v, joint,
                                                             with_lse=True)
        jargs = None if joint is None else (djout, jq, jk, jv, jout, jlse)
        if plan.algorithm == "ulysses" and not problem.zigzag:
            dq, dk, dv, jg = ulysses_backward(transport, problem, dout, q, k, v, out, lse, joint=jargs,
                                              members=plan.ulysses_group(transport.rank))
        else:
            dq, dk, dv, jg = ring_backward(transport, problem, dout, q, k, v, out, lse, joint=jargs)
    if jg is None:
        empty = q.new_empty((0,))
        return (dq.contiguous().clone(), dk.contiguous().clone(), dv.contiguous().clone(),
                empty, empty.clone(), empty.clone())
    return tuple(x.contiguous().clone() for x in (dq, dk, dv) + tuple(jg))


@_backward_op.register_fake
def _backward_fake(dout, djout, q, k, v, jq, jk, jv, out, jout, lse, jlse, group_id, causal, scale,
                   joint_strategy, algorithm, ulysses_degree, ring_degree, zigzag):
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    if jq is None:
        grads += [q.new_empty((0,)) for _ in range(3)]
    else:
        grads += [jq.new_empty(jq.shape), jk.new_empty(jk.shape), jv.new_empty(jv.shape)]
    return tuple(grads)


def _setup_context(ctx, inputs, output):
    q, k, v, jq, jk, jv = inputs[:6]
    out, jout, lse, jlse = output
    ctx.has_joint = jq is not None
    ctx.options = tuple(inputs[6:])
    if ctx.has_joint:
        ctx.save_for_backward(q, k, v, jq, jk, jv, out, jout, lse, jlse)
    else:
        ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, dout, djout, _dlse, _djlse):
    if ctx.has_joint:
        q, k, v, jq, jk, jv, out, jout, lse, jlse = ctx.saved_tensors
        if djout is None:
            djout = torch.zeros_like(jout)
    else:
        q, k, v, out, lse = ctx.saved_tensors
        jq = jk = jv = jout = jlse = djout = None
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, djq, djk, djv = torch.ops.streamattn.attention_backward(
        dout.contiguous(), None if djout is None else djout.contiguous(), q, k, v, jq, jk, jv, out,
        jout, lse, jlse, *ctx.options)
    if not ctx.has_joint:
        djq = djk = djv = None
    return (dq, dk, dv, djq, djk, djv) + (None,) * len(ctx.options)


_attention_op.register_autograd(_backward, setup_context=_setup_context)
