"""Gradient tasks the RankPool runs on every rank: streamattn's backward against float64 autograd
of the whole sequence (the same inputs on every rank from a seed), plus the error paths."""
from __future__ import annotations

import torch

import streamattn
from streamattn.reference import reference_attention
from streamattn.testing.cases import make_inputs, split_lengths


def requires_grad_error(rank, world_size, *, seq=12, heads=4):
    """Calls streamattn.attention with q requiring grad; returns the error text (or None)."""
    lens = split_lengths(seq, world_size)
    q, k, v, _ = make_inputs(seed=0, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    start = sum(lens[:rank])
    q, k, v = (x[:, start : start + lens[rank]].clone() for x in (q, k, v))
    q.requires_grad_()
    try:
        streamattn.attention(q, k, v)
    except NotImplementedError as exc:
        return str(exc)
    return None


def _rel(a, ref):
    """max |a - ref| / max |ref| (0 for an empty reference)."""
    ref = ref.double()
    if ref.numel() == 0:
        return 0.0
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference_grads(q, k, v, joint, dout, djout, *, scale, causal, joint_strategy):
    """Float64 autograd of the full-sequence reference: (dq, dk, dv, (djq, djk, djv) or None)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v) + (joint or ())]
    kw = {}
    if joint is not None:
        kw = dict(joint_q=leaves[3], joint_k=leaves[4], joint_v=leaves[5], joint_strategy=joint_strategy)
    res = reference_attention(leaves[0], leaves[1], leaves[2], scale=scale, causal=causal, **kw)
    outs, grads = ((res,), (dout.double(),)) if joint is None else (res, (dout.double(), djout.double()))
    g = torch.autograd.grad(outs, leaves, grads)
    return g[0], g[1], g[2], (None if joint is None else tuple(g[3:]))


def check_grad(rank, world_size, *, seq, heads=4, kv_heads=None, head_dim=8, batch=1, lens=None,
               dtype="float32", layout="bshd", causal=False, joint_len=0, joint_strategy="front",
               algorithm="auto", ulysses_degree=None, ring_degree=None, seed=0, scale=None):
    """Forward + backward of streamattn.attention on this rank's shard vs float64 autograd of the
    whole sequence. Returns max-relative errors {"out", "dq", "dk", "dv", "djq", "djk", "djv",
    "jout"} (joint ones None without joint tokens) and the plan's algorithm."""

    kv_heads = kv_heads or heads
    lens = lens or split_lengths(seq, world_size)
    q, k, v, joint = make_inputs(seed=seed, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1000)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(q.dtype)
    djout = None if joint is None else torch.randn(joint[0].shape, generator=gen,
                                                   dtype=torch.float64).to(q.dtype)
    rq, rk, rv, rj = reference_grads(q, k, v, joint, dout, djout, scale=scale, causal=causal,
                                     joint_strategy=joint_strategy)
    start = sum(lens[:rank])
    sl = slice(start, start + lens[rank])
    conv = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda t: t.contiguous())
    back = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    ql, kl, vl = (conv(t[:, sl]).requires_grad_() for t in (q, k, v))
    kw, jl = {}, ()
    if joint is not None:
        jl = tuple(conv(t).requires_grad_() for t in joint)
        kw = dict(joint_q=jl[0], joint_k=jl[1], joint_v=jl[2], joint_strategy=joint_strategy)
    res = streamattn.attention(ql, kl, vl, layout=layout, causal=causal, scale=scale,
                               algorithm=algorithm, ulysses_degree=ulysses_degree,
                               ring_degree=ring_degree, **kw)
    if joint is None:
        torch.autograd.backward([res], [conv(dout[:, sl])])
        out = res
    else:
        out, jout = res
        torch.autograd.backward([out, jout], [conv(dout[:, sl]), conv(djout)])
    ref_out = reference_attention(q, k, v, scale=scale, causal=causal,
                                  **({} if joint is None else dict(joint_q=joint[0], joint_k=joint[1],
                                                                   joint_v=joint[2],
                                                                   joint_strategy=joint_strategy)))
    ref_out, ref_jout = ref_out if joint is not None else (ref_out, None)
    result = {"out": _rel(back(out), ref_out[:, sl]), "dq": _rel(back(ql.grad), rq[:, sl]),
              "dk": _rel(back(kl.grad), rk[:, sl]), "dv": _rel(back(vl.grad), rv[:, sl]),
              "jout": None, "djq": None, "djk": None, "djv": None,
              "grad_dtype": str(ql.grad.dtype).replace("torch.", "")}
    if joint is not None:
        result["jout"] = _rel(back(jout), ref_jout)
        for name, t, ref in zip(("djq", "djk", "djv"), jl, rj):
            result[name] = _rel(back(t.grad), ref)
        result["joint_digest"] = float(sum(t.grad.double().sum() for t in jl))
    return result


