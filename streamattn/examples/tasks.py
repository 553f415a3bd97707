"""Multi-rank tasks for RankPool (tests and the examples): tiny diffusers transformers, single-rank
vs sequence-parallel, exact vs stale K/V. Each is fn(rank, world_size, **json_kwargs) -> JSON."""
from __future__ import annotations


import torch
import torch.distributed as dist
from ..reference import rel_err


def _build(model, seed, height, width, text_len, batch, heads, head_dim):
    from ..testing.models import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

    if model == "flux":
        m = tiny_flux(seed, heads=heads, head_dim=head_dim)
        x, kw = flux_inputs(m, seed + 1, height=height, width=width, text_len=text_len, batch=batch)
    elif model == "sd3":
        m = tiny_sd3(seed, heads=heads, head_dim=head_dim)
        x, kw = sd3_inputs(m, seed + 1, height=height, width=width, text_len=text_len, batch=batch)
    else:
        raise ValueError(f"model must be 'flux' or 'sd3', not {model!r}")
    return m, x, kw


def check_model(rank, world_size, *, model="flux", height=16, width=16, text_len=32, batch=1,
                heads=4, head_dim=16, steps=2, seed=0, algorithm="auto", ulysses_degree=None,
                ring_degree=None):
    """The parallelized transformer's Euler loop vs the plain one on this rank: max relative error
    of the transformer output and the latents at every step."""
    from ..integrations.diffusers import parallelize, unparallelize
    from ..testing.models import euler_loop

    m, x, kw = _build(model, seed, height, width, text_len, batch, heads, head_dim)
    ref_v, ref_x = [], []
    euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: (ref_v.append(v), ref_x.append(xx)))
    akw = {"algorithm": algorithm}
    if ulysses_degree is not None:
        akw["ulysses_degree"] = ulysses_degree
    if ring_degree is not None:
        akw["ring_degree"] = ring_degree
    parallelize(m, **akw)
    errs_v, errs_x = [], []
    try:
        euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: (
            errs_v.append(rel_err(v, ref_v[i])), errs_x.append(rel_err(xx, ref_x[i]))))
    finally:
        unparallelize(m)
    return {"err_v": errs_v, "err_x": errs_x, "shape": list(ref_v[0].shape)}


def denoise_compare(rank, world_size, *, model="flux", height=32, width=32, text_len=64, batch=1,
                    heads=8, head_dim=32, steps=6, seed=0, warmup_steps=1, joint_mode="exact",
                    repeats=2, algorithm="auto"):
    """The example's measurement, one run: single rank (rank 0 alone, the others wait), then the
    group exact, then the group with stale K/V. Returns per-step errors (rank 0) and timings."""
    from ..integrations.diffusers import parallelize, reset_stale_kv, stale_state, unparallelize
    from ..testing.models import euler_loop

    m, x, kw = _build(model, seed, height, width, text_len, batch, heads, head_dim)
    t_one = None
    single_v, single_x = [], []
    if rank == 0:
        times = []
        for r in range(repeats):
            vs, xs, st = [], [], []
            euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: (vs.append(v), xs.append(xx), st.append(dt)))
            times.append(st)
        single_v, single_x = vs, xs
        t_one = [min(ts[i] for ts in times) for i in range(steps)]
    dist.barrier()

    def run_parallel(**pkw):
        parallelize(m, algorithm=algorithm, **pkw)
        try:
            with torch.no_grad():  # first call: plan + rate measurement, kept out of the timings
                m(hidden_states=x, timestep=torch.ones(x.shape[0]), return_dict=False, **kw)
            times, vs, xs, stats = [], [], [], None
            for r in range(repeats):
                reset_stale_kv(m)
                vs, xs, st = [], [], []
                dist.barrier()
                euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: (vs.append(v), xs.append(xx), st.append(dt)))
                times.append(st)
                state = stale_state(m)
                if state is not None:
                    state.finish()
                    stats = dict(state.stats)
            return vs, xs, [min(ts[i] for ts in times) for i in range(steps)], stats
        finally:
            unparallelize(m)

    ex_v, ex_x, t_ex, _ = run_parallel()
    st_v, st_x, t_st, stats = run_parallel(stale_kv=True, warmup_steps=warmup_steps, joint_mode=joint_mode)
    res = {"t_exact": t_ex, "t_stale": t_st, "stale_stats": stats}
    if rank == 0:
        res.update(
            t_single=t_one,
            exact_vs_single_v=[rel_err(a, b) for a, b in zip(ex_v, single_v)],
            exact_vs_single_x=[rel_err(a, b) for a, b in zip(ex_x, single_x)],
            stale_vs_exact_v=[rel_err(a, b) for a, b in zip(st_v, ex_v)],
            stale_vs_exact_x=[rel_err(a, b) for a, b in zip(st_x, ex_x)],
        )
    return res


