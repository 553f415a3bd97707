"""`streamattn plan`: the plan the planner picks for a shape on a topology, with --explain / --json.

    streamattn plan --seq 4096 --heads 24 --head-dim 128 --joint-len 512 --topology h100x8-2node --explain
"""
from __future__ import annotations

import json
import sys

from .. import config
from ..planner import DEFAULT_TOPOLOGY, plan_for

DTYPE_CHOICES = ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32", "fp64", "float64")


def add_arguments(p) -> None:
    p.add_argument("--seq", type=int, required=True, help="image/sequence tokens in total (split over the ranks)")
    p.add_argument("--heads", type=int, required=True, help="query heads")
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA/MQA; default: --heads)")
    p.add_argument("--joint-len", type=int, default=0, help="replicated text tokens (MMDiT joint attention)")
    p.add_argument("--joint-strategy", choices=("front", "rear"), default="front")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES)
    p.add_argument("--topology", default=None,
                   help="a .json file, an emulation spec (2x4:inter=1Gbit/s) or a shipped machine "
                        f"(default: $STREAMATTN_TOPOLOGY, else {DEFAULT_TOPOLOGY})")
    p.add_argument("--world-size", type=int, default=None, help="plan on the first N ranks of the topology")
    p.add_argument("--seq-lens", default=None, help="comma-separated tokens per rank (uneven shards)")
    p.add_argument("--algorithm", default="auto", choices=("auto", "ulysses", "ring", "usp", "torus"),
                   help="restrict the plan (torus: --ulysses-degree u and --ring-degree r, t = P/(u*r), "
                        "both optional)")
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--ring-degree", type=int, default=None)
    p.add_argument("--compute-rate", type=float, default=None, help="TFLOP/s per rank (default: the topology's)")
    p.add_argument("--memory-bandwidth", type=float, default=None, help="GB/s of local memory per rank")
    p.add_argument("--explain", action="store_true", help="every candidate, the steps, and why")
    p.add_argument("--json", action="store_true", help="the plan as JSON (with candidates if --explain)")


def run(args) -> int:
    topology = args.topology or config.topology() or DEFAULT_TOPOLOGY
    try:
        seq_lens = None
        if args.seq_lens:
            seq_lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
        plan = plan_for(
            args.seq, args.heads, args.head_dim, batch=args.batch, kv_heads=args.kv_heads,
            joint_len=args.joint_len, joint_strategy=args.joint_strategy, dtype=args.dtype,
            causal=args.causal, topology=topology, world_size=args.world_size, seq_lens=seq_lens,
            algorithm=args.algorithm, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
            compute_rate=args.compute_rate * 1e12 if args.compute_rate else None,
            memory_bandwidth=args.memory_bandwidth * 1e9 if args.memory_bandwidth else None,
        )
    except ValueError as e:
        print(f"streamattn plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json.loads(plan.to_json(candidates=args.explain)), indent=1, sort_keys=True))
    elif args.explain:
        print(plan.explain())
    else:
        print(plan)
    return 0
