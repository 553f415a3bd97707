"""Output of a sweep: a terminal table, a JSON file (environment + one record per run), a PNG plot."""
from __future__ import annotations

import json
import os
import platform
from typing import List, Optional

from ..plan import joint_tags


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def plan_label(r: dict) -> str:
    """A run's plan in a few characters: "usp 4x2", "torus 2x2x1", "ulysses 4x1 /2ch" (head-group
    chunks), "usp 2x2 /4runs" (ring steps in token runs), "+fold" (joint tokens folded into the
    sequence), "+jall" (every ring member attends all joint queries)."""
    if r.get("torus_degree", 1) > 1:
        text = f"{r['algorithm']} {r['ulysses_degree']}x{r['torus_degree']}x{r['ring_degree']}"
    else:
        text = f"{r['algorithm']} {r['ulysses_degree']}x{r['ring_degree']}"
    if r.get("chunks", 1) > 1:
        text += f" /{r['chunks']}{'ch' if r['algorithm'] == 'ulysses' else 'runs'}"
    return text + joint_tags(r.get("joint_fold"), r.get("joint_all"))


def format_table(records: List[dict]) -> str:
    """One line per run, grouped by shape; ratios against the fastest configuration of the shape."""
    cols = ["config", "plan", "median ms", "min", "max", "vs best", "/limit", "cpu ms", "pred ms", "intra MB", "inter MB",
            "wire MB", "inter Mbit/s", "compute ms", "comm ms", "comm cpu", "overlap", "max err"]
    lines = []
    shapes = []
    for r in records:
        key = json.dumps(r["shape"], sort_keys=True)
        if key not in shapes:
            shapes.append(key)
    for key in shapes:
        rows = [r for r in records if json.dumps(r["shape"], sort_keys=True) == key]
        s = rows[0]["shape"]
        lines.append(f"\nseq {s['seq']} + text {s.get('joint_len', 0)}, {s['heads']} heads x {s['head_dim']}, "
                     f"batch {s['batch']}, {s.get('dtype', 'float32')}, {rows[0]['world_size']} ranks")
        timed = [r for r in rows if r.get("latency_s")]
        best = min((r["latency_s"]["median"] for r in timed), default=None)
        table = []
        for r in rows:
            lat = r.get("latency_s") or {}
            med = lat.get("median")
            b = r.get("bytes") or {}
            plan = "-"
            if r.get("algorithm"):
                plan = plan_label(r)
                if r.get("transport") not in (None, "torch"):
                    plan += f" [{r['transport']}]"
            elif r["kind"] == "yunchang":
                plan = f"usp {r['cfg']['ulysses_degree']}x{r['cfg']['ring_degree']}*"
            comm = r.get("inter_only_s", r.get("comm_only_s"))
            comm_cpu = r.get("inter_only_cpu_s", r.get("comm_only_cpu_s"))
            table.append([
                r["config"], plan, _ms(med), _ms(lat.get("min")), _ms(lat.get("max")),
                "-" if med is None or not best else f"{med / best:.2f}x",
                "-" if r.get("over_limit") is None else f"{r['over_limit']:.2f}x",
                _ms(r.get("cpu_s")), _ms(r.get("predicted_s")),
                _mb(b.get("intra_total")), _mb(b.get("inter_total")),
                _mb(sum(r["wire_tx_per_node"]) if r.get("wire_tx_per_node") else None),
                "-" if r.get("achieved_inter_bit_s") is None else f"{r['achieved_inter_bit_s'] / 1e6:.0f}",
                _ms(r.get("compute_only_s")), _ms(comm), _ms(comm_cpu),
                "-" if r.get("overlap_efficiency") is None else f"{r['overlap_efficiency']:.2f}",
                "-" if r.get("err") is None else f"{r['err']:.1e}",
            ])
        widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths))))
        lines.append("  ".join("-" * w for w in widths))
        for row in table:
            lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                                   for i, (v, w) in enumerate(zip(row, widths))))
    notes = sorted({r["note"] for r in records if r.get("note")})
    legend = [
        "",
        "median/min/max: wall time of one call, slowest rank, over the timed iterations (configurations "
        "interleaved; on one host the ranks start each call at one agreed instant, not as a barrier "
        "releases them). vs best: median / fastest median of the shape. /limit: median / max(whole "
        "attention on all cores in one process, fewest inter-node bytes any plan needs at the link rate).",
        "cpu ms: CPU time of one call summed over all ranks (process time, every thread; median), to set "
        "against the limit's one-process CPU time: on shared cores it is what a call costs them.",
        "intra/inter MB: payload bytes sent per call, all ranks, by link class (streamattn's transport "
        "counters; yunchang has none). wire MB: bytes all node uplinks transmitted per call (emulated cluster: "
        "veth tx counters, incl. headers and ACKs; covers yunchang too). inter Mbit/s: busiest node's inter-node payload / median.",
        "compute ms: the same plan with communication replaced by no-ops; comm ms: the same plan with "
        "attention kernels stubbed (inter-node exchanges only when there are several nodes); comm cpu: that "
        "run's CPU ms summed over the ranks (the TCP stack, copies, waits and the call's own overhead), "
        "which on shared cores adds to the compute's instead of hiding behind it.",
        "overlap = max(compute, comm) / median (1.00 = the smaller one fully hidden). pred ms: the "
        "planner's predicted time (- when the plan is not costed). max err: max|out-ref|/max|ref| vs float64.",
    ]
    if any(r["kind"] == "yunchang" for r in records):
        legend.append("* yunchang: " + " | ".join(n for n in notes if n.startswith("yunchang")))
    return "\n".join(lines + legend)


