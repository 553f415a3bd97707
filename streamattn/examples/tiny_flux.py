"""A tiny randomly initialised Flux transformer, denoised on 1 rank and on N ranks (CPU, no downloads).

    python -m streamattn.examples.tiny_flux --nproc 4
    python -m streamattn.examples.tiny_flux --nproc 4 --model sd3 --steps 4

Builds diffusers' FluxTransformer2DModel with a tiny config (random weights, fp32), runs a
flow-matching Euler loop: on rank 0 alone, then on N local gloo ranks through
`streamattn.integrations.diffusers.parallelize` (exact), then again with `stale_kv=True` (the other
ranks' K/V from the previous step, exchange in the background). Prints, per step, the relative
difference of the parallel runs and the latencies. Needs `pip install "streamattn[diffusers]"`.
CPU latencies are only comparable within one run; with more ranks than cores they mostly measure
contention.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def _fmt_ms(s):
    return f"{s * 1e3:8.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m streamattn.examples.tiny_flux", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="local ranks (default 4)")
    ap.add_argument("--model", choices=["flux", "sd3"], default="flux")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--size", type=int, default=32, help="latent height = width in tokens (flux) "
                    "or pixels (sd3, patch 2); default 32")
    ap.add_argument("--text-len", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--warmup-steps", type=int, default=1, help="exact steps before stale K/V")
    ap.add_argument("--joint-mode", choices=["exact", "stale"], default="exact")
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--repeats", type=int, default=2, help="loops per variant; min time per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--json", action="store_true", help="print the raw results as JSON")
    ap.add_argument("--nodes", type=int, default=0,
                    help="run on an emulated cluster of this many nodes (network namespaces, needs "
                         "root; nproc must be a multiple), each node's uplink shaped to --inter-bw")
    ap.add_argument("--inter-bw", default="1gbit", help="emulated node uplink rate (default 1gbit)")
    args = ap.parse_args(argv)

    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("this example needs diffusers: pip install \"streamattn[diffusers]\"", file=sys.stderr)
        return 2
    from streamattn.testing import RankPool

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.nodes:
            from streamattn.bench.cluster import EmulatedCluster
            from streamattn.bench.launch import emulated_pool

            if args.nproc % args.nodes:
                ap.error("--nproc must be a multiple of --nodes")
            cluster = stack.enter_context(EmulatedCluster(args.nodes, args.nproc // args.nodes,
                                                          inter_bw=args.inter_bw))
            pool = stack.enter_context(emulated_pool(cluster, threads=args.threads, timeout=1800))
        else:
            pool = stack.enter_context(RankPool(args.nproc, threads=args.threads, timeout=1800))
        res = pool.run("streamattn.examples.tasks:denoise_compare", model=args.model,
                       height=args.size, width=args.size, text_len=args.text_len, heads=args.heads,
                       head_dim=args.head_dim, steps=args.steps, warmup_steps=args.warmup_steps,
                       joint_mode=args.joint_mode, repeats=args.repeats, algorithm=args.algorithm)
    r0 = res[0]
    # A step ends when the slowest rank ends it: take the max over ranks.
    t_ex = [max(r["t_exact"][i] for r in res) for i in range(args.steps)]
    t_st = [max(r["t_stale"][i] for r in res) for i in range(args.steps)]
    if args.json:
        print(json.dumps({"args": vars(args), "ranks": res, "t_exact_max": t_ex, "t_stale_max": t_st}))
        return 0
    where = (f", emulated {args.nodes} nodes, {args.inter_bw} uplinks" if args.nodes else ", local")
    tokens = args.size * args.size if args.model == "flux" else (args.size // 2) ** 2
    print(f"tiny {args.model}: {tokens} image + {args.text_len} text tokens, {args.heads} heads x "
          f"{args.head_dim}, fp32, {args.steps} Euler steps; {args.nproc} ranks x {args.threads} "
          f"thread(s){where}; stale K/V after {args.warmup_steps} exact step(s), joint {args.joint_mode}")
    print("step  1-rank ms  exact ms  stale ms   exact vs 1-rank   stale vs exact (model out / latents)")
    for i in range(args.steps):
        print(f"{i:4d}  {_fmt_ms(r0['t_single'][i])}  {_fmt_ms(t_ex[i])}  {_fmt_ms(t_st[i])}   "
              f"{r0['exact_vs_single_v'][i]:.2e}          {r0['stale_vs_exact_v'][i]:.2e} / "
              f"{r0['stale_vs_exact_x'][i]:.2e}")
    w = args.warmup_steps
    if args.steps > w:
        ex, st = sum(t_ex[w:]) / (args.steps - w), sum(t_st[w:]) / (args.steps - w)
        print(f"after warm-up: exact {ex * 1e3:.1f} ms/step, stale {st * 1e3:.1f} ms/step "
              f"({(ex - st) / ex * 100:+.1f}% latency saved); 1 rank {sum(r0['t_single'][w:]) / (args.steps - w) * 1e3:.1f} ms/step")
    print(f"max rel. difference sharded exact vs 1 rank: {max(r0['exact_vs_single_x']):.2e} (latents), "
          f"{max(r0['exact_vs_single_v']):.2e} (model output)")
    print(f"({time.perf_counter() - t0:.1f} s including process start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
