"""`streamattn bench --matrix`: the issue-12 acceptance matrix in one command.

Runs, one after the other, `streamattn bench --emulate CELL --inter-bw BW` for every cell
(default 2x2 and 2x4 at 200 Mbit/s and 1 Gbit/s) over two shapes: the flux-1024-cpu preset and a
text-free shape (--seq 4096,8192 --heads 8 --head-dim 64 --joint-len 0), every configuration
(auto, each fixed plan, yunchang's factorizations, auto with the bfloat16 wire), the limit, the
prediction and the breakdown, each cell in ONE run with configurations interleaved call by call.
It then writes matrix.json and matrix.md (in --out): per cell and sequence length, auto, the best
fixed plan, yunchang's best, the limit and what bounds it, the prediction, the ratios, and the
acceptance checks; plus each run's own bench.json / PNGs in --out/<cell>-<shape>/.

Idle machine: before every run the CPU time used by anything else is sampled for 3 s from
/proc/stat (the previous run has exited by then, so it does not count, unlike the 1-minute load
average, which still carries it for minutes); a run that starts with more than `--max-busy`
(default 10%) of the machine's CPU busy is flagged "LOADED" in the table (rerun it: numbers from a
loaded 2-core machine are not valid). The load average before and after is recorded as well.

Needs root and network namespaces (the emulated cluster); yunchang (`pip install
"streamattn[bench]"`) for the baseline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List

from .perf import paired
from .report import plan_label

CELLS = ["2x2:200mbit", "2x2:1gbit", "2x4:200mbit", "2x4:1gbit"]
SHAPES = {
    "flux": ["--preset", "flux-1024-cpu"],
    "textfree": ["--seq", "4096,8192", "--heads", "8", "--head-dim", "64", "--joint-len", "0"],
}
FIXED = ("ulysses", "ring", "usp", "torus")


# seconds of timed calls each configuration gets at least (runner.timed_rounds): the cheap flux
# cells (30-90 ms a call) otherwise rest on 5 calls, whose median moved +-10% between runs
MIN_TIME = 1.0


def add_arguments(p) -> None:
    m = p.add_argument_group("acceptance matrix (--matrix)")
    m.add_argument("--matrix", action="store_true",
                   help="run the whole acceptance matrix (emulated 2x2/2x4 at 200mbit/1gbit x "
                        "flux-1024-cpu and a text-free shape) and write matrix.md / matrix.json")
    m.add_argument("--matrix-cells", default=",".join(CELLS),
                   help=f"NODESxRANKS:RATE cells (default {','.join(CELLS)})")
    m.add_argument("--matrix-shapes", default=",".join(SHAPES),
                   help=f"subset of {','.join(SHAPES)} (default both)")
    m.add_argument("--matrix-autotune", type=int, default=0, metavar="N",
                   help="STREAMATTN_AUTOTUNE of the second auto configuration: 0 (default) 'auto "
                        "predicted', the planner's pick unmeasured; N > 0 'auto tuned'")
    m.add_argument("--max-busy", type=float, default=0.10,
                   help="flag runs that start while other processes use more than this fraction of "
                        "the machine's CPU (sampled for 3 s)")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cpu_times() -> tuple:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return sum(vals), vals[3] + (vals[4] if len(vals) > 4 else 0)  # total, idle + iowait


def busy_fraction(seconds: float = 3.0) -> float:
    """Fraction of all cores' time that other processes used over the next `seconds` (NaN when
    /proc/stat is unreadable)."""
    try:
        t0, i0 = _cpu_times()
        time.sleep(seconds)
        t1, i1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def run_matrix(args) -> int:
    from .cluster import parse_congestion_control

    try:  # once, before 16 minutes of cells that would each refuse it
        parse_congestion_control(args.congestion_control)
    except ValueError as exc:
        print(f"streamattn bench --matrix: {exc}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cells = [c.strip() for c in args.matrix_cells.split(",") if c.strip()]
    shapes = [s.strip() for s in args.matrix_shapes.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        print(f"streamattn bench --matrix: unknown shape(s) {bad}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2
    runs = []
    t_all = time.monotonic()
    for cell in cells:
        topo, _, bw = cell.partition(":")
        for shape in shapes:
            sub = os.path.join(out, f"{topo}-{bw}-{shape}")
            cmd = [sys.executable, "-m", "streamattn.bench", "--emulate", topo, "--inter-bw", bw,
                   *SHAPES[shape], "--out", sub, "--iters", str(args.iters),
                   "--min-time", str(MIN_TIME if args.min_time is None else args.min_time),
                   "--max-iters", str(args.max_iters),
                   "--warmup", str(args.warmup), "--no-overlap", "--breakdown",
                   "--trace-iters", str(max(1, args.trace_iters)), "--comm-dtype", "bfloat16",
                   "--autotune", str(max(0, args.matrix_autotune)),
                   "--threads", str(args.threads), "--timeout", str(args.timeout)]
            if args.no_progress:
                cmd.append("--no-progress")
            if args.mtu is not None:
                cmd += ["--mtu", str(args.mtu)]
            if args.congestion_control is not None:
                cmd += ["--congestion-control", args.congestion_control]
            busy, load0 = busy_fraction(), _load()
            t0 = time.monotonic()
            print(f"\n=== {cell} {shape}: {' '.join(cmd[1:])}  (other processes used {busy:.0%} "
                  f"of the CPU; load {load0:.2f})", flush=True)
            # the kernel calibration is measured in this run (idle), never read from an older one
            env = dict(os.environ, STREAMATTN_CACHE_DIR=os.path.join(out, "cache"))
            rc = subprocess.call(cmd, env=env)
            runs.append({"cell": cell, "shape": shape, "dir": sub, "rc": rc, "busy_before": busy,
                         "load_before": load0,
                         "load_after": _load(), "seconds": time.monotonic() - t0})
            print(f"=== {cell} {shape}: exit {rc} after {runs[-1]['seconds']:.0f} s "
                  f"(load {runs[-1]['load_after']:.2f})", flush=True)
    rows = []
    for run in runs:
        path = os.path.join(run["dir"], "bench.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        rows += summarize(data["runs"], run, args.max_busy)
    total = time.monotonic() - t_all
    _copy_timeline(runs, out)
    text = format_matrix(rows, runs, total)
    print("\n" + text)
    with open(os.path.join(out, "matrix.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "matrix.json"), "w") as f:
        json.dump({"runs": runs, "rows": rows, "seconds": total}, f, indent=1, default=str)
    print(f"\nwrote {os.path.join(out, 'matrix.md')} and matrix.json ({total / 60:.1f} min)")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def _copy_timeline(runs, out) -> None:
    """The README's picture: auto's timeline of the first 2x4 run (largest sequence), copied to
    <out>/timeline-2x4.png."""
    import glob
    import shutil

    for run in runs:
        if run["cell"].startswith("2x4"):
            pngs = sorted(glob.glob(os.path.join(run["dir"], "timeline-auto-*.png")),
                          key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
            if pngs:
                shutil.copyfile(pngs[-1], os.path.join(out, "timeline-2x4.png"))
                return


def summarize(records: List[dict], run: dict, max_busy: float) -> List[dict]:
    """One row per sequence length of one run: auto, best fixed, yunchang's best, limit, ratios."""
    rows = []
    for seq in sorted({r["shape"]["seq"] for r in records}):
        rs = [r for r in records if r["shape"]["seq"] == seq and r.get("latency_s")]
        auto = next((r for r in rs if r["config"] == "auto"), None)
        if auto is None:
            continue
        fixed = [r for r in rs if r["kind"] == "streamattn" and r["cfg"].get("algorithm") in FIXED
                 and not r["cfg"].get("comm_dtype") and not r["cfg"].get("force_auto")]
        yc = [r for r in rs if r["kind"] == "yunchang" and not r["cfg"].get("check_only")]
        med = lambda r: r["latency_s"]["median"]  # noqa: E731
        best_fixed = min(fixed, key=med) if fixed else None
        best_yc = min(yc, key=med) if yc else None
        lim = auto.get("limit") or {}
        wire = next((r for r in rs if r["config"].startswith("auto ") and r["cfg"].get("comm_dtype")), None)
        alt = next((r for r in rs if "autotune" in r["cfg"]), None)  # the second auto
        row = {
            "cell": run["cell"], "shape": run["shape"], "seq": seq,
            "joint_len": auto["shape"].get("joint_len", 0),
            "auto_plan": plan_label(auto),
            "auto_s": med(auto), "predicted_s": auto.get("predicted_s"),
            "limit_s": lim.get("limit_s"), "bound_by": lim.get("bound_by"),
            "limit_compute_s": lim.get("compute_s"), "limit_wire_s": lim.get("wire_s"),
            "best_fixed": best_fixed["config"] if best_fixed else None,
            "best_fixed_s": med(best_fixed) if best_fixed else None,
            "yunchang_best": best_yc["config"] if best_yc else None,
            "yunchang_best_s": med(best_yc) if best_yc else None,
            "auto_err": auto.get("err"),
            "bf16_wire_s": med(wire) if wire else None, "bf16_wire_err": wire.get("err") if wire else None,
            "alt_config": alt["config"] if alt else None,
            "alt_s": med(alt) if alt else None,
            "alt_plan": plan_label(alt) if alt else None,
            "loaded": run.get("busy_before", 0.0) > max_busy,
            # CPU seconds of one call summed over the ranks, and the one-process limit call's
            "auto_cpu_s": auto.get("cpu_s"), "best_fixed_cpu_s": best_fixed.get("cpu_s") if best_fixed else None,
            "yunchang_cpu_s": best_yc.get("cpu_s") if best_yc else None,
            "limit_cpu_s": lim.get("compute_cpu_s"),
        }
        row["auto_over_limit"] = row["auto_s"] / row["limit_s"] if row["limit_s"] else None
        row["yunchang_over_limit"] = (row["yunchang_best_s"] / row["limit_s"]
                                      if row["limit_s"] and row["yunchang_best_s"] else None)
        row["auto_vs_yunchang"] = row["yunchang_best_s"] / row["auto_s"] if row["yunchang_best_s"] else None
        row["auto_vs_yunchang_paired"] = 1 / paired(auto, best_yc) if best_yc else None
        row["auto_vs_fixed_paired"] = paired(auto, best_fixed) if best_fixed else None
        row["predicted_over_measured"] = (row["predicted_s"] / row["auto_s"]) if row["predicted_s"] else None
        row["alt_over_limit"] = (row["alt_s"] / row["limit_s"]) if row["alt_s"] and row["limit_s"] else None
        row["alt_vs_yunchang"] = (row["yunchang_best_s"] / row["alt_s"]
                                  if row["alt_s"] and row["yunchang_best_s"] else None)
        row["alt_vs_fixed"] = (row["best_fixed_s"] / row["alt_s"]
                               if row["alt_s"] and row["best_fixed_s"] else None)
        checks = []
        if row["auto_over_limit"] is not None and row["auto_over_limit"] > 1.10:
            checks.append("auto > 1.10x limit")
        if row["best_fixed_s"] and row["auto_s"] > row["best_fixed_s"] * 1.0 and \
                (row["auto_vs_fixed_paired"] or 1) > 1.0:
            checks.append(f"slower than {row['best_fixed']}")
        if row["yunchang_best_s"] and row["auto_s"] > row["yunchang_best_s"]:
            checks.append(f"slower than {row['yunchang_best']}")
        if run["cell"] == "2x2:200mbit" and row["auto_vs_yunchang"] is not None and row["auto_vs_yunchang"] < 1.4:
            checks.append("< 1.4x yunchang (wire-bound cell)")
        if row["loaded"]:
            checks.append(f"LOADED (others used {run['busy_before']:.0%} of the CPU at start)")
        row["checks"] = checks
        row["breakdown"] = [{k: v for k, v in pr.items() if k != "wait_by_peer"}
                            for pr in (auto.get("breakdown") or {}).get("per_rank", [])]
        rows.append(row)
    return rows


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_matrix(rows: List[dict], runs: List[dict], total_s: float) -> str:
    head = ("| cell | shape | seq | bound by | limit ms | auto (plan) ms | auto/limit | best fixed ms | "
            "yunchang best ms | yunchang/limit | auto vs yunchang | predicted ms | pred/meas | "
            "second auto ms (plan) | second/limit | second vs best fixed | second vs yunchang | "
            "bf16 wire ms (err) | CPU ms auto / fixed / yunchang / limit | checks |")
    lines = [head, "|" + "|".join([" --- "] * (head.count("|") - 1)) + "|"]
    for r in rows:
        err = "-" if r["bf16_wire_err"] is None else f"{r['bf16_wire_err']:.1e}"
        lines.append(
            f"| {r['cell']} | {r['shape']} | {r['seq']}+{r['joint_len']} | {r['bound_by'] or '-'} | "
            f"{_ms(r['limit_s'])} | {_ms(r['auto_s'])} ({r['auto_plan']}) | {_x(r['auto_over_limit'])} | "
            f"{_ms(r['best_fixed_s'])} ({r['best_fixed']}) | {_ms(r['yunchang_best_s'])} ({r['yunchang_best']}) | "
            f"{_x(r['yunchang_over_limit'])} | {_x(r['auto_vs_yunchang'])} | {_ms(r['predicted_s'])} | "
            f"{_x(r['predicted_over_measured'])} | {_ms(r.get('alt_s'))} ({r.get('alt_config')}: "
            f"{r.get('alt_plan')}) | {_x(r.get('alt_over_limit'))} | {_x(r.get('alt_vs_fixed'))} | "
            f"{_x(r.get('alt_vs_yunchang'))} | {_ms(r['bf16_wire_s'])} "
            f"({err}) | "
            f"{' / '.join(_ms(r.get(k)) for k in ('auto_cpu_s', 'best_fixed_cpu_s', 'yunchang_cpu_s', 'limit_cpu_s'))} | "
            f"{'; '.join(r['checks']) or 'ok'} |")
    lines.append("")
    lines.append("auto vs yunchang = yunchang's best median / auto's median (> 1: auto faster). limit = "
                 "max(whole attention in one process on all cores, fewest inter-node bytes any plan "
                 "needs per node at the link rate). auto: the default, which measures the planner's top "
                 "candidates in the warm-up and keeps the fastest where the ranks outnumber the "
                 "cores (STREAMATTN_AUTOTUNE=-1). second auto: STREAMATTN_AUTOTUNE=N, 'auto "
                 "predicted' (0: the planner's pick, unmeasured) or 'auto tuned' (N > 0); > 1 in "
                 "'vs' columns: it ran faster. CPU ms: one call's CPU time summed over the ranks (process time, all threads; "
                 "kernel TCP work in softirq is not in it), for auto, the best fixed plan, yunchang's best "
                 "and the one-process limit call. checks: the issue's acceptance bars per row, for the "
                 "default auto.")
    for pick in ("2x2:200mbit", "2x4:1gbit"):
        r = next((x for x in rows if x["cell"] == pick and x["breakdown"]), None)
        if r is None:
            continue
        lines.append(f"\nbreakdown of auto, {pick} {r['shape']} seq {r['seq']} (ms per rank):")
        keys = ["total", "kernel", "merge", "pack", "post", "copy", "agree", "wait_intra", "wait_inter", "other"]
        lines.append("| rank | " + " | ".join(keys) + " |")
        lines.append("|" + "|".join([" --- "] * (len(keys) + 1)) + "|")
        for i, pr in enumerate(r["breakdown"]):
            lines.append(f"| {i} | " + " | ".join(f"{pr.get(k, 0) * 1e3:.1f}" for k in keys) + " |")
    lines.append("")
    for run in runs:
        busy = run.get("busy_before")
        lines.append(f"run {run['cell']} {run['shape']}: exit {run['rc']}, {run['seconds']:.0f} s, "
                     + ("" if busy is None else f"others' CPU before {busy:.0%}, ")
                     + f"load {run['load_before']:.2f} -> {run['load_after']:.2f}")
    lines.append(f"total {total_s / 60:.1f} min")
    return "\n".join(lines)
