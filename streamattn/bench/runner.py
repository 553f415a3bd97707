"""The sweep: configurations × shapes, run through an executor, aggregated into one record per run.

An executor runs one task on every rank and returns the per-rank results:
  * `PoolExecutor`  — a RankPool (self-spawned local ranks, or ranks inside emulated nodes);
  * `GroupExecutor` — inside an existing torch.distributed group (torchrun): every rank runs the
    same driver loop, results are all-gathered, rank 0 reports.
"""
from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional

TASK = "streamattn.bench.tasks:"


# ─────────────────────────────────────────────────────────────────────── executors


class PoolExecutor:
    def __init__(self, pool, ranks_per_node: int, nodes: int):
        self.pool = pool
        self.world = pool.world_size
        self.ranks_per_node, self.nodes = ranks_per_node, nodes
        self.is_reporter = True

    def run(self, fn: str, **kw) -> list:
        return self.pool.run(TASK + fn, **kw)


class GroupExecutor:
    def __init__(self, ranks_per_node: int, nodes: int):
        import torch.distributed as dist

        self.dist = dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.ranks_per_node, self.nodes = ranks_per_node, nodes
        self.is_reporter = self.rank == 0

    def run(self, fn: str, **kw) -> list:
        from . import tasks

        mine = getattr(tasks, fn)(self.rank, self.world, **kw)
        return self._all_gather_json(mine)

    def _all_gather_json(self, obj) -> list:
        """Every rank's `obj` (JSON over a bytes all-gather with a timeout: never pickle between
        ranks; the tasks return JSON-able results, as they must for RankPool)."""
        import json

        from streamattn.topology.comm import all_gather_bytes

        return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode())]


# ──────────────────────────────────────────────────────────────────────── configs


def valid_ulysses(world: int, heads: int) -> list:
    return [u for u in range(1, world + 1) if world % u == 0 and heads % u == 0]


