"""`streamattn.attention`: which implementation a call runs.

Inference calls (no input requires grad, not inside torch.compile) and the inference-only options
(stale_kv, comm_dtype) run the plain eager call (streamattn.api.attention). A call that needs a
gradient, or one torch.compile traces, runs the registered op streamattn::attention
(streamattn.op: exact backward, traceable with fullgraph=True). streamattn.op is imported on the
first such call, not with the package: registering it imports torch._dynamo (about 1.3 s of CPU
per process), which an inference process never needs.
"""
from __future__ import annotations

import gc

import torch

from . import api
from .validate import check_local

__all__ = ["attention"]


def _op_module():
    """streamattn.op, imported on first use (it registers torch.ops.streamattn.* and imports
    torch._dynamo). That import leaves frame reference cycles behind (torch.fx.wrap keeps its
    own frame), and through their f_back chain they hold the caller's frame, with the group of
    the first call, until the cyclic collector runs: once, right after the import, it runs now,
    so that a group destroyed later is freed inside destroy_process_group (0.1 s, once)."""
    global _collected
    from . import op

    if torch.compiler.is_compiling():  # traced: the import alone (dynamo guards sys.modules)
        return op
    if not _collected:
        _collected = True
        gc.collect()
    return op


_collected = False  # _op_module has run its one collection


def attention(q, k, v, group=None, *, layout="bshd", causal=False, scale=None, joint_q=None,
              joint_k=None, joint_v=None, joint_strategy="front", algorithm="auto",
              ulysses_degree=None, ring_degree=None, stale_kv=None, layer=None,
              seq_layout="contiguous", comm_dtype=None):
    """streamattn.attention (see streamattn.api.attention for the arguments and shapes). With an
    input that requires grad, or inside torch.compile, it runs as the registered op
    streamattn::attention (exact backward; traceable with fullgraph=True); otherwise, and with
    the inference-only options stale_kv and comm_dtype, as the plain eager call."""
    kw = dict(layout=layout, causal=causal, scale=scale, joint_q=joint_q, joint_k=joint_k,
              joint_v=joint_v, joint_strategy=joint_strategy, algorithm=algorithm,
              ulysses_degree=ulysses_degree, ring_degree=ring_degree, seq_layout=seq_layout)
    compiling = torch.compiler.is_compiling()
    if stale_kv is not None or comm_dtype is not None or not (
            compiling or api.needs_grad(q, k, v, joint_q, joint_k, joint_v)):
        return api.attention(q, k, v, group, stale_kv=stale_kv, layer=layer, comm_dtype=comm_dtype,
                             **kw)
    err = check_local(q, k, v, layout, causal, scale, joint_q, joint_k, joint_v, joint_strategy,
                      algorithm, ulysses_degree, ring_degree)
    if err:
        if compiling:
            raise ValueError(f"streamattn.attention: {err}")
        with torch.no_grad():  # the eager path raises the same error on every rank
            return api.attention(q, k, v, group, **kw)
    causal = api.causal_mode(causal, seq_layout)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    joint = None if joint_q is None else (joint_q, joint_k, joint_v)
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if joint is not None:
            joint = tuple(t.transpose(1, 2) for t in joint)
    jq, jk, jv = joint if joint is not None else (None, None, None)
    op = _op_module()

    out, jout, _, _ = torch.ops.streamattn.attention(
        q, k, v, jq, jk, jv, op.group_id(group), bool(causal), float(scale), joint_strategy,
        algorithm, ulysses_degree or 0, ring_degree or 0, causal == "zigzag")
    if layout == "bhsd":
        out = out.transpose(1, 2)
        jout = jout.transpose(1, 2) if joint is not None else jout
    return out if joint is None else (out, jout)