# ───────────────────────────────────────────────────────────── yunchang shim

_yc_layers: dict = {}


def _yunchang_kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, **kwargs):
    """yunchang's attn_processor contract (flash-attn forward): q, k, v [B, S, H, D] ->
    (out [B, S, H, D], lse [B, H, S]), with streamattn's CPU kernel (true LSE)."""
    from streamattn.kernels import attention_with_lse

    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  scale=scale, causal=causal)
    return out.transpose(1, 2), lse


def _yunchang_layer(u, r):
    """yunchang's own LongContextAttention for (u, r), created once (its groups are collective)."""
    if (u, r) not in _yc_layers:
        import yunchang

        yunchang.set_seq_parallel_pg(u, r, dist.get_rank(), dist.get_world_size())
        _yc_layers[(u, r)] = yunchang.LongContextAttention(ring_impl_type="basic", attn_type=None,
                                                           attn_processor=_yunchang_kernel)
    return _yc_layers[(u, r)]


def check_yunchang_shim(rank, world_size, *, ulysses_degree, ring_degree, seq=64, heads=8,
                        kv_heads=None, head_dim=16, batch=1, joint_len=0, joint_strategy="front",
                        causal=False, seed=0, lens=None, softmax_scale=None, compare_yunchang=True):
    """The shim vs streamattn.attention on the same inputs (must be bit-identical), and, when
    yunchang is importable and the case is one it supports (equal shards, no joint tokens), vs
    yunchang's own USP with a true-LSE kernel."""
    from streamattn.compat import yunchang as shim
    from streamattn.sharding import split_lengths
    from streamattn.testing.cases import make_inputs

    import streamattn

    kv_heads = kv_heads or heads
    sp = ulysses_degree * ring_degree           # < world_size: data-parallel replicas of SP groups
    sp_rank, replica = rank % sp, rank // sp
    lens = lens or split_lengths(seq, sp)
    q, k, v, joint = make_inputs(seed=seed + replica, batch=batch, seq=seq, heads=heads,
                                 kv_heads=kv_heads, head_dim=head_dim, joint_len=joint_len)
    start = sum(lens[:sp_rank])
    ql, kl, vl = (t[:, start:start + lens[sp_rank]].contiguous() for t in (q, k, v))
    shim.set_seq_parallel_pg(ulysses_degree, ring_degree, rank, world_size)
    layer = shim.LongContextAttention()
    jkw, akw = {}, {}
    if joint is not None:
        jkw = dict(joint_tensor_query=joint[0], joint_tensor_key=joint[1],
                   joint_tensor_value=joint[2], joint_strategy=joint_strategy)
        akw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2], joint_strategy=joint_strategy)
    out = layer(ql, kl, vl, softmax_scale=softmax_scale, causal=causal, **jkw)
    xo = shim.xFuserLongContextAttention()(None, ql, kl, vl, softmax_scale=softmax_scale,
                                           causal=causal, **jkw)
    u, r = ulysses_degree, ring_degree
    alg = ({} if u * r == 1 else {"algorithm": "ulysses"} if r == 1 else {"algorithm": "ring"}
           if u == 1 else {"algorithm": "usp", "ulysses_degree": u, "ring_degree": r})
    ref = streamattn.attention(ql, kl, vl, shim.get_sp_group(), causal=causal, scale=softmax_scale,
                               **akw, **alg)
    if joint is not None:
        ref = torch.cat([ref[1], ref[0]] if joint_strategy == "front" else list(ref), dim=1)
    res = {"identical": bool(torch.equal(out, ref)), "xfuser_identical": bool(torch.equal(xo, ref)),
           "shape": list(out.shape), "yunchang_err": None, "yunchang": None}
    equal = len(set(lens)) == 1
    if compare_yunchang and joint is None and equal and heads == kv_heads:
        try:
            import yunchang  # noqa: F401
        except Exception as exc:  # not installed (optional)
            res["yunchang"] = f"unavailable: {type(exc).__name__}: {exc}"
        else:
            yo = _yunchang_layer(u, r)(ql, kl, vl, softmax_scale=softmax_scale, causal=causal)
            res["yunchang"] = getattr(yunchang, "__version__", "?")
            res["yunchang_err"] = rel_err(out, yo)
    return res


# ───────────────────────────────────────────────────────────── stale K/V