def environment(mode: str, *, world: int, nodes: int, ranks_per_node: int, inter_bw=None,
                intra_bw=None, measured_inter_bit_s=None, extra: Optional[dict] = None) -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    env = {
        "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "cpu_affinity": affinity,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "mode": mode, "world_size": world, "topology": f"{nodes}x{ranks_per_node}",
        "inter_bw_bit_s": inter_bw, "intra_bw_bit_s": intra_bw,
        "measured_inter_goodput_bit_s": measured_inter_bit_s,
        "topology_env": os.environ.get("STREAMATTN_TOPOLOGY"),
    }
    try:
        import yunchang

        env["yunchang"] = getattr(yunchang, "__version__", "?")
    except Exception:
        env["yunchang"] = None
    env.update(extra or {})
    return env


def write_json(path: str, env: dict, records: List[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    with open(path, "w") as f:
        json.dump({"environment": env, "runs": clean}, f, indent=1, sort_keys=True, default=str)


def write_plot(path: str, env: dict, records: List[dict]) -> Optional[str]:
    """Latency (median, min-max bars) against sequence length, one line per configuration; one
    panel per (heads, head_dim, text tokens). Returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot"
    timed = [r for r in records if r.get("latency_s")]
    if not timed:
        return "nothing timed: no plot"
    groups = {}
    for r in timed:
        s = r["shape"]
        groups.setdefault((s["heads"], s["head_dim"], s.get("joint_len", 0), s["batch"]), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (g, rs) in zip(axes[0], groups.items()):
        names = list(dict.fromkeys(r["config"] for r in rs))
        for name in names:
            pts = sorted((r["shape"]["seq"], r["latency_s"]) for r in rs if r["config"] == name)
            xs = [p[0] for p in pts]
            med = [p[1]["median"] * 1e3 for p in pts]
            lo = [m - p[1]["min"] * 1e3 for m, p in zip(med, pts)]
            hi = [p[1]["max"] * 1e3 - m for m, p in zip(med, pts)]
            style = "--" if name.startswith("yunchang") else "-"
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", linestyle=style, capsize=3, label=name)
        ax.set_xlabel("image tokens (sharded sequence)")
        ax.set_ylabel("latency per call, ms (median; bars min..max)")
        ax.set_title(f"{g[0]} heads x {g[1]}, text {g[2]}, batch {g[3]}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    bw = env.get("inter_bw_bit_s")
    bwt = f", inter-node {bw / 1e6:g} Mbit/s" if bw else ""
    fig.suptitle(f"streamattn bench: {env['mode']} {env['topology']}{bwt} (torch {env['torch']}, "
                 f"{env['cpu_count']} cores)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    """`python -m streamattn.bench.report bench.json`: print the table of a saved run again."""
    import sys

    path = (argv or sys.argv[1:] or ["bench_out/bench.json"])[0]
    with open(path) as f:
        data = json.load(f)
    env = data["environment"]
    print(f"{env['mode']} {env['topology']}, inter {env.get('inter_bw_bit_s')} bit/s, "
          f"torch {env['torch']}, {env['cpu_count']} cores")
    print(format_table(data["runs"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ─────────────────────────────────────────────────────────── breakdown, limit, timeline

BREAKDOWN_COLS = ("kernel", "merge", "pack", "post", "copy", "agree", "wait_intra", "wait_inter", "other")


def format_breakdown(records: List[dict], hook_cost_s: Optional[float] = None) -> str:
    """Per configuration and rank: where the median traced call's time went (ms), and the limit."""
    lines = []
    for r in records:
        bd = r.get("breakdown")
        if not bd:
            continue
        s = r["shape"]
        head = (f"\n{r['config']} (seq {s['seq']} + text {s.get('joint_len', 0)}, {s['heads']}x"
                f"{s['head_dim']}): traced call {bd['t'] * 1e3:.1f} ms")
        lim = r.get("limit")
        if lim:
            head += (f"; limit {lim['limit_s'] * 1e3:.1f} ms ({lim['bound_by']}: compute "
                     f"{(lim['compute_s'] or 0) * 1e3:.1f} ms on {lim['compute_threads']} cores, wire "
                     f"{lim['wire_s'] * 1e3:.1f} ms)")
        if hook_cost_s:
            head += (f"; tracing off costs <= {bd['hooks_per_call']} hooks x {hook_cost_s * 1e9:.0f} ns"
                     f" = {100 * bd['hooks_per_call'] * hook_cost_s / bd['t']:.3f}% of the call")
        if bd.get("traced_over_untraced"):
            head += f"; traced/untraced call (interleaved, median) {bd['traced_over_untraced']:.3f}"
        lines.append(head)
        cols = ["rank", "total"] + list(BREAKDOWN_COLS) + ["waits by peer (ms)"]
        rows = []
        for i, pr in enumerate(bd["per_rank"]):
            peers = ", ".join(f"{p}:{v * 1e3:.1f}" for p, v in sorted(pr["wait_by_peer"].items(),
                                                                        key=lambda x: int(x[0])))
            rows.append([str(i), f"{pr['total'] * 1e3:.1f}"] + [f"{pr[c] * 1e3:.1f}" for c in BREAKDOWN_COLS]
                        + [peers or "-"])
        w = [max(len(c), *(len(x[j]) for x in rows)) for j, c in enumerate(cols)]
        lines.append("  " + "  ".join(c.rjust(w[j]) if j < len(cols) - 1 else c for j, c in enumerate(cols)))
        for x in rows:
            lines.append("  " + "  ".join(v.rjust(w[j]) if j < len(cols) - 1 else v for j, v in enumerate(x)))
    if lines:
        lines.append("\nms per rank in one traced call: kernel = local attention, merge = LSE merges, pack = "
                     "packing/concat/transposes around messages, post = handing messages to the "
                     "transport (shm: the memcpy into the peer), copy = shm copy-out, agree = the per-call "
                     "signature every rank exchanges before it runs, wait_intra / "
                     "wait_inter = blocked on a peer on this / another node, other = the rest (Python, "
                     "allocation, output layout).")
    return "\n".join(lines)


def format_limits(records: List[dict]) -> str:
    """measured / limit and predicted / measured per configuration."""
    lines = []
    for r in records:
        lat = r.get("latency_s")
        lim = r.get("limit")
        if not lat or not lim:
            continue
        pred = r.get("predicted_s")
        lines.append(f"  {r['config']:<24} {lat['median'] * 1e3:9.1f} ms  measured/limit "
                     f"{r['over_limit']:.2f}x  " + (f"predicted/measured {pred / lat['median']:.2f}" if pred else ""))
    if not lines:
        return ""
    lim = next(r["limit"] for r in records if r.get("limit"))
    return ("\nlimit = max(whole attention on all cores, inter-node bytes at the link rate); "
            f"first shape: {lim['limit_s'] * 1e3:.1f} ms, bound by {lim['bound_by']}\n" + "\n".join(lines))


KIND_COLORS = {"kernel": "#1f77b4", "merge": "#9467bd", "pack": "#ff7f0e", "post": "#2ca02c",
               "copy": "#bcbd22", "agree": "#17becf", "wait_intra": "#c7c7c7", "wait_inter": "#d62728"}


def write_timeline(path: str, rec: dict) -> Optional[str]:
    """A Gantt chart of one traced call of `rec`: one row per rank, its spans coloured by kind,
    each message's post as a tick (inter-node: red). Returns None, or why nothing was written."""
    bd = rec.get("breakdown")
    if not bd:
        return "no traced call in this record"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no timeline"
    tl = bd["timeline"]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(tl) + 1.8))
    for row in tl:
        y, off = row["rank"], row["offset_s"]
        for kind, a, b, peer, inter, _ in row["spans"]:
            k = ("wait_inter" if inter else "wait_intra") if kind == "wait" else kind
            ax.broken_barh([((off + a) * 1e3, max(b - a, 1e-6) * 1e3)], (y - 0.35, 0.7),
                           facecolors=KIND_COLORS.get(k, "#7f7f7f"), linewidth=0)
        for kind, a, peer, inter, nbytes in row["events"]:
            ax.plot([(off + a) * 1e3] * 2, [y - 0.45, y + 0.45], color="#d62728" if inter else "#2ca02c",
                    linewidth=0.8)
        ax.plot([(off + row["total_s"]) * 1e3], [y], marker="|", color="black", markersize=14)
    ax.set_yticks([row["rank"] for row in tl])
    ax.set_yticklabels([f"rank {row['rank']}" for row in tl])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first rank entered the call (ticks: message posts, red = inter-node; "
                  "| = call returns)", fontsize=8)
    s = rec["shape"]
    ax.set_title(f"{rec['config']}: seq {s['seq']} + text {s.get('joint_len', 0)}, {s['heads']}x"
                 f"{s['head_dim']}, one call {bd['t'] * 1e3:.0f} ms", fontsize=10)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLORS.items()], fontsize=7,
              ncol=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
