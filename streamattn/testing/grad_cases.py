"""Gradient tasks the RankPool runs on every rank: streamattn's backward against float64 autograd
of the whole sequence (the same inputs on every rank from a seed), plus the error paths."""
from __future__ import annotations

import torch

import streamattn
from streamattn.reference import reference_attention
from streamattn.sharding import shard, split_lengths
from streamattn.testing.cases import make_inputs
from ..reference import rel_err


def _rows_of(rank, world_size, lens, zigzag):
    """x [B, S, ...] -> this rank's rows: its zigzag chunks, or its `lens[rank]` consecutive rows."""
    if zigzag:
        from streamattn.zigzag import zigzag_shard

        return lambda x: zigzag_shard(x, rank, world_size)
    from streamattn.sharding import shard

    return lambda x: shard(x, lens, rank)

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
               algorithm="auto", ulysses_degree=None, ring_degree=None, seed=0, scale=None,
               seq_layout="contiguous"):
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
    take = _rows_of(rank, world_size, lens, seq_layout == "zigzag")
    conv = (lambda t: t.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda t: t.contiguous())
    back = (lambda t: t.transpose(1, 2)) if layout == "bhsd" else (lambda t: t)
    ql, kl, vl = (conv(take(t)).requires_grad_() for t in (q, k, v))
    kw, jl = {}, ()
    if joint is not None:
        jl = tuple(conv(t).requires_grad_() for t in joint)
        kw = dict(joint_q=jl[0], joint_k=jl[1], joint_v=jl[2], joint_strategy=joint_strategy)
    res = streamattn.attention(ql, kl, vl, layout=layout, causal=causal, scale=scale,
                               algorithm=algorithm, ulysses_degree=ulysses_degree,
                               ring_degree=ring_degree, seq_layout=seq_layout, **kw)
    with torch.no_grad():  # the eager (no-grad) path gives the same output
        res0 = streamattn.attention(ql, kl, vl, layout=layout, causal=causal, scale=scale,
                                    algorithm=algorithm, ulysses_degree=ulysses_degree,
                                    ring_degree=ring_degree, seq_layout=seq_layout, **kw)
    nograd_out = res0 if joint is None else res0[0]
    if joint is None:
        torch.autograd.backward([res], [conv(take(dout))])
        out = res
    else:
        out, jout = res
        torch.autograd.backward([out, jout], [conv(take(dout)), conv(djout)])
    ref_out = reference_attention(q, k, v, scale=scale, causal=causal,
                                  **({} if joint is None else dict(joint_q=joint[0], joint_k=joint[1],
                                                                   joint_v=joint[2],
                                                                   joint_strategy=joint_strategy)))
    ref_out, ref_jout = ref_out if joint is not None else (ref_out, None)
    result = {"out": rel_err(back(out), take(ref_out)), "dq": rel_err(back(ql.grad), take(rq)),
              "dk": rel_err(back(kl.grad), take(rk)), "dv": rel_err(back(vl.grad), take(rv)),
              "nograd_out": rel_err(back(nograd_out), take(ref_out)),
              "jout": None, "djq": None, "djk": None, "djv": None,
              "grad_dtype": str(ql.grad.dtype).replace("torch.", "")}
    if joint is not None:
        result["jout"] = rel_err(back(jout), ref_jout)
        for name, t, ref in zip(("djq", "djk", "djv"), jl, rj):
            result[name] = rel_err(back(t.grad), ref)
        result["joint_digest"] = float(sum(t.grad.double().sum() for t in jl))
    return result


def check_cases(rank, world_size, *, cases):
    """check_grad for each case (dicts of its keyword arguments; "settings": {STREAMATTN_*: value}
    set around that case, config.override), one pool round trip. Each result also says whether
    the op's forward ran a ring with all joint queries on every member ("joint_all"; None: no
    ring ran) and whether it ran the folded schedule ("folded_op")."""
    from streamattn import algorithms
    from streamattn.algorithms import ring, usp
    from streamattn.config import override

    seen, folded = [], []
    real, real_fold = ring.ring_core, algorithms.folded_attention

    def spy(*args, **kw):
        seen.append(bool(kw.get("joint_all", False)))
        return real(*args, **kw)

    def spy_fold(run, *args, **kw):
        folded.append(run.__module__ == "streamattn.op")  # the op's run, not the eager one
        return real_fold(run, *args, **kw)

    out = []
    ring.ring_core = usp.ring_core = spy
    algorithms.folded_attention = spy_fold
    try:
        for c in cases:
            c = dict(c)
            seen.clear()
            folded.clear()
            with override(**c.pop("settings", {})):
                res = check_grad(rank, world_size, **c)
            # the first ring of the case is the op's forward (check_grad's first call needs grad)
            res["joint_all"] = seen[0] if seen else None
            res["folded_op"] = any(folded)
            out.append(res)
    finally:
        ring.ring_core = usp.ring_core = real
        algorithms.folded_attention = real_fold
    return out


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