def check_cases(rank, world_size, *, cases):
    """check_grad for each case (dicts of its keyword arguments), one pool round trip."""
    return [check_grad(rank, world_size, **c) for c in cases]


def check_grad_stale_backward(rank, world_size, *, seq=16, heads=4, head_dim=8, seed=3):
    """Negative control: a ring backward that reuses the first step's K/V at every step (the
    stale-K/V bug of diffusers' ring backward, its issue 14265). Returns check_grad's errors,
    which must fail the tolerance."""
    from streamattn.algorithms import ring_backward as rb

    real = rb.attention_block_backward
    first = {}

    def stale(dout, q, k, v, out, lse, **kw):
        if "kv" not in first:
            first["kv"] = (k, v)
        k0, v0 = first["kv"]
        if k0.shape == k.shape:
            k, v = k0, v0
        return real(dout, q, k, v, out, lse, **kw)

    rb.attention_block_backward = stale
    try:
        return check_grad(rank, world_size, seq=seq, heads=heads, head_dim=head_dim, seed=seed,
                          algorithm="ring")
    finally:
        rb.attention_block_backward = real


class _Shard(torch.autograd.Function):
    """Replicated [B, S, ...] -> this rank's shard; backward: the shards' gradients summed over
    the ranks (each rank's full-size gradient is zero outside its shard)."""

    @staticmethod
    def forward(ctx, x, lens, rank):
        ctx.lens, ctx.rank, ctx.shape = lens, rank, x.shape
        start = sum(lens[:rank])
        return x[:, start : start + lens[rank]].clone()

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        full = g.new_zeros(ctx.shape)
        start = sum(ctx.lens[: ctx.rank])
        full[:, start : start + ctx.lens[ctx.rank]] = g
        dist.all_reduce(full)
        return full, None, None


class _Gather(torch.autograd.Function):
    """Shards -> the full sequence on every rank; backward: this rank's slice of the (identical)
    full gradient."""

    @staticmethod
    def forward(ctx, x, lens, rank):
        import torch.distributed as dist

        ctx.lens, ctx.rank = lens, rank
        parts = [x.new_empty((x.shape[0], n) + tuple(x.shape[2:])) for n in lens]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 1)

    @staticmethod
    def backward(ctx, g):
        start = sum(ctx.lens[: ctx.rank])
        return g[:, start : start + ctx.lens[ctx.rank]], None, None


def gradcheck_global(rank, world_size, *, algorithm="auto", ulysses_degree=None, ring_degree=None,
                     causal=False, heads=2, kv_heads=None, seq=6, head_dim=2, joint_len=0):
    """torch.autograd.gradcheck (float64) of the whole sharded computation as one function of
    the full-sequence inputs: every rank holds the same inputs, takes its shard, runs
    streamattn.attention and all-gathers the output, so every rank perturbs the same element in
    lockstep and the Jacobian checked is the global one (seq: a multiple of the ranks, for
    gloo's all_gather). Returns True or raises."""
    lens = split_lengths(seq, world_size)
    q, k, v, joint = make_inputs(seed=7, batch=1, seq=seq, heads=heads, kv_heads=kv_heads or heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype="float64")
    inputs = tuple(t.requires_grad_() for t in (q, k, v) + (joint or ()))

    def f(a, b, c, *j):
        kw = {} if not j else dict(joint_q=j[0], joint_k=j[1], joint_v=j[2])
        res = streamattn.attention(*(_Shard.apply(t, lens, rank) for t in (a, b, c)),
                                   causal=causal, algorithm=algorithm,
                                   ulysses_degree=ulysses_degree, ring_degree=ring_degree, **kw)
        if j:
            return _Gather.apply(res[0], lens, rank), res[1]
        return _Gather.apply(res, lens, rank)

    return bool(torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4))
