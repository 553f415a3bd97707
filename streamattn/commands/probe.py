"""`streamattn probe`: the topology (the link matrix, like `nvidia-smi topo -m`, with bandwidths
and where each number comes from) and the local compute / memory rates; printed, and written as
JSON to --out (atomically, mode 0600).

Three ways to run it:
- inside torchrun / srun (RANK and WORLD_SIZE set, more than one rank): every rank joins the group
  (gloo, or NCCL when CUDA is there) and probes it collectively: host identities give the nodes,
  one intra-node and one inter-node pair are measured; rank 0 prints and writes the file;
- `--nproc N`: starts N local gloo ranks (streamattn.testing.RankPool) that probe together;
- otherwise one process: this host ($STREAMATTN_TOPOLOGY or --topology when given, else a
  single-process probe).
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
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds for the --nproc ranks / the in-group probe's waits")
    p.add_argument("--out", default="streamattn-probe.json",
                   help="write the JSON here (default ./streamattn-probe.json; '-' or '' to skip)")


def _host(measure: bool) -> dict:
    import torch

    from ..calibration import measure_cpu_memory_bandwidth, measure_cpu_rate

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
    from ..testing import RankPool

    from ..testing.pool import RankError

    pool = RankPool(n, timeout=timeout)
    try:
        res = pool.run("streamattn.testing.probe_tasks:probe_topology", timeout=timeout,
                       measure=measure)
    except RankError as e:
        raise RuntimeError(str(e)) from None
    finally:
        pool.close()
    if len(set(res)) != 1:
        raise RuntimeError("ranks returned different topologies")
    from ..topology import Topology

    return Topology.from_json(res[0])


def in_launched_group() -> bool:
    """True inside torchrun / srun-with-env / mpirun-style launches of more than one rank."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def _in_group(measure: bool, timeout: float):
    """Join the launched group (env:// rendezvous), probe it collectively, leave it.
    Returns (topology, rank)."""
    import datetime

    import torch
    import torch.distributed as dist

    from ..topology import probe

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        topo = probe(measure=measure, cache=False, timeout_s=timeout)
        return topo, dist.get_rank()
    finally:
        if created:
            dist.destroy_process_group()


def _write_json(path: str, doc: dict) -> None:
    """Atomic, owner-only (0600): a temp file in the same directory, then rename."""
    from ..files import write_private

    write_private(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", ".streamattn-probe-")


def run(args) -> int:
    from ..topology import probe, resolve_topology

    measure = not args.no_measure
    rank = 0
    try:
        if in_launched_group():
            if args.topology or args.nproc:
                raise ValueError("inside a launched group (WORLD_SIZE > 1) --topology and --nproc "
                                 "do not apply: the group itself is probed")
            topo, rank = _in_group(measure, args.timeout)
            how = (f"probe by the launched group ({topo.world_size} ranks, "
                   f"{'gloo' if not _cuda() else 'nccl'}; nodes from host identities)")
        elif args.nproc and args.nproc > 1:
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
        if rank != 0:
            return 0  # rank 0 reports for the group
        host = _host(measure)
    except (ValueError, RuntimeError) as e:
        print(f"streamattn probe: error: {e}", file=sys.stderr)
        return 2
    doc = {"how": how, "topology": topo.to_dict(), "host": host}
    if args.out and args.out != "-":
        try:
            _write_json(args.out, doc)
        except OSError as e:
            print(f"streamattn probe: error: cannot write {args.out}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(doc, indent=1, sort_keys=True))
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
    if args.out and args.out != "-":
        print(f"JSON: {os.path.abspath(args.out)}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