class DiTBlock(torch.nn.Module):
    """A small joint-attention DiT block (image tokens sharded, text tokens replicated) that calls
    streamattn.attention: norms, QKV projections, attention, output projections, residuals."""

    def __init__(self, dim=32, heads=4, layout="bshd"):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.norm, self.norm_c = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.qkv_c = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, 3 * dim)
        self.out, self.out_c = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, x, c):
        B, S, C = x.shape
        T = c.shape[1]
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        jq, jk, jv = self.qkv_c(self.norm_c(c)).view(B, T, 3, self.heads, C // self.heads).unbind(2)
        if self.layout == "bhsd":
            q, k, v, jq, jk, jv = (t.transpose(1, 2) for t in (q, k, v, jq, jk, jv))
        o, jo = streamattn.attention(q, k, v, layout=self.layout, joint_q=jq, joint_k=jk, joint_v=jv)
        if self.layout == "bhsd":
            o, jo = o.transpose(1, 2), jo.transpose(1, 2)
        return x + self.out(o.reshape(B, S, C)), c + self.out_c(jo.reshape(B, T, C))


def compile_block(rank, world_size, *, seqs=(12, 14, 17, 20), text_len=3, dim=32, heads=4,
                  layout="bshd", backend="inductor"):
    """torch.compile(DiTBlock, fullgraph=True, backend=backend) vs eager on this rank's shard:
    graph breaks (torch._dynamo.explain), max relative difference of outputs and parameter
    gradients, and how many graphs were compiled for len(seqs) sequence lengths."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = DiTBlock(dim, heads, layout)
    compiled = torch.compile(block, fullgraph=True, backend=backend)

    def inputs(seq):
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(2, seq, dim, generator=g)
        c = torch.randn(2, text_len, dim, generator=g)
        lens = split_lengths(seq, world_size)
        start = sum(lens[:rank])
        return x[:, start : start + lens[rank]].clone().requires_grad_(), c.requires_grad_()

    def run(fn, seq):
        block.zero_grad()
        x, c = inputs(seq)
        y, yc = fn(x, c)
        (y.square().sum() + yc.sum()).backward()
        return [y, yc, x.grad] + [p.grad.clone() for p in block.parameters()]

    explain = torch._dynamo.explain(block)(*inputs(seqs[0]))
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    worst = 0.0
    for seq in seqs:
        got, want = run(compiled, seq), run(block, seq)
        worst = max([worst] + [rel_err(a.detach(), b.detach()) for a, b in zip(got, want)])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    return {"graph_breaks": explain.graph_break_count, "graphs": graphs, "rel_diff": worst,
            "break_reasons": [str(r.reason) for r in explain.break_reasons]}


def train_step(rank, world_size, *, model="flux", height=6, width=6, text_len=5, batch=2, heads=4,
               head_dim=8, lr=0.5, seed=0, algorithm="auto", ulysses_degree=None, ring_degree=None):
    """One training step (loss, backward, SGD step) of a tiny random diffusers transformer,
    parallelized over the group, vs the same step on one process (computed on every rank).
    Returns the max relative differences of the loss, the gradients and the new parameters (and
    step_size, the largest relative parameter change, to show the step is not negligible)."""
    from .models import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
    from streamattn.integrations.diffusers import all_reduce_gradients, parallelize

    def build():
        if model == "flux":
            m = tiny_flux(seed, heads=heads, head_dim=head_dim, layers=1, single_layers=1)
            x, kw = flux_inputs(m, seed + 1, height=height, width=width, text_len=text_len, batch=batch)
        else:
            m = tiny_sd3(seed, heads=heads, head_dim=head_dim, layers=2, sample_size=2 * height)
            x, kw = sd3_inputs(m, seed + 1, height=2 * height, width=2 * width, text_len=text_len,
                               batch=batch)
        return m.train(), x, kw

    def step(m, x, kw, parallel):
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        t = torch.full((x.shape[0],), 0.7)
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2))
        pred = m(hidden_states=x, timestep=t, return_dict=False, **kw)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.backward()
        if parallel:
            all_reduce_gradients(m)
        grads = [p.grad.clone() for p in m.parameters()]
        opt.step()
        return float(loss), grads, [p.detach().clone() for p in m.parameters()]

    ref_m, x, kw = build()
    ref_loss, ref_grads, ref_params = step(ref_m, x, kw, False)
    m, x, kw = build()
    akw = {k: v for k, v in dict(algorithm=algorithm, ulysses_degree=ulysses_degree,
                                 ring_degree=ring_degree).items() if v not in (None, "auto")}
    parallelize(m, **akw)
    loss, grads, params = step(m, x, kw, True)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    return {"loss": abs(loss - ref_loss) / abs(ref_loss),
            "grad": max(rel(a, b) for a, b in zip(grads, ref_grads)),
            "param": max(rel(a, b) for a, b in zip(params, ref_params)),
            "step_size": max(rel(lr * g, p) for p, g in zip(ref_params, ref_grads)),
            "digest": float(sum(p.double().sum() for p in params))}


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def ring_backward_peak(rank, world_size, *, local_seq=2048, heads=4, head_dim=64, seed=0):
    """Peak RSS growth (KiB) of this rank during the backward of ring attention with a local
    shard of local_seq tokens (fp32). The peak is reset first (/proc/self/clear_refs: 5). Buffers
    above 64 KiB are mmap'd (glibc mallopt, as MALLOC_MMAP_THRESHOLD_=65536 would at process start)
    so RSS falls when they are freed and the peak tracks live memory."""
    import ctypes

    from streamattn.cpu_malloc import M_MMAP_THRESHOLD

    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 65536)
    g = torch.Generator().manual_seed(seed + rank)
    q, k, v = (torch.randn(1, local_seq, heads, head_dim, generator=g).requires_grad_()
               for _ in range(3))
    out = streamattn.attention(q, k, v, algorithm="ring")
    dout = torch.randn(out.shape, generator=g)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    out.backward(dout)
    peak = _status_kb("VmHWM")
    return {"growth_kb": peak - base, "shard_kb": q.numel() * 4 // 1024}


def yunchang_shim_backward(rank, world_size, *, ulysses_degree, ring_degree, seq=24, heads=4,
                           head_dim=8, causal=False, seed=0, ring_impl_type="basic"):
    """Training through the yunchang shim (LongContextAttention): its gradients vs float64
    autograd of the whole sequence. Returns check_grad-style errors."""
    from streamattn.compat import yunchang as shim

    lens = split_lengths(seq, world_size)
    q, k, v, _ = make_inputs(seed=seed, batch=1, seq=seq, heads=heads, kv_heads=heads,
                             head_dim=head_dim)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).float()
    rq, rk, rv, _ = reference_grads(q, k, v, None, dout, None, scale=None, causal=causal,
                                    joint_strategy="front")
    take = _rows_of(rank, world_size, lens, ring_impl_type == "zigzag")
    ql, kl, vl = (take(t).clone().requires_grad_() for t in (q, k, v))
    shim.set_seq_parallel_pg(ulysses_degree, ring_degree, rank, world_size)
    out = shim.LongContextAttention(ring_impl_type=ring_impl_type)(ql, kl, vl, causal=causal)
    out.backward(take(dout))
    return {"dq": rel_err(ql.grad, take(rq)), "dk": rel_err(kl.grad, take(rk)),
            "dv": rel_err(vl.grad, take(rv))}


def backward_bytes(rank, world_size, *, seq=24, heads=4, kv_heads=2, head_dim=8, joint_len=0,
                   algorithm="ring"):
    """Bytes this rank sends in one backward pass (forward done first, counters reset between),
    per link class; joint_len > 0 adds joint tokens."""
    from streamattn import api

    q, k, v, joint = make_inputs(seed=5, batch=1, seq=seq, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, joint_len=joint_len)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank).clone().requires_grad_() for t in (q, k, v))
    kw = {}
    if joint_len:
        kw = dict(zip(("joint_q", "joint_k", "joint_v"), (t.clone().requires_grad_() for t in joint)))
    res = streamattn.attention(ql, kl, vl, algorithm=algorithm, **kw)
    outs = res if isinstance(res, tuple) else (res,)
    api.reset_byte_counters()
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return api.byte_counters()
