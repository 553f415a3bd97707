"""Back-to-back calls of one plan on a torchrun group: the steady state of a model's attention layers.

``streamattn bench`` times each configuration's calls interleaved with the others' and starts every
call together after a pause; an engine calls attention layer after layer. This runs N calls in a
row on the group it is launched on and prints, on rank 0, the slowest rank's mean time per call,
the CPU time of one call summed over the ranks, and per node the TCP segments retransmitted
(from the node's /proc/net/snmp: its network namespace's, on an emulated cluster)::

    sudo streamattn launch --emulate 2x4 --inter-bw 1gbit -- -m streamattn.bench.back_to_back \\
        --seq 512 --joint-len 256 --calls 300
    torchrun --nproc-per-node 4 -m streamattn.bench.back_to_back --algorithm usp --ulysses 2 --ring 2

Inputs are random, [1, S/P, H, D] per rank (the first S % P ranks one token more), text tokens
replicated; nothing is checked against a reference (see ``streamattn bench`` for that).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

from .. import attention
from ..api import last_plan
from ..sharding import split_lengths


def _tcp_counters():
    """(RetransSegs, OutSegs) of this network namespace, or (0, 0) where /proc/net/snmp is absent."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        names, values = rows[0], rows[1]
        return int(values[names.index("RetransSegs")]), int(values[names.index("OutSegs")])
    except (OSError, IndexError, ValueError):
        return 0, 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512, help="image tokens over the group")
    ap.add_argument("--joint-len", type=int, default=256, help="text tokens (replicated)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--calls", type=int, default=300, help="timed calls (after --warmup)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--algorithm", default=None, help="force one (default: the planner's choice)")
    ap.add_argument("--ulysses", type=int, default=None, help="ulysses_degree of a forced plan")
    ap.add_argument("--ring", type=int, default=None, help="ring_degree of a forced plan")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lens = split_lengths(args.seq, world)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, lens[rank], args.heads, args.head_dim, generator=g) for _ in range(3))
    kw = {}
    if args.joint_len:
        shared = torch.Generator().manual_seed(12345)  # the same text tokens on every rank
        jq, jk, jv = (torch.randn(1, args.joint_len, args.heads, args.head_dim, generator=shared)
                      for _ in range(3))
        kw.update(joint_q=jq, joint_k=jk, joint_v=jv)
    if args.algorithm:
        kw.update(algorithm=args.algorithm, ulysses_degree=args.ulysses, ring_degree=args.ring)
    for _ in range(args.warmup):
        attention(q, k, v, None, **kw)
    dist.barrier()
    tcp0, cpu0, t0 = _tcp_counters(), time.process_time(), time.perf_counter()
    for _ in range(args.calls):
        attention(q, k, v, None, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tcp1 = _tcp_counters()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    local0 = int(os.environ.get("LOCAL_RANK", "0")) == 0  # one rank per node reads its counters
    mine = torch.tensor([wall / args.calls, cpu / args.calls, tcp1[0] - tcp0[0], tcp1[1] - tcp0[1],
                         float(local0), ru.ru_nvcsw], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        m = torch.stack(every)
        plan = last_plan(None)[1]
        nodes = m[m[:, 4] == 1]
        print(f"{world} ranks, seq {args.seq} + text {args.joint_len}, {args.heads}x{args.head_dim}, "
              f"{args.calls} calls{'' if plan is None else f', plan {plan}'}")
        print(f"back-to-back: {m[:, 0].max() * 1e3:.2f} ms per call (slowest rank's mean); "
              f"CPU {m[:, 1].sum() * 1e3:.1f} ms per call summed over the ranks "
              f"({m[:, 1].mean() * 1e3:.2f} per rank)")
        print("TCP retransmitted / sent segments per node over the calls: "
              + ", ".join(f"{int(r[2])}/{int(r[3])}" for r in nodes))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
