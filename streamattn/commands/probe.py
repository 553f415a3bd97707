"""`streamattn probe`: this machine's topology (the link matrix, like `nvidia-smi topo -m`, with
bandwidths and where each number comes from) and the local compute / memory rates.

Spawns nothing by default: as one process it reports this host ($STREAMATTN_TOPOLOGY or --topology
when given, else a single-process probe). With --nproc N it starts N local gloo ranks
(streamattn.testing.RankPool) that probe together, measuring an intra-node pair's bandwidth.
"""
from __future__ import annotations

import json
import os
import platform
import sys

from .. import config


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--no-measure", action="store_true",
                   help="no timing at all: no CPU kernel rate, no bandwidth test between ranks")
    p.add_argument("--topology", default=None,
                   help="show this .json file / spec / machine instead of probing")
    p.add_argument("--nproc", type=int, default=0, help="spawn N local gloo ranks that probe together")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for --nproc ranks")


def _host(measure: bool) -> dict:
    import torch

    from ..costmodel import measure_cpu_memory_bandwidth, measure_cpu_rate

    d = {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if measure:
        d["cpu_attention_flops"] = measure_cpu_rate(torch.float32)
        d["cpu_attention_flops_method"] = ("kernels.attention_with_lse float32 [1,4,512,64], best of 5 "
                                           "after 2 warm-ups, this process's torch threads")
        d["cpu_memory_Bps"] = measure_cpu_memory_bandwidth()
        d["cpu_memory_method"] = "32 MiB float32 copy, read+write bytes, best of 5"
    return d


def _spawned(n: int, measure: bool, timeout: float):
    from ..testing import RankPool, cases

    task = "probe_topology"
    if not hasattr(cases, task):
        raise RuntimeError(f"--nproc needs the task streamattn.testing.cases:{task}, which this "
                           "version does not have")
    pool = RankPool(n, timeout=timeout)
    try:
        res = pool.run(f"streamattn.testing.cases:{task}", timeout=timeout, measure=measure)
    finally:
        pool.close()
    if len(set(res)) != 1:
        raise RuntimeError("ranks returned different topologies")
    from ..topology import Topology

    return Topology.from_json(res[0])


def run(args) -> int:
    from ..topology import probe, resolve_topology

    measure = not args.no_measure
    try:
        if args.nproc and args.nproc > 1:
            if args.topology:
                raise ValueError("--topology and --nproc exclude each other")
            topo = _spawned(args.nproc, measure, args.timeout)
            how = f"probe by {args.nproc} spawned gloo ranks"
        elif args.topology or config.topology():
            topo = resolve_topology(topology=args.topology)
            how = "declared (--topology / $STREAMATTN_TOPOLOGY)"
        else:
            topo = probe(measure=measure, cache=False)
            how = "single-process probe (one rank: no links to measure; --nproc N for more)"
        host = _host(measure)
    except (ValueError, RuntimeError) as e:
        print(f"streamattn probe: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"how": how, "topology": topo.to_dict(), "host": host}, indent=1, sort_keys=True))
        return 0
    print(topo)
    print(f"How: {how}")
    line = (f"Host {host['hostname']}: {host['cpus']} CPUs, torch {host['torch']} with "
            f"{host['torch_threads']} threads, {host['cuda_devices']} CUDA device(s)")
    print(line)
    if measure:
        print(f"Local CPU attention kernel: {host['cpu_attention_flops'] / 1e9:.3g} GFLOP/s "
              f"(measured: {host['cpu_attention_flops_method']})")
        print(f"Local memory copy: {host['cpu_memory_Bps'] / 1e9:.3g} GB/s (measured: {host['cpu_memory_method']})")
    return 0
