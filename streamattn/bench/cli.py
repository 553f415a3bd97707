"""`streamattn bench`: benchmark sequence-parallel attention algorithms side by side.

Launch modes (exactly one applies):
  * inside an existing group: `torchrun --nproc-per-node 4 -m streamattn.bench ...` (RANK,
    WORLD_SIZE, MASTER_ADDR set): every rank runs the sweep, rank 0 reports;
  * self-spawned local ranks: `streamattn bench --nproc 4 ...` (the default, 4 ranks);
  * emulated cluster: `streamattn bench --emulate 2x2 --inter-bw 200mbit [--intra-bw 10gbit]`:
    one network namespace per node, shaped links (bench/cluster.py), the ranks of a node inside
    its namespace; torn down on success, error and Ctrl-C. Without root or netns it prints the
    reason and exits 2: it never runs unshaped instead.

Outputs (in --out, default ./bench_out): bench.json (environment + one record per run), bench.png
(latency against sequence length per configuration) and the table on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from .presets import PRESETS

ALL_ALGOS = ["auto", "ulysses", "ring", "usp", "torus", "yunchang"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cluster import CONGESTION_CONTROL_HELP

    where = p.add_argument_group("where to run (default: --nproc 4, or the torchrun group)")
    where.add_argument("--nproc", type=int, default=None, help="spawn this many local ranks")
    where.add_argument("--emulate", metavar="NxR", default=None,
                       help="emulated cluster of N nodes x R ranks (root + netns), e.g. 2x2, 2x4")
    where.add_argument("--inter-bw", default="200mbit", help="emulated inter-node rate (default 200mbit)")
    where.add_argument("--intra-bw", default=None, help="emulated intra-node (lo) rate (default unshaped)")
    where.add_argument("--mtu", type=int, default=None,
                       help="MTU of the emulated nodes' links (default 9000, jumbo frames as on cluster "
                            "fabrics; 1500 for a plain Ethernet LAN: 4.4%% of every byte is headers)")
    where.add_argument("--congestion-control", default=None, metavar="NAME",
                       help=CONGESTION_CONTROL_HELP)
    where.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    what = p.add_argument_group("what to run")
    what.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="DiT shape scaled to CPU (default flux-1024-cpu unless --seq is given)")
    what.add_argument("--seq", default=None, help="image-token lengths, comma separated (overrides the preset)")
    what.add_argument("--heads", default=None, help="head counts, comma separated")
    what.add_argument("--head-dim", type=int, default=None)
    what.add_argument("--joint-len", type=int, default=None, help="text tokens (replicated)")
    what.add_argument("--batch", type=int, default=None)
    what.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    what.add_argument("--algorithms", default=",".join(ALL_ALGOS),
                      help=f"comma separated subset of {','.join(ALL_ALGOS)} (default all)")
    what.add_argument("--degrees", default=None,
                      help="keep only these ulysses x ring factorizations, e.g. 2x2,4x1 (a torus "
                           "u x t x r is kept when u x r is listed)")
    what.add_argument("--iters", type=int, default=5, help="timed calls per configuration (default 5)")
    what.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                      help="more timed calls for cheap shapes: rounds until the slowest configuration "
                           "has had this many seconds of timed calls (at least --iters, at most "
                           "--max-iters; default: --iters only, 1 s in --matrix)")
    what.add_argument("--max-iters", type=int, default=40, help="cap for --min-time (default 40)")
    what.add_argument("--backward", action="store_true",
                      help="time forward+backward (training) instead, local ranks only")
    what.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1, min 1)")
    what.add_argument("--no-overlap", action="store_true", help="skip the compute-/comm-only runs")
    what.add_argument("--overlap-iters", type=int, default=3)
    what.add_argument("--no-check", action="store_true", help="skip the float64 error check")
    what.add_argument("--yunchang-native", action="store_true",
                      help="also check yunchang with its own CPU kernel (shows its zero-LSE error)")
    what.add_argument("--yunchang-text-local", action="store_true",
                      help="time yunchang without broadcasting the text output to every rank "
                           "(by default it is, so that it delivers what streamattn delivers)")
    what.add_argument("--force-auto", default=None, choices=["ulysses", "ring"],
                      help="negative control: add an 'auto' run whose planner is forced to this plan")
    what.add_argument("--trace-iters", type=int, default=3,
                      help="extra calls per configuration under the span recorder (breakdown in the "
                           "JSON: the median one; default 3, 0 = none)")
    what.add_argument("--no-limit", action="store_true",
                      help="skip timing the limit (whole attention on all cores in one process)")
    what.add_argument("--autotune", type=int, default=None, metavar="N",
                      help="also run auto with STREAMATTN_AUTOTUNE=N: 'auto tuned' (N > 0: the "
                           "planner's top candidates measured N calls each in the warm-up, the "
                           "fastest kept) or 'auto predicted' (0: the planner's pick, unmeasured)")
    what.add_argument("--comm-dtype", default=None, choices=["bfloat16"],
                      help="also run auto with this reduced-precision wire format (error vs float64 "
                           "reported; exact float32 stays the default)")
    out = p.add_argument_group("output")
    out.add_argument("--breakdown", action="store_true",
                     help="print where each configuration's time goes (per rank: kernel, merges, "
                          "packing, waits per peer intra/inter, idle) and write a timeline PNG of "
                          "auto's call per shape")
    out.add_argument("--out", default="bench_out", help="directory for bench.json and bench.png")
    out.add_argument("--no-plot", action="store_true")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--timeout", type=float, default=600.0, help="seconds per task before giving up")
    from .matrix import add_arguments as add_matrix

    add_matrix(p)


def _ints(text: Optional[str]) -> Optional[List[int]]:
    return None if text is None else [int(x) for x in str(text).split(",") if x.strip()]


def build_shapes(args) -> tuple:
    """(shapes, preset or None)."""
    preset = PRESETS[args.preset] if args.preset else (None if args.seq else PRESETS["flux-1024-cpu"])
    seqs = _ints(args.seq) or (preset.seqs if preset else None)
    heads = _ints(args.heads) or [preset.heads if preset else 24]
    hd = args.head_dim or (preset.head_dim if preset else 32)
    jl = args.joint_len if args.joint_len is not None else (preset.joint_len if preset else 0)
    b = args.batch or (preset.batch if preset else 1)
    shapes = [{"seq": s, "heads": h, "head_dim": hd, "joint_len": jl, "batch": b, "dtype": args.dtype}
              for h in heads for s in seqs]
    return shapes, preset


def _in_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run(args) -> int:
    from .runner import SweepSpec

    if getattr(args, "matrix", False):
        from .matrix import run_matrix

        return run_matrix(args)
    if args.emulate and args.nproc:
        print("streamattn bench: --emulate and --nproc are exclusive", file=sys.stderr)
        return 2
    try:
        shapes, preset = build_shapes(args)
    except ValueError as exc:
        print(f"streamattn bench: {exc}", file=sys.stderr)
        return 2
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    bad = [a for a in algos if a not in ALL_ALGOS]
    if bad:
        print(f"streamattn bench: unknown algorithm(s) {bad}; choose from {ALL_ALGOS}", file=sys.stderr)
        return 2
    if getattr(args, "backward", False):
        from .backward import run_backward

        return run_backward(args, shapes, algos)
    degrees = None
    if args.degrees:
        degrees = [tuple(int(x) for x in d.lower().split("x")) for d in args.degrees.split(",")]
    spec = SweepSpec(shapes=shapes, algorithms=[a for a in algos if a != "yunchang"],
                     degrees=degrees, iters=max(1, args.iters), warmup=max(1, args.warmup),
                     min_time=max(0.0, args.min_time or 0.0), max_iters=max(1, args.iters, args.max_iters),
                     overlap=not args.no_overlap, overlap_iters=max(1, args.overlap_iters),
                     check=not args.no_check, yunchang="yunchang" in algos,
                     yunchang_native=args.yunchang_native, force_auto=args.force_auto,
                     yunchang_text_local=args.yunchang_text_local,
                     trace_iters=max(0, args.trace_iters), limit=not args.no_limit,
                     comm_dtype=args.comm_dtype,
                     autotune=None if args.autotune is None else max(0, args.autotune))
    if args.emulate:
        return _run_emulated(args, spec, preset)
    if args.nproc is None and _in_torchrun():
        return _run_in_group(args, spec, preset)
    return _run_local(args, spec, preset)


# ─────────────────────────────────────────────────────────────────────────── modes


def _check_yunchang(ex, spec, say) -> None:
    if not spec.yunchang:
        return
    res = ex.run("yunchang_available")[0]
    if not res["ok"]:
        say(f"note: yunchang baseline skipped: not importable ({res['reason']}); "
            "`pip install --no-deps yunchang` adds it")
        spec.yunchang = False
    else:
        say(f"baseline: yunchang {res['version']} USP (its CPU kernel replaced through its "
            "attn_processor hook by one returning the true LSE)")
        from .runner import yunchang_fits

        for shape in spec.shapes:
            if not yunchang_fits(shape, ex.world):
                say(f"note: no yunchang rows for seq {shape['seq']} + text "
                    f"{shape.get('joint_len', 0)}: yunchang splits the whole sequence in equal "
                    f"shards, which {ex.world} ranks cannot")


def _finish(args, ex, spec, preset, env, say) -> int:
    from .report import format_breakdown, format_limits, format_table, write_json, write_plot, write_timeline
    from .runner import run_sweep

    _check_yunchang(ex, spec, say)
    ranks = ex.run("bench_env")  # collective: every rank readied before the first timing
    env["cpu_malloc"] = sorted({r["cpu_malloc"] for r in ranks})
    t0 = time.monotonic()
    records = run_sweep(ex, spec, inter_bw=env.get("inter_bw_bit_s"),
                        progress=not args.no_progress)
    env["sweep_seconds"] = time.monotonic() - t0
    env["preset"] = preset.as_dict() if preset else None
    env["iters"], env["warmup"] = spec.iters, spec.warmup
    hook = ex.run("trace_hook_cost")[0]["t"] if spec.trace_iters else None  # collective
    env["trace_hook_cost_s"] = hook
    if not ex.is_reporter:
        return 0
    print(format_table(records))
    print(format_limits(records))
    if args.breakdown:
        print(format_breakdown(records, hook))
    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench.json")
    write_json(jpath, env, records)
    print(f"\nwrote {jpath}")
    if not args.no_plot:
        ppath = os.path.join(args.out, "bench.png")
        why = write_plot(ppath, env, records)
        print(f"note: {why}" if why else f"wrote {ppath}")
        if args.breakdown:
            for r in records:
                if r["config"] == "auto" and r.get("breakdown"):
                    tpath = os.path.join(args.out, f"timeline-auto-{r['shape']['seq']}.png")
                    why = write_timeline(tpath, r)
                    print(f"note: {why}" if why else f"wrote {tpath}")
    bad = [r for r in records if r.get("err") is not None and r["err"] > _tol(r)
           and not r["cfg"].get("native")]
    if bad:
        print("ERROR above tolerance: " + ", ".join(f"{r['config']} {r['err']:.2e}" for r in bad))
        return 1
    return 0


def _tol(rec) -> float:
    if rec["cfg"].get("comm_dtype"):  # the opt-in reduced-precision wire
        return 3e-2
    return 1e-4 if rec["shape"].get("dtype", "float32") == "float32" else 3e-2


def _describe(preset, spec, where) -> str:
    s = spec.shapes[0]
    head = f"streamattn bench on {where}"
    if preset:
        head += f"\npreset {preset.name}: {preset.model} ({preset.full}); scaled: {preset.scaling}"
    head += (f"\nshapes: seq {sorted({x['seq'] for x in spec.shapes})} + text {s['joint_len']}, "
             f"heads {sorted({x['heads'] for x in spec.shapes})} x {s['head_dim']}, batch {s['batch']}, "
             f"{s['dtype']}; {spec.warmup} warm-up + {spec.iters} timed calls per configuration"
             + (f" (more, up to {spec.max_iters}, until the slowest has had {spec.min_time:g} s)"
                if spec.min_time > 0 else ""))
    return head


def _run_local(args, spec, preset) -> int:
    from ..testing import RankError, RankPool
    from .report import environment
    from .runner import PoolExecutor

    n = args.nproc or 4
    print(_describe(preset, spec, f"{n} local ranks (one node, gloo over loopback)"), flush=True)
    env = environment("local", world=n, nodes=1, ranks_per_node=n)
    try:
        with RankPool(n, threads=args.threads, timeout=args.timeout) as pool:
            ex = PoolExecutor(pool, ranks_per_node=n, nodes=1)
            return _finish(args, ex, spec, preset, env, print)
    except RankError as exc:
        print(f"streamattn bench: a rank failed: {exc}", file=sys.stderr)
        return 1


def _run_emulated(args, spec, preset) -> int:
    from ..testing import RankError
    from .cluster import (ClusterUnavailable, EmulatedCluster, check_mtu, measure_throughput,
                          parse_congestion_control, parse_rate_bits)
    from .launch import emulated_pool
    from .report import environment
    from .runner import PoolExecutor

    try:
        nodes, rpn = (int(x) for x in args.emulate.lower().split("x"))
        inter = parse_rate_bits(args.inter_bw)
        intra = parse_rate_bits(args.intra_bw) if args.intra_bw else None
        mtu = check_mtu(args.mtu)  # before any namespace exists: a bad value is exit 2, not a traceback
        cc = parse_congestion_control(args.congestion_control)
    except ValueError as exc:
        print(f"streamattn bench: bad --emulate/--inter-bw/--intra-bw/--mtu/--congestion-control: {exc}",
              file=sys.stderr)
        return 2
    world = nodes * rpn
    try:
        with EmulatedCluster(nodes, rpn, inter_bw=inter, intra_bw=intra, mtu=mtu,
                             congestion_control=cc) as cluster:
            where = (f"an emulated {nodes}x{rpn} cluster ({cluster.subnet}): inter-node "
                     f"{inter / 1e6:g} Mbit/s per uplink, intra-node "
                     f"{'unshaped' if intra is None else f'{intra / 1e6:g} Mbit/s'}, MTU {mtu}, "
                     f"TCP {cluster.tcp_in_use}")
            print(_describe(preset, spec, where), flush=True)
            measured = None
            if nodes > 1:
                measured = measure_throughput(cluster, 0, 1, seconds=1.0)
                print(f"measured node0->node1 TCP goodput: {measured / 1e6:.0f} Mbit/s "
                      f"({100 * measured / inter:.0f}% of the configured rate)", flush=True)
            env = environment("emulated", world=world, nodes=nodes, ranks_per_node=rpn,
                              inter_bw=inter, intra_bw=intra, measured_inter_bit_s=measured,
                              extra={"mtu": cluster.mtu,
                                     "tcp_congestion_control": cluster.tcp_in_use})

            with emulated_pool(cluster, threads=args.threads, timeout=args.timeout) as pool:
                ex = PoolExecutor(pool, ranks_per_node=rpn, nodes=nodes)
                return _finish(args, ex, spec, preset, env, print)
    except ClusterUnavailable as exc:
        print(f"streamattn bench: emulated cluster unavailable: {exc.reason}\n"
              "(refusing to run unshaped; use --nproc N for local ranks)", file=sys.stderr)
        return 2
    except RankError as exc:
        print(f"streamattn bench: a rank failed: {exc}", file=sys.stderr)
        return 1


def _run_in_group(args, spec, preset) -> int:
    import datetime

    import torch
    import torch.distributed as dist

    from .report import environment
    from .runner import GroupExecutor

    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    world = dist.get_world_size()
    rpn = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(1, world // rpn)
    ex = GroupExecutor(ranks_per_node=rpn, nodes=nodes)
    # The nodes and the inter-node rate the limit needs come from the topology streamattn resolves
    # for the group (declared or probed), not from torchrun's LOCAL_WORLD_SIZE alone.
    topo = ex.run("group_topology")[0]
    if topo["nodes"] * topo["ranks_per_node"] == world:
        nodes, rpn = topo["nodes"], topo["ranks_per_node"]
        ex = GroupExecutor(ranks_per_node=rpn, nodes=nodes)
    say = print if ex.is_reporter else (lambda *a, **k: None)
    where = f"an existing group of {world} ranks ({nodes} node(s) x {rpn})"
    if topo["inter_bit_s"]:
        where += f", inter-node link {topo['inter_bit_s'] / 1e6:.0f} Mbit/s ({topo['source']})"
    say(_describe(preset, spec, where))
    env = environment("torchrun", world=world, nodes=nodes, ranks_per_node=rpn)
    if topo["inter_bit_s"]:
        env["inter_bw_bit_s"] = topo["inter_bit_s"]
        env["inter_bw_source"] = topo["source"]
    args.no_progress = args.no_progress or not ex.is_reporter
    try:
        return _finish(args, ex, spec, preset, env, say)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m streamattn.bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))
