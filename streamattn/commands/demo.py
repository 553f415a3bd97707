"""`streamattn demo`: the first thing a new user runs.

Spawns local CPU ranks (a real gloo group), runs every algorithm on a scaled-down Flux-1024 shape
(4096 image + 512 text tokens, 24 heads, head dim 128 → divided by --scale), checks each rank's
output against the float64 reference and prints: algorithm, degrees, latency, max error.
"""
from __future__ import annotations

import sys
import time

from ..plan import valid_ulysses_degrees

TASK = "streamattn.testing.cases:timed_attention"


def add_arguments(p):
    p.add_argument("--nproc", type=int, default=4, help="local ranks to spawn (default 4)")
    p.add_argument("--seq", type=int, default=4096, help="image tokens before scaling (Flux-1024: 4096)")
    p.add_argument("--joint-len", type=int, default=512, help="text tokens before scaling (Flux: 512)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--scale", type=int, default=4, help="divide tokens and head dim by this (CPU)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])


def configs(world, heads):
    rows = [("auto", None)]
    for u in valid_ulysses_degrees(world, heads):
        if u == world:
            rows.append(("ulysses", None))
        elif u == 1:
            rows.append(("ring", None))
        else:
            rows.append(("usp", u))
    return rows


def run(args) -> int:
    from ..testing import RankError, RankPool

    seq = max(args.seq // args.scale, args.nproc)
    joint = args.joint_len // args.scale
    dim = max(args.head_dim // args.scale, 8)
    tol = 1e-5 if args.dtype == "float32" else 2e-2
    print(f"streamattn demo: {args.nproc} CPU ranks (gloo), {seq} image + {joint} text tokens, "
          f"{args.heads} heads, head dim {dim}, {args.dtype} (Flux-1024 scaled by 1/{args.scale})")
    t0 = time.monotonic()
    failed = False
    with RankPool(args.nproc) as pool:
        print(f"spawned {args.nproc} ranks in {time.monotonic() - t0:.1f}s\n")
        header = f"{'algorithm':<10} {'ulysses x ring':<15} {'latency ms':>11} {'max err':>10}  chosen plan"
        print(header)
        print("-" * len(header))
        for algo, u in configs(args.nproc, args.heads):
            try:
                res = pool.run(TASK, seq=seq, heads=args.heads, head_dim=dim, joint_len=joint,
                               algorithm=algo, ulysses_degree=u, iters=args.iters, dtype=args.dtype)
            except RankError as exc:
                print(f"{algo:<10} failed: {exc}")
                failed = True
                continue
            err = max(max(r["err"], r["joint_err"] or 0.0) for r in res)
            plan = res[0]["plan"]
            degrees = f"{res[0]['ulysses_degree']} x {res[0]['ring_degree']}"
            ok = err <= tol
            failed |= not ok
            print(f"{algo:<10} {degrees:<15} {res[0]['latency_s'] * 1e3:>11.2f} {err:>10.2e}  "
                  f"{'' if ok else 'ABOVE TOLERANCE '}{plan}")
    print(f"\nmax error is max|out - ref| / max|ref| against float64 (tolerance {tol:g}); "
          f"latency is the median of {args.iters} calls, slowest rank. Total {time.monotonic() - t0:.1f}s.")
    return 1 if failed else 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
