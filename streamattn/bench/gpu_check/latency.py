"""A short bench: median latency of every algorithm on each transport (section `bench`)."""
from __future__ import annotations

import statistics
import time

from .distributed import each_transport, gather
from .results import short


def bench(res, rank, world, device, transports, algorithms, args, gloo, broken, watch=None):
    """Median latency per algorithm and transport (each call timed as the slowest rank's)."""
    import torch
    import torch.distributed as dist

    import streamattn
    from streamattn import api
    from streamattn.sharding import shard, split_lengths
    from streamattn.testing.cases import make_inputs

    dt = args.bench_dtype
    q, k, v, joint = make_inputs(seed=7, batch=1, seq=args.bench_seq, heads=args.bench_heads,
                                 kv_heads=args.bench_heads, head_dim=args.bench_dim,
                                 joint_len=args.bench_joint, dtype=dt)
    lens = split_lengths(args.bench_seq, world)
    ql, kl, vl = (shard(t, lens, rank).contiguous().to(device) for t in (q, k, v))
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0].to(device), joint_k=joint[1].to(device), joint_v=joint[2].to(device))
    shape = (f"seq {args.bench_seq} + joint {args.bench_joint}, {args.bench_heads} heads x "
             f"{args.bench_dim}, {dt}, {world} ranks")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for transport in each_transport(transports):
            for algorithm in algorithms:
                check = f"{transport:<7} {algorithm:<7} latency"
                if broken.skip(res, "bench", check, transport):
                    continue
                if watch is not None:
                    watch("bench", check)
                times, status = [], "ok"
                try:
                    for i in range(args.bench_warmup + args.bench_iters):
                        dist.barrier(group=gloo)
                        sync()
                        t0 = time.perf_counter()
                        streamattn.attention(ql, kl, vl, algorithm=algorithm, **kw)
                        sync()
                        if i >= args.bench_warmup:
                            times.append(time.perf_counter() - t0)
                except ValueError as exc:
                    status = "na:" + short(exc)
                except Exception as exc:  # noqa: BLE001
                    status = "error:" + short(exc)
                allr = gather([status, times], gloo)
                bad = [s for s, _ in allr if s != "ok"]
                if bad:
                    kind = "N/A" if all(s.startswith("na:") for s in bad) else "ERROR"
                    res.add("bench", check, kind, bad[0].split(":", 1)[1])
                    if kind == "ERROR":
                        broken.mark(transport, bad[0].split(":", 1)[1])
                    continue
                per_call = [max(ts[i] for _, ts in allr) for i in range(args.bench_iters)]
                plan = str(next(reversed(api.plan_cache.values()))[1]) if api.plan_cache else ""
                res.add("bench", check, "PASS",
                        f"median {1e3 * statistics.median(per_call):.2f} ms "
                        f"(min {1e3 * min(per_call):.2f}) [{shape}] {plan[:80]}")
    finally:
        if watch is not None:
            watch.cancel()
