"""The one script to run on the first GPU box: is streamattn correct (and how fast) on real GPUs?

    python bench/gpu_check.py --json gpu_check.json   # every GPU of the box (spawns one rank per GPU)

It prints the environment first (GPUs, driver, CUDA, torch, NCCL, nvshmem4py, flash-attn, triton
and which NVSHMEM wheel fits: cu12 or cu13), then one row per check AS SOON AS IT IS MEASURED, and
rewrites the JSON (atomically) after every row: a run killed or hung half-way keeps every row so far.

Single GPU (rank 0):
  * every local kernel backend of streamattn.kernels that can run here (flash-attn if installed,
    torch-flash, torch-efficient, triton, math; cpu-flash is CPU-only) forced through
    STREAMATTN_KERNEL, fp16 / bf16 / fp32 where the backend takes that dtype, against a float64
    reference of the LSE contract: natural-log LSE in float32, GQA, causal masks with global
    offsets, odd key lengths, rows that see no key (out exactly 0, lse exactly -inf);
  * the Triton merge and pack/unpack kernels against their torch references.
Several GPUs (one rank per GPU; NCCL refuses two ranks on one GPU, so a 1-GPU box runs the checks
above only):
  * every algorithm (ulysses, ring, usp, torus, auto) on each transport (torch = NCCL, nvshmem,
    nvshmem-device = the csrc/ kernels) against the float64 reference of the whole sequence
    (uneven shards, GQA, joint text tokens, causal), max|out - ref| / max|ref| over every rank;
  * a short bench: median latency (max over ranks per call) of every algorithm on each transport.
Every case is bounded: peer waits end after --case-timeout / 2 (STREAMATTN_TIMEOUT_S, naming the
peer) and a watchdog ends the run after --case-timeout (row TIMEOUT; rows so far are kept). A
transport is not used again after its first error (later rows SKIP): after a failed exchange its
ranks' NCCL order or one-sided sequence numbers no longer agree. If NCCL itself (torch) failed, the
remaining distributed checks are skipped. At the end heaps are closed, NVSHMEM is finalised and the
process group destroyed. Exit 1 if anything FAILed or ERRORed (N/A: the library refused the
configuration with a ValueError, e.g. heads not divisible; shown with its reason, not a failure).
With no GPU visible it prints a message and exits 0: it never runs in CPU CI.

--cpu-selftest runs the same code paths on CPU (cpu-flash / math kernels, gloo, the torch, shm,
inorder and shm-device transports) so the script itself is tested without a GPU; it proves nothing
about GPUs. Options: --transports ... --algorithms ... --no-bench --bench-seq 4096 --json out.json

The package has one module per kind of row: env (env), kernels (kernel), triton_helpers
(triton), local (local), distributed (dist; also what the other multi-rank steps share: the
all-gather, the failed transports, the loop over transports), latency (bench), lifecycle (setup,
final); results keeps the rows and the watchdog, cases what is checked and how closely. main()
here parses the options and runs them; `python -m streamattn.bench.gpu_check` (its __main__.py)
and bench/gpu_check.py call it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys

from .cases import ALGORITHMS, CPU_BACKENDS, GPU_BACKENDS, KERNEL_CASES
from .distributed import Broken, check_distributed, gather
from .env import check_environment, environment, print_environment
from .kernels import check_kernels
from .latency import bench
from .lifecycle import finalise, prebuild_extension
from .local import check_single_rank
from .results import Results, Watchdog
from .triton_helpers import check_triton_helpers

__all__ = ["ALGORITHMS", "KERNEL_CASES", "Broken", "Results", "Watchdog", "bench", "check_distributed",
           "check_environment", "check_kernels", "check_single_rank", "check_triton_helpers",
           "environment", "finalise", "main", "parse_args", "prebuild_extension", "print_environment"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m streamattn.bench.gpu_check",
                                description=next(ln for ln in __doc__.splitlines() if ln.strip()))
    p.add_argument("--cpu-selftest", action="store_true",
                   help="run the script's code paths on CPU (tests the script, not GPUs)")
    p.add_argument("--transports", default=None,
                   help="default: torch,nvshmem,nvshmem-device (selftest: torch,shm,inorder,shm-device)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--dtypes", default=None, help="kernel dtypes (default float16,bfloat16,float32)")
    p.add_argument("--dist-dtype", default=None, help="default bfloat16 (selftest float32)")
    p.add_argument("--backends", default=None, help="kernel backends (default: all that apply)")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--no-spawn", action="store_true",
                   help="do not start one rank per GPU by itself (torchrun users: implied)")
    p.add_argument("--case-timeout", type=float, default=120.0,
                   help="seconds one case may take; peer waits end after half of it (default 120)")
    p.add_argument("--bench-seq", type=int, default=4096)
    p.add_argument("--bench-joint", type=int, default=512)
    p.add_argument("--bench-heads", type=int, default=24)
    p.add_argument("--bench-dim", type=int, default=128)
    p.add_argument("--bench-dtype", default="bfloat16")
    p.add_argument("--bench-iters", type=int, default=10)
    p.add_argument("--bench-warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="rows as JSON, rewritten after every row (rank 0)")
    return p.parse_args(argv)


def _spawn(argv, ngpu):
    """Re-run this command as one rank per GPU (torch.distributed.run -m this package, argument list,
    no shell)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ngpu}",
           "--log-dir", os.devnull,  # else a /tmp/torchelastic_* directory per run, never removed
           "-m", "streamattn.bench.gpu_check", "--no-spawn", *argv]
    print(f"gpu_check: {ngpu} GPUs visible: running one rank per GPU: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd).returncode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch

    selftest = args.cpu_selftest
    if not selftest and not torch.cuda.is_available():
        print("gpu_check: SKIP - no CUDA GPU visible (torch.cuda.is_available() is False); "
              "nothing checked. Run it on a GPU box.")
        return 0
    if (not selftest and "WORLD_SIZE" not in os.environ and not args.no_spawn
            and torch.cuda.device_count() > 1):
        return _spawn(argv, torch.cuda.device_count())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if selftest:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Peer waits end (naming the peer) well before the watchdog ends the whole run.
    os.environ["STREAMATTN_TIMEOUT_S"] = str(max(5.0, args.case_timeout / 2))
    res = Results(json_path=args.json if rank == 0 else None, echo=rank == 0)
    watch = Watchdog(res, args.case_timeout)
    if rank == 0:
        res.env = environment(device, world)
        print_environment(res.env)
        res.env["mode"] = "CPU self-test" if selftest else "GPU"
        check_environment(res, res.env, device)
        if not args.no_kernels:
            dtypes = (args.dtypes or ("float32" if selftest else "float16,bfloat16,float32")).split(",")
            backends = (args.backends or ",".join(CPU_BACKENDS if selftest else GPU_BACKENDS)).split(",")
            check_kernels(res, device, dtypes, backends, watch)
            if not selftest:
                check_triton_helpers(res, device, watch)
        check_single_rank(res, device, watch)
    code = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo" if selftest else "nccl",
                                timeout=datetime.timedelta(seconds=max(60.0, 2 * args.case_timeout)))
        gloo = dist.new_group(backend="gloo") if not selftest else dist.group.WORLD
        transports = (args.transports or ("torch,shm,inorder,shm-device" if selftest
                                          else "torch,nvshmem,nvshmem-device")).split(",")
        algorithms = args.algorithms.split(",")
        dtype = args.dist_dtype or ("float32" if selftest else "bfloat16")
        broken = Broken()
        if "nvshmem-device" in transports:
            prebuild_extension(res, rank, gloo, broken)
        check_distributed(res, rank, world, device, transports, algorithms, dtype, gloo, broken, watch)
        if not args.no_bench:
            bench(res, rank, world, device, transports, algorithms, args, gloo, broken, watch)
        with watch("final", "close heaps, finalise NVSHMEM"):
            failed = gather(len(res.failed), gloo)
            finalise(res, rank, gloo)
        code = 1 if any(failed) or res.failed else 0
    else:
        code = 1 if res.failed else 0
        if rank == 0:
            res.add("dist", "multi-rank algorithms", "N/A",
                    "one process: the box has one GPU (NCCL needs one GPU per rank) or --no-spawn "
                    "without torchrun")
    if rank == 0:
        res.code = code
        res.save()
        print(f"gpu_check: {'FAIL' if code else 'PASS'} - {res.summary()}", flush=True)
    return code