def torus_splits(world: int, heads: int, ranks_per_node: Optional[int]) -> list:
    """(u, t, r) of the Torus configurations the bench runs: Ulysses over a whole node
    (u = ranks per node, the design's intra-node all-to-all; on a single node the largest proper
    divisor of the ranks), every t >= 2 with u * t * r = world and heads divisible by u * t."""
    u = ranks_per_node or world
    if u >= world and world > 1:  # one node: split it in two or more groups (smallest factor)
        u = world // next(f for f in range(2, world + 1) if world % f == 0)
    if world % u:
        return []
    return [(u, world // (u * r), r) for r in range(1, world // u + 1)
            if (world // u) % r == 0 and world // (u * r) >= 2 and heads % (world // r) == 0]


def make_configs(world: int, heads: int, algorithms: List[str], degrees: Optional[List[tuple]] = None,
                 yunchang: bool = False, yunchang_native: bool = False,
                 force_auto: Optional[str] = None, ranks_per_node: Optional[int] = None,
                 comm_dtype: Optional[str] = None, autotune: Optional[int] = None,
                 yunchang_text_local: bool = False) -> list:
    """The configurations to compare on `world` ranks. degrees: (u, r) pairs to keep, or all
    (a torus u x t x r is kept when (u, r) is listed). ranks_per_node: the torus' u."""
    cfgs = []
    us = valid_ulysses(world, heads)
    keep = (lambda u: True) if not degrees else (lambda u: (u, world // u) in degrees)
    for a in algorithms:
        if a == "auto":
            cfgs.append({"name": "auto", "kind": "streamattn", "algorithm": "auto"})
        elif a == "ulysses" and world in us and keep(world):
            cfgs.append({"name": f"ulysses {world}", "kind": "streamattn", "algorithm": "ulysses"})
        elif a == "ring" and keep(1):
            cfgs.append({"name": f"ring {world}", "kind": "streamattn", "algorithm": "ring"})
        elif a == "usp":
            for u in us:
                if 1 < u < world and keep(u):
                    cfgs.append({"name": f"usp {u}x{world // u}", "kind": "streamattn",
                                 "algorithm": "usp", "ulysses_degree": u, "ring_degree": world // u})
        elif a == "torus":
            for u, t, r in torus_splits(world, heads, ranks_per_node):
                if not degrees or (u, r) in degrees:
                    cfgs.append({"name": f"torus {u}x{t}x{r}", "kind": "streamattn", "algorithm": "torus",
                                 "ulysses_degree": u, "ring_degree": r, "torus_degree": t})
    if autotune is not None and "auto" in algorithms:
        cfgs.append({"name": "auto tuned" if autotune else "auto predicted", "kind": "streamattn",
                     "algorithm": "auto", "autotune": int(autotune)})
    if comm_dtype and "auto" in algorithms:
        cfgs.append({"name": f"auto {comm_dtype} wire", "kind": "streamattn", "algorithm": "auto",
                     "comm_dtype": comm_dtype})
    if force_auto:
        cfgs.append({"name": f"auto(forced {force_auto})", "kind": "streamattn", "algorithm": "auto",
                     "force_auto": force_auto})
    if yunchang:
        for u in us:
            if keep(u):
                cfgs.append({"name": f"yunchang {u}x{world // u}", "kind": "yunchang",
                             "ulysses_degree": u, "ring_degree": world // u,
                             **({"text_local": True} if yunchang_text_local else {})})
        if yunchang_native:
            rs = [u for u in us if world // u > 1 and keep(u)]
            if rs:
                u = max(rs)
                cfgs.append({"name": f"yunchang-native {u}x{world // u}", "kind": "yunchang",
                             "ulysses_degree": u, "ring_degree": world // u, "native": True,
                             "check_only": True})
    return cfgs


# ───────────────────────────────────────────────────────────────────────── sweep


@dataclass
class SweepSpec:
    shapes: List[dict]
    algorithms: List[str]
    degrees: Optional[List[tuple]] = None
    iters: int = 5
    min_time: float = 0.0  # > 0: more rounds for cheap shapes (timed_rounds), up to max_iters
    max_iters: int = 40
    warmup: int = 1
    overlap: bool = True
    overlap_iters: int = 3
    check: bool = True
    yunchang: bool = True
    yunchang_native: bool = False
    yunchang_text_local: bool = False  # time yunchang without handing every rank the text output
    force_auto: Optional[str] = None
    seed: int = 0
    trace_iters: int = 3   # traced calls per streamattn configuration (breakdown, timeline: the median); 0: none
    limit: bool = True     # time the limit's compute half (whole attention, all cores, one process)
    comm_dtype: Optional[str] = None  # "bfloat16": also run auto with the reduced-precision wire
    # N: also run auto with STREAMATTN_AUTOTUNE=N -- "auto tuned" (N > 0, its trials in the warm-up)
    # or "auto predicted" (0: the planner's pick, never measured); None: auto alone
    autotune: Optional[int] = None


class _Progress:
    """tqdm when installed, else a plain line per shape."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True,
                                leave=False)
            except ImportError:
                pass

    def step(self, desc: str = "") -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:40], refresh=False)
            self.bar.update(1)

    def grow(self, n: int) -> None:
        """n more calls than planned (timed_rounds raised a shape's rounds)."""
        if self.bar is not None and n > 0:
            self.bar.total += n
            self.bar.refresh()

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stats(ts: List[float]) -> dict:
    return {"median": statistics.median(ts), "min": min(ts), "max": max(ts), "n": len(ts),
            "all": ts}


def yunchang_fits(shape: dict, world: int) -> bool:
    """yunchang shards one sequence (its text tokens in front of the image tokens) in equal
    parts: it runs only where seq + joint_len divides by the ranks."""
    return (shape["seq"] + shape.get("joint_len", 0)) % world == 0


def run_sweep(ex, spec: SweepSpec, *, inter_bw: Optional[float] = None, progress: bool = True,
              log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Run every configuration on every shape; return one record per (shape, configuration)."""
    world = ex.world
    plans = []
    for shape in spec.shapes:
        cfgs = make_configs(world, shape["heads"], spec.algorithms, spec.degrees, spec.yunchang,
                            spec.yunchang_native, spec.force_auto,
                            ranks_per_node=getattr(ex, "ranks_per_node", None),
                            comm_dtype=spec.comm_dtype, autotune=spec.autotune,
                            yunchang_text_local=spec.yunchang_text_local)
        cfgs = [c for c in cfgs if c["kind"] != "yunchang" or yunchang_fits(shape, world)]
        plans.append((shape, cfgs))
    n_overlap = lambda cfgs: sum(1 for c in cfgs if _overlap_cfg(c))
    modes = ["compute", "comm"] + (["inter"] if ex.nodes > 1 else [])
    total = sum(len(c) * spec.warmup + sum(1 for x in c if not x.get("check_only")) * spec.iters
                + (n_overlap(c) * len(modes) * (1 + spec.overlap_iters) if spec.overlap else 0)
                + 2 * n_overlap(c) * spec.trace_iters + (2 if spec.limit else 0)
                for _, c in plans)
    bar = _Progress(total, progress and ex.is_reporter)
    records = []
    try:
        for shape, cfgs in plans:
            bar.note(f"shape: seq {shape['seq']} + text {shape.get('joint_len', 0)}, "
                     f"{shape['heads']} heads x {shape['head_dim']}, batch {shape['batch']}: "
                     f"{len(cfgs)} configurations")
            recs = {c["name"]: _new_record(shape, c, world) for c in cfgs}
            # the limit's compute half, timed before the configurations and again after them
            # (min of both: load that comes and goes while the shape runs inflates only one)
            first_limit = ex.run("bench_limit", shape=shape, seed=spec.seed)[0] if spec.limit else None
            for c in cfgs:  # warm-up (the first call plans, agrees metadata and is checked)
                for w in range(spec.warmup):
                    res = ex.run("bench_call", shape=shape, cfg=c, mode="full",
                                 check=spec.check and w == 0, seed=spec.seed)
                    _absorb_first(recs[c["name"]], res)
                    bar.step(c["name"])
            timed = [c for c in cfgs if not c.get("check_only")]
            i, rounds = 0, spec.iters
            while i < rounds:  # interleaved, each round in another order (round_order)
                for c in [timed[j] for j in round_order(len(timed), i)]:
                    res = ex.run("bench_call", shape=shape, cfg=c, mode="full", seed=spec.seed)
                    _absorb_timed(recs[c["name"]], res)
                    bar.step(c["name"])
                i += 1
                if i == spec.iters and timed:
                    rounds = timed_rounds(spec, [statistics.median(recs[c["name"]]["_t"]) for c in timed])
                    bar.grow((rounds - i) * len(timed))
            if spec.overlap:
                ocfgs = [c for c in timed if _overlap_cfg(c)]
                for mode in modes:
                    for c in ocfgs:
                        ex.run("bench_call", shape=shape, cfg=c, mode=mode, seed=spec.seed)
                        bar.step(f"{c['name']} {mode}")
                    for i in range(spec.overlap_iters):
                        for c in [ocfgs[j] for j in round_order(len(ocfgs), i)]:
                            res = ex.run("bench_call", shape=shape, cfg=c, mode=mode, seed=spec.seed)
                            recs[c["name"]].setdefault("_" + mode, []).append(res[0]["t"])
                            if (cpu := _cpu(res)) is not None:
                                recs[c["name"]].setdefault("_cpu_" + mode, []).append(cpu)
                            bar.step(f"{c['name']} {mode}")
            traced = [c for c in timed if c["kind"] == "streamattn" and not c.get("force_auto")]
            for i in range(spec.trace_iters):  # calls under the recorder (not in the latency stats),
                for c in traced:               # each right after an untraced one: the pair's ratio is
                    off = ex.run("bench_call", shape=shape, cfg=c, mode="full", seed=spec.seed)
                    res = ex.run("bench_call", shape=shape, cfg=c, mode="full", seed=spec.seed,
                                 trace=True)     # what recording costs, measured interleaved
                    recs[c["name"]].setdefault("_traced", []).append(res)
                    recs[c["name"]].setdefault("_trace_pairs", []).append(res[0]["t"] / off[0]["t"])
                    bar.step(f"{c['name']} trace")
                    bar.step(f"{c['name']} trace")
            limit = None
            if spec.limit:
                bar.step("limit")
                res = ex.run("bench_limit", shape=shape, seed=spec.seed)
                fastest = min((res[0], first_limit), key=lambda x: x["t"])
                limit = _limit(shape, ex, inter_bw, fastest["t"], res[0]["threads"], fastest.get("cpu"))
                bar.step("limit")
            for c in cfgs:
                records.append(_finish(recs[c["name"]], ex, inter_bw, limit))
    finally:
        bar.close()
    return records


def _overlap_cfg(c) -> bool:
    """Configurations whose compute-/comm-only variants are measured: streamattn's own plans."""
    return c["kind"] == "streamattn" and not c.get("force_auto") and not c.get("comm_dtype")


def _new_record(shape, cfg, world) -> dict:
    label = cfg["name"]
    note = ""
    if cfg["kind"] == "yunchang":
        note = ("yunchang LongContextAttention(ring basic); its kernel REPLACED via the attn_processor "
                "hook by streamattn's CPU kernel that returns the true LSE")
        if cfg.get("native"):
            note = "yunchang with its own CPU kernel (torch_math, LSE = 0): error only, not timed"
        if shape.get("joint_len"):
            note += "; text tokens folded into its sequence (no joint API)"
            if cfg.get("text_local"):
                note += ", the text output left on the ranks holding its rows"
            else:
                note += (", then the text output broadcast from the ranks holding its rows to "
                         "every rank (what the next layer needs; streamattn returns it on every rank)")
    return {"shape": dict(shape), "config": label, "kind": cfg["kind"], "cfg": dict(cfg),
            "world_size": world, "note": note, "_t": []}


def _absorb_first(rec, res) -> None:
    errs = [r.get("err") for r in res if r.get("err") is not None]
    if errs:
        rec["err"] = max(errs)
    for k in ("plan", "algorithm", "ulysses_degree", "ring_degree", "torus_degree", "chunks",
              "joint_fold", "joint_all", "predicted_s", "transport", "plan_context",
              "predicted_steps"):
        if k in res[0]:
            rec[k] = res[0][k]


def round_order(n: int, i: int) -> List[int]:
    """The order of n configurations in timed round i: row i of a Williams balanced Latin square
    (0, 1, n-1, 2, n-2, ... shifted by i; mirrored in every other block of n rounds when n is odd).

    Why not a rotation: rotating one list keeps every configuration right behind the same
    neighbour in every round, so whatever that neighbour leaves behind (measured: the
    configuration listed first, "auto", ran 1-2% slower than the same plan listed elsewhere, round
    after round, in matrices m53-m60) is charged to the same configuration every time. Here every
    n rounds put each configuration once in each position, and each ordered pair of distinct
    configurations next to each other once (n even; twice in 2n rounds when n is odd). Left
    unbalanced: the pair across a round boundary (the last call of a round and the first of the
    next), and the rounds beyond the last whole block of n (2n) -- the timed rounds are rarely a
    multiple of n, and rounding them up would double a slow cell's time."""
    if n <= 0:
        return []
    base, lo, hi = [0], 1, n - 1
    while lo <= hi:
        base.append(lo)
        if lo != hi:
            base.append(hi)
        lo, hi = lo + 1, hi - 1
    row = [(b + i) % n for b in base]
    return row[::-1] if n % 2 and (i // n) % 2 else row


def timed_rounds(spec: SweepSpec, medians: List[float]) -> int:
    """Rounds of timed calls for one shape: spec.iters, raised until the slowest configuration
    has had spec.min_time seconds of timed calls (at most spec.max_iters rounds). Cheap calls are
    the noisiest (a scheduler tick is 10% of a 40 ms call on oversubscribed cores): their medians
    get more samples for the same few seconds; calls that are already long keep spec.iters."""
    if spec.min_time <= 0 or not medians:
        return spec.iters
    need = math.ceil(spec.min_time / max(max(medians), 1e-6))
    return max(spec.iters, min(spec.max_iters, need))


def _cpu(res) -> Optional[float]:
    """One call's CPU seconds summed over the ranks (None when a rank did not measure it)."""
    return sum(r["cpu"] for r in res) if all(r.get("cpu") is not None for r in res) else None


def _absorb_timed(rec, res) -> None:
    rec["_t"].append(res[0]["t"])
    if (cpu := _cpu(res)) is not None:
        rec.setdefault("_cpu", []).append(cpu)
    if all(r.get("faults") is not None for r in res):
        rec.setdefault("_faults", []).append(sum(r["faults"] for r in res))
    if all(r.get("late") is not None for r in res):
        rec.setdefault("_late", []).append(max(r["late"] for r in res))
    if res[0].get("bytes") is not None:
        per_rank = [r["bytes"] for r in res]
        if "bytes_per_rank" in rec and rec["bytes_per_rank"] != per_rank:
            rec["bytes_vary"] = True  # must not happen: the same call sends the same bytes
        rec["bytes_per_rank"] = per_rank
    if res[0].get("wire_tx") is not None:
        rec.setdefault("_wire", []).append([r["wire_tx"] for r in res])


def _limit(shape, ex, inter_bw, compute_s, threads, compute_cpu_s=None) -> dict:
    """The limit of one shape: max(the whole attention in one process on all the machine's cores,
    the inter-node bytes at the link rate). The wire half takes the fewest bytes any node must
    receive under any costed plan (streamattn.schedule, min over the valid candidates of the busiest
    node's ingress): no exact algorithm streamattn knows moves less. compute_cpu_s: the CPU seconds
    that one-process call took (the least CPU the attention itself needs, for cpu_s / it)."""
    out = {"compute_s": compute_s, "compute_threads": threads, "compute_cpu_s": compute_cpu_s,
           "wire_s": 0.0, "wire_bytes": 0,
           "wire_plan": None}
    if ex.nodes > 1 and inter_bw:
        from streamattn.planner import enumerate_candidates, label, torus_degree
        from streamattn.problem import Problem
        from streamattn.schedule import node_ingress_bytes
        from streamattn.topology import resolve_topology

        from .tasks import DTYPES, split_lengths

        world = ex.world
        problem = Problem(shape["batch"], shape["heads"], shape.get("kv_heads") or shape["heads"],
                          shape["head_dim"], DTYPES[shape.get("dtype", "float32")],
                          tuple(split_lengths(shape["seq"], world)), shape["head_dim"] ** -0.5,
                          joint_len=shape.get("joint_len", 0))
        topo = resolve_topology(topology=f"{ex.nodes}x{ex.ranks_per_node}")
        node_of = [topo.node_of(x) for x in range(world)]
        best = None
        for c in enumerate_candidates(problem, topo):
            if c.dropped:
                continue
            t = torus_degree(c) if c.algorithm == "torus" else None
            ingress = node_ingress_bytes(problem, c.ulysses_degree, c.groups, node_of, t,
                                         fold=c.joint_fold, joint_all=c.joint_all)
            worst = max(ingress.values(), default=0)
            if best is None or worst < best[0]:
                best = (worst, label(c))
        if best is not None:
            out.update(wire_bytes=best[0], wire_plan=best[1], wire_s=best[0] * 8 / inter_bw)
    out["limit_s"] = max(out["compute_s"] or 0.0, out["wire_s"])
    out["bound_by"] = "wire" if out["wire_s"] > (out["compute_s"] or 0.0) else "compute"
    return out


def _breakdown(traced: List[list]) -> Optional[dict]:
    """The traced call whose time is the median of the traced calls: per rank seconds by kind
    (streamattn.trace.summarize), the busiest rank's share, and the spans for the timeline."""
    from streamattn import trace

    if not traced:
        return None
    res = sorted(traced, key=lambda r: r[0]["t"])[len(traced) // 2]
    per_rank = [trace.summarize(r["spans"], r["t_rank"]) for r in res]
    t0 = min(r["t0_abs"] for r in res)
    return {"t": res[0]["t"], "per_rank": per_rank, "hooks_per_call": max(r["hooks"] for r in res),
            "timeline": [{"rank": i, "offset_s": r["t0_abs"] - t0, "total_s": r["t_rank"],
                          "spans": r["spans"], "events": r["events"]} for i, r in enumerate(res)]}


def _finish(rec, ex, inter_bw, limit=None) -> dict:
    rpn, nodes = ex.ranks_per_node, ex.nodes
    bd = _breakdown(rec.pop("_traced", None))
    pairs = rec.pop("_trace_pairs", None)
    if bd is not None:
        bd["traced_over_untraced"] = statistics.median(pairs) if pairs else None
        rec["breakdown"] = bd
    if limit is not None:
        rec["limit"] = limit
    ts = rec.pop("_t")
    rec["latency_s"] = _stats(ts) if ts else None
    cpus = rec.pop("_cpu", None)
    if cpus:  # CPU seconds of one call summed over the ranks (median over the timed calls)
        rec["cpu_s"] = statistics.median(cpus)
    faults = rec.pop("_faults", None)
    if faults:  # minor page faults of one call summed over the ranks (median): fresh pages zeroed
        rec["page_faults"] = statistics.median(faults)
    late = rec.pop("_late", None)
    if late:  # the last rank's start after the common start (one host; median over the calls)
        rec["start_late_s"] = statistics.median(late)
    med = rec["latency_s"]["median"] if ts else None
    b = rec.get("bytes_per_rank")
    if b is not None:
        rec["bytes"] = {"intra_total": sum(x["intra"] for x in b),
                        "inter_total": sum(x["inter"] for x in b),
                        "messages_total": sum(x["messages"] for x in b)}
        # busiest uplink: the inter-node bytes the ranks of one node send
        egress = [sum(b[r]["inter"] for r in range(n * rpn, (n + 1) * rpn)) for n in range(nodes)]
        rec["bytes"]["inter_node_egress_max"] = max(egress) if egress else 0
        if med and nodes > 1:
            rec["achieved_inter_bit_s"] = max(egress) * 8 / med
            if inter_bw:
                rec["inter_link_utilization"] = rec["achieved_inter_bit_s"] / inter_bw
        if med:
            rec["achieved_intra_bit_s_per_rank"] = max(x["intra"] for x in b) * 8 / med
    wire = rec.pop("_wire", None)
    if wire:
        # one reading per node (its first rank); medians over the timed calls
        per_node = [statistics.median(w[n * rpn] for w in wire) for n in range(nodes)]
        rec["wire_tx_per_node"] = per_node
    for mode in ("compute", "comm", "inter"):
        ys = rec.pop("_cpu_" + mode, None)
        if ys:  # CPU of the call summed over the ranks: what computing / moving bytes costs the cores
            rec[f"{mode}_only_cpu_s"] = statistics.median(ys)
        xs = rec.pop("_" + mode, None)
        if xs:
            rec[f"{mode}_only_s"] = statistics.median(xs)
            rec[f"{mode}_only_min_s"] = min(xs)
    comm = rec.get("inter_only_s", rec.get("comm_only_s"))
    if med and rec.get("compute_only_s") is not None and comm is not None:
        rec["overlap_efficiency"] = max(rec["compute_only_s"], comm) / med
        rec["overlap_sum_ratio"] = (rec["compute_only_s"] + comm) / med
    if rec.get("predicted_s") is not None and med:
        rec["predicted_over_measured"] = rec["predicted_s"] / med
    if limit is not None and med and limit.get("limit_s"):
        rec["over_limit"] = med / limit["limit_s"]
    if limit is not None and rec.get("cpu_s") and limit.get("compute_cpu_s"):
        rec["cpu_over_limit"] = rec["cpu_s"] / limit["compute_cpu_s"]
    return rec
