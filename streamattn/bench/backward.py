"""`streamattn bench --backward`: forward+backward times side by side (streamattn's algorithms,
and yunchang's LongContextAttention as the baseline where its backward runs on CPU), with the
gradient error of each against float64 autograd of the whole sequence."""
from __future__ import annotations

import sys
import time

import torch

_layers = {}


def _inputs(rank, world, shape, seed=0):
    from streamattn.sharding import split_lengths
    from streamattn.testing.cases import make_inputs

    lens = split_lengths(shape["seq"], world)
    q, k, v, _ = make_inputs(seed=seed, batch=shape.get("batch", 1), seq=shape["seq"],
                             heads=shape["heads"], kv_heads=shape["heads"],
                             head_dim=shape["head_dim"], dtype=shape.get("dtype", "float32"))
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.dtype)
    return q, k, v, dout, lens


def fwd_bwd(rank, world_size, *, shape, cfg, iters=3, warmup=1, check=True):
    """Time `iters` forward+backward calls of one configuration on this rank; returns
    {"times": [...], "err": max relative gradient error or None, "error": text or None}."""
    from streamattn.reference import rel_err
    from streamattn.testing.grad_cases import reference_grads

    import streamattn

    q, k, v, dout, lens = _inputs(rank, world_size, shape)
    start = sum(lens[:rank])
    sl = slice(start, start + lens[rank])
    causal = bool(shape.get("causal", False))

    if cfg["kind"] == "yunchang":
        import yunchang
        from yunchang.kernels import AttnType

        key = (cfg["ulysses_degree"], cfg["ring_degree"])
        if key not in _layers:
            yunchang.set_seq_parallel_pg(*key, rank, world_size)
            # Its torch (aten flash) kernels: the only ones with a backward that may run on CPU
            # (the LSE-returning forward hook of the forward benchmark has no backward).
            _layers[key] = yunchang.LongContextAttention(ring_impl_type="basic",
                                                        attn_type=AttnType.TORCH_FLASH)
        layer = _layers[key]

        def call(a, b, c):
            return layer(a, b, c, causal=causal)
    else:
        kw = {k2: cfg[k2] for k2 in ("algorithm", "ulysses_degree", "ring_degree") if cfg.get(k2)}

        def call(a, b, c):
            return streamattn.attention(a, b, c, causal=causal, **kw)

    times, grads = [], None
    try:
        for i in range(warmup + iters):
            ql, kl, vl = (t[:, sl].clone().requires_grad_() for t in (q, k, v))
            torch.distributed.barrier()
            t0 = time.perf_counter()
            call(ql, kl, vl).backward(dout[:, sl])
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
            grads = (ql.grad, kl.grad, vl.grad)
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        return {"times": [], "err": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
    err = None
    if check:
        ref = reference_grads(q, k, v, None, dout, None, scale=None, causal=causal,
                              joint_strategy="front")
        err = max(rel_err(g, r[:, sl]) for g, r in zip(grads, ref[:3]))
    return {"times": times, "err": err, "error": None}


def configs(world, heads, with_yunchang):
    """ulysses, ring, usp (every valid split) and yunchang's USP at the same splits."""
    out = []
    for u in [d for d in range(1, world + 1) if world % d == 0 and heads % d == 0]:
        r = world // u
        algo = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
        out.append({"name": f"{algo} {u}x{r}", "kind": "streamattn", "algorithm": algo,
                    "ulysses_degree": u if algo == "usp" else None,
                    "ring_degree": r if algo == "usp" else None})
        if with_yunchang:
            out.append({"name": f"yunchang {u}x{r}", "kind": "yunchang", "ulysses_degree": u,
                        "ring_degree": r})
    out.append({"name": "auto", "kind": "streamattn", "algorithm": "auto"})
    return out


def run_backward(args, shapes, algos) -> int:
    """The --backward mode: local ranks, every shape, the table on stdout."""
    from ..testing import RankError, RankPool

    n = args.nproc or 4
    with_yc = "yunchang" in algos
    print(f"streamattn bench --backward: forward+backward on {n} local ranks (gloo), "
          f"{args.iters} timed calls after {max(1, args.warmup)} warm-up", flush=True)
    try:
        with RankPool(n, threads=args.threads, timeout=args.timeout) as pool:
            for shape in shapes:
                shape = dict(shape, dtype=args.dtype)
                print(f"\nshape {shape}")
                print(f"{'config':<16} {'median ms':>10} {'grad err':>10}  note")
                for cfg in configs(n, shape["heads"], with_yc):
                    res = pool.run("streamattn.bench.backward:fwd_bwd", shape=shape, cfg=cfg,
                                   iters=max(1, args.iters), warmup=max(1, args.warmup),
                                   check=not args.no_check)
                    if any(r["error"] for r in res):
                        err = next(r["error"] for r in res if r["error"])
                        print(f"{cfg['name']:<16} {'-':>10} {'-':>10}  did not run: {err}")
                        continue
                    per_call = [max(ts) for ts in zip(*(r["times"] for r in res))]
                    med = sorted(per_call)[len(per_call) // 2] * 1e3
                    errs = [r["err"] for r in res if r["err"] is not None]
                    shown = f"{max(errs):.1e}" if errs else "-"
                    print(f"{cfg['name']:<16} {med:>10.2f} {shown:>10}")
    except RankError as exc:
        print(f"streamattn bench --backward: a rank failed: {exc}", file=sys.stderr)
        return 1
    return 0