def _ref64(q, k, v, scale):
    """float64 attention, bshd, GQA-expanded."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def check_stale(rank, world_size, *, seq=40, heads=4, kv_heads=None, head_dim=8, batch=1,
                joint_len=6, joint_mode="exact", steps=4, warmup_steps=1, layout="bshd",
                lens=None, static=False, layers=2, seed=0, joint_strategy="front"):
    """StaleKV over `steps` steps of `layers` layers against a float64 reference that uses exactly
    what stale K/V promises: this step's local and joint K/V, the other ranks' of the previous
    step (the whole sequence fresh on warm-up steps, and for the joint queries in "exact" mode).
    Returns per-step max errors and a checksum of the joint output (equal on every rank)."""
    import hashlib
    import math

    from streamattn.stale import StaleKV
    from streamattn.sharding import split_lengths
    from streamattn.testing.cases import make_inputs

    kv_heads = kv_heads or heads
    lens = lens or split_lengths(seq, world_size)
    start, stop = sum(lens[:rank]), sum(lens[: rank + 1])
    scale = 1.0 / math.sqrt(head_dim)
    state = StaleKV(warmup_steps=warmup_steps, joint_mode=joint_mode)
    prev = {}
    errs, jerrs, sums = [], [], []
    for s in range(steps):
        e_step, j_step = 0.0, 0.0
        for layer in range(layers):
            q, k, v, joint = make_inputs(seed=seed + 1000 * layer + (0 if static else s), batch=batch,
                                         seq=seq, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                         joint_len=joint_len)
            ql, kl, vl = (t[:, start:stop] for t in (q, k, v))
            args = [ql, kl, vl]
            jkw = {}
            if joint is not None:
                jkw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2], joint_strategy=joint_strategy)
            if layout == "bhsd":
                args = [t.transpose(1, 2).contiguous() for t in args]
                jkw = {n: (t.transpose(1, 2).contiguous() if torch.is_tensor(t) else t) for n, t in jkw.items()}
            res = state.attention(("layer", layer), *args, layout=layout, **jkw)
            out, jout = res if joint is not None else (res, None)
            if layout == "bhsd":
                out = out.transpose(1, 2)
                jout = None if jout is None else jout.transpose(1, 2)
            stale = s >= max(warmup_steps, 1)
            if stale:
                pk, pv = prev[layer]
                ku = torch.cat([pk[:, :start], k[:, start:stop], pk[:, stop:]], 1)
                vu = torch.cat([pv[:, :start], v[:, start:stop], pv[:, stop:]], 1)
            else:
                ku, vu = k, v
            if joint is not None:
                ref = _ref64(ql, torch.cat([joint[1], ku], 1), torch.cat([joint[2], vu], 1), scale)
                jk_img, jv_img = (pk, pv) if stale and joint_mode == "stale" else (k, v)
                jref = _ref64(joint[0], torch.cat([joint[1], jk_img], 1), torch.cat([joint[2], jv_img], 1), scale)
                j_step = max(j_step, rel_err(jout, jref))
                sums.append(hashlib.sha256(jout.contiguous().numpy().tobytes()).hexdigest()[:16])
            else:
                ref = _ref64(ql, ku, vu, scale)
            e_step = max(e_step, rel_err(out, ref))
            prev[layer] = (k, v)
        errs.append(e_step)
        jerrs.append(j_step)
    stats = dict(state.stats)
    state.reset()
    return {"err": errs, "joint_err": jerrs, "joint_sums": sums, "stats": stats}


def check_stale_model(rank, world_size, *, model="flux", height=12, width=12, text_len=16,
                      steps=4, heads=4, head_dim=16, warmup_steps=1, joint_mode="exact", batch=1):
    """A parallelized tiny model with stale_kv: warm-up steps equal the exact parallel run; later
    steps differ a little; every rank returns the same output."""
    import hashlib

    from ..integrations.diffusers import parallelize, unparallelize
    from ..testing.models import euler_loop

    m, x, kw = _build(model, 0, height, width, text_len, batch, heads, head_dim)
    parallelize(m)
    ex = []
    euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: ex.append(v))
    unparallelize(m)
    parallelize(m, stale_kv=True, warmup_steps=warmup_steps, joint_mode=joint_mode)
    errs, sums = [], []
    for rep in range(2):  # a second generation: the timestep going up resets the state
        st = []
        euler_loop(m, x, kw, steps, on_step=lambda i, xx, v, dt: st.append(v))
        errs.append([rel_err(a, b) for a, b in zip(st, ex)])
        sums.append(hashlib.sha256(st[-1].contiguous().numpy().tobytes()).hexdigest()[:16])
    unparallelize(m)
    return {"err": errs, "sums": sums}
