"""Benchmark tasks that run on every rank (RankPool workers, or torchrun ranks in-process).

Each task is ``fn(rank, world_size, **json_kwargs)`` and returns JSON. Inputs are generated from a
seed identically on every rank and cached per shape, so one timed call is one task and the driver
can interleave configurations call by call (noise on a shared CPU then hits every configuration
alike, which is what makes ratios between them meaningful).

Measurement modes of one call (``mode=``):

``full``     the public ``streamattn.attention`` call, exactly as a user makes it.
``compute``  the same algorithm on the same plan, with every exchange replaced by a no-op (receive
             buffers are zero-filled): packing, kernels and LSE merges, no communication.
``comm``     the same algorithm on the same plan over the real transport, with every local attention
             kernel replaced by a stub that returns zeros of the right shape: all exchanges (and the
             cheap packing/merging around them), no attention math.
``inter``    like ``comm`` but only the exchanges that cross nodes are made (intra-node ones are
             no-ops): the inter-node communication the algorithm cannot avoid.

Overlap efficiency is then ``max(compute, inter) / full`` (``comm`` when the group has one node):
1.0 means the call takes no longer than its larger component, i.e. communication fully hidden
behind compute (or vice versa); ``(compute + inter) / full`` > 1 says that some overlap happened.
The stubs remove work, they never add any, and each mode runs on all ranks at once, so CPU
contention between ranks is the same as in the real call.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import pkgutil
import resource
import time

import torch
import torch.distributed as dist
from ..config import override
from ..reference import reference_attention, rel_err
from ..sharding import split_lengths

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_state: dict = {"key": None}  # this rank's cached inputs and references for the current shape
# How far ahead of the latest rank's clock a timed call's common start is set (one host only)
START_MARGIN_S = 0.02
_one_host: dict = {}  # group -> whether every rank runs on this kernel (decided once, collectively)


# ───────────────────────────────────────────────────────────────────────── start of a timed call


def _start_together() -> float:
    """Call right after a barrier, on every rank. A barrier releases the ranks up to 20 ms apart on
    oversubscribed cores (8 ranks on 2: the release reaches each rank when the scheduler runs it),
    and a call timed from there charges that skew to whichever rank came out first. When every
    rank runs on this kernel (local ranks, an emulated cluster: one CLOCK_MONOTONIC), they agree on
    an instant START_MARGIN_S after the latest one's clock and each sleeps until it, so the call
    starts together on every rank. Returns how late this rank starts after that instant (seconds;
    0.0 off one host, where the barrier is all there is)."""
    from ..topology import kernel_hash

    group = dist.group.WORLD
    if group not in _one_host:
        mine = kernel_hash()
        h = torch.tensor([mine, -mine], dtype=torch.int64)
        dist.all_reduce(h, op=dist.ReduceOp.MAX)  # max and -min: equal everywhere iff one kernel
        _one_host[group] = bool(mine) and int(h[0]) == -int(h[1])
    if not _one_host[group]:
        return 0.0
    at = torch.tensor([time.monotonic() + START_MARGIN_S], dtype=torch.float64)
    dist.all_reduce(at, op=dist.ReduceOp.MAX)
    wait = float(at) - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    return max(0.0, time.monotonic() - float(at))


# ───────────────────────────────────────────────────────────────────────── inputs


def _shape_key(shape: dict, seed: int) -> tuple:
    return tuple(sorted(shape.items())) + (("seed", seed),)


def _inputs(rank: int, world: int, shape: dict, seed: int) -> dict:
    """Global tensors for `shape` (same on every rank) and this rank's shards, cached."""
    key = _shape_key(shape, seed)
    if _state["key"] == key:
        return _state
    B, S, H = shape["batch"], shape["seq"], shape["heads"]
    Hk, D, T = shape.get("kv_heads") or H, shape["head_dim"], shape.get("joint_len", 0)
    dt = DTYPES[shape.get("dtype", "float32")]
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float32).to(dt)

    q, k, v = rnd(B, S, H, D), rnd(B, S, Hk, D), rnd(B, S, Hk, D)
    joint = (rnd(B, T, H, D), rnd(B, T, Hk, D), rnd(B, T, Hk, D)) if T else None
    lens = split_lengths(S, world)
    start = sum(lens[:rank])
    shard = tuple(t[:, start:start + lens[rank]].contiguous() for t in (q, k, v))
    # yunchang has no joint-token API: text tokens go in front of the image tokens in one sequence
    # (the same math as joint_strategy="front"), split evenly over the ranks.
    cq, ck, cv = (torch.cat([j, x], 1) for j, x in zip(joint, (q, k, v))) if joint else (q, k, v)
    n = (S + T) // world
    _state.clear()
    _state.update(key=key, shape=dict(shape), seed=seed, q=q, k=k, v=v, joint=joint, shard=shard,
                  img_start=start, img_len=lens[rank], combined=(cq, ck, cv),
                  yc_shard=tuple(t[:, rank * n:(rank + 1) * n].contiguous() for t in (cq, ck, cv)),
                  yc_rows=(rank * n, (rank + 1) * n), ref={}, plans={}, yc={})
    return _state


def _ref_rows(st: dict, lo: int, hi: int) -> torch.Tensor:
    """float64 attention output of rows [lo, hi) of the combined [joint; image] sequence (the
    oracle, streamattn.reference), cached per shape."""
    if (lo, hi) not in st["ref"]:
        cq, ck, cv = st["combined"]
        st["ref"][(lo, hi)] = reference_attention(cq, ck, cv, rows=(lo, hi))
    return st["ref"][(lo, hi)]


# ──────────────────────────────────────────────────────── transports and kernel stubs


class _Done:
    def wait(self) -> None:
        pass


def _skip_transport(real, keep):
    """A Transport that makes only the exchanges with peers for which keep(peer) is true (over the
    real transport) and turns the others into no-ops (receive buffers zero-filled). keep must be
    symmetric (if A keeps B, B keeps A) so the kept sends and receives still pair up."""
    from streamattn.transport.base import ByteCounters, Transport

    class SkipTransport(Transport):
        def __init__(self):
            self.rank, self.size, self.device = real.rank, real.size, real.device
            self.node_of = real.node_of
            self.counters = ByteCounters()

        def exchange(self, sends, recvs, tag, count=True):
            ks = [(p, t) for p, t in sends if keep(p)]
            kr = [(p, t) for p, t in recvs if keep(p)]
            for p, t in recvs:
                if not keep(p):
                    t.zero_()
            if ks or kr:
                return real.exchange(ks, kr, tag, count)
            return _Done()

        def describe_peer(self, peer):
            return real.describe_peer(peer)

    return SkipTransport()


@functools.lru_cache(maxsize=None)
def _algorithm_modules():
    """The algorithm modules that call the kernel (attention_with_lse), found once per process."""
    import streamattn.algorithms as pkg

    mods = (importlib.import_module(f"{pkg.__name__}.{info.name}")
            for info in pkgutil.iter_modules(pkg.__path__))
    return tuple(m for m in mods if hasattr(m, "attention_with_lse"))


def _zero_kernel(q, k, v, *, scale, causal=False, q_offset=0, k_offset=0):
    from streamattn.merge import acc_dtype

    B, H, Sq, _ = q.shape
    return (torch.zeros(B, H, Sq, v.shape[-1], dtype=q.dtype, device=q.device),
            torch.zeros(B, H, Sq, dtype=acc_dtype(q.dtype), device=q.device))


@contextlib.contextmanager
def _stubbed_kernels():
    """Every algorithm module's attention_with_lse replaced by _zero_kernel (comm-only modes)."""
    mods = list(_algorithm_modules())
    saved = [(m, m.attention_with_lse) for m in mods]
    try:
        for m in mods:
            m.attention_with_lse = _zero_kernel
        yield
    finally:
        for m, f in saved:
            m.attention_with_lse = f


@contextlib.contextmanager
def _forced_auto(algorithm):
    """Negative control for the perf tests: make the planner answer "auto" with `algorithm` (a bad
    plan), with a plan cache of its own so real "auto" plans are neither used nor disturbed."""
    if not algorithm:
        yield
        return
    from dataclasses import replace

    from streamattn import api

    forced = _state.setdefault("forced_plans", type(api.plan_cache)())
    reason = f"FORCED bad plan ({algorithm}) for a negative control"
    if hasattr(api, "make_plan"):  # the cost-model planner: make_plan(problem, topology, *, ...)
        name, real = "make_plan", api.make_plan

        def hook(problem, topology, *, algorithm="auto", **kw):
            if algorithm == "auto":
                kw.pop("ulysses_degree", None), kw.pop("ring_degree", None)
                return replace(real(problem, topology, algorithm=forced_algo, **kw), reason=reason)
            return real(problem, topology, algorithm=algorithm, **kw)
    else:  # the simple rule: choose_plan(problem, node_of, algorithm, u, r)
        name, real = "choose_plan", api.choose_plan

        def hook(problem, node_of, algo="auto", u=None, r=None):
            if algo == "auto":
                return replace(real(problem, node_of, forced_algo, None, None), reason=reason)
            return real(problem, node_of, algo, u, r)

    forced_algo = algorithm
    real_plans = api.plan_cache
    setattr(api, name, hook)
    api.plan_cache = forced
    try:
        yield
    finally:
        setattr(api, name, real)
        api.plan_cache = real_plans


@contextlib.contextmanager
def _traced():
    """A streamattn.trace recorder for this process, with every algorithm module's kernel and LSE
    merge entry points wrapped in "kernel" / "merge" spans (the transports and the packing code
    carry their own hooks). Yields the Recorder."""
    from streamattn import trace

    def wrap(kind, fn):
        def timed(*a, **kw):
            with trace.span(kind):
                return fn(*a, **kw)
        return timed

    saved = []
    for m in _algorithm_modules():
        for name, kind in (("attention_with_lse", "kernel"), ("update_out_and_lse", "merge"),
                           ("merge_all", "merge")):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, wrap(kind, getattr(m, name)))
    try:
        with trace.recording() as rec:
            yield rec
    finally:
        for m, name, fn in reversed(saved):
            setattr(m, name, fn)


# ──────────────────────────────────────────────────────────────────────── yunchang


def yunchang_kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, *args, **kwargs):
    """yunchang's attn_processor contract (flash-attn forward): q, k, v [B, S, H, D] ->
    (out [B, S, H, D], lse [B, H, S]); streamattn's CPU kernel, which returns the true LSE."""
    from streamattn.kernels import attention_with_lse

    if dropout_p:
        raise ValueError("dropout is not supported by the benchmark kernel")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  scale=scale, causal=causal)
    return out.transpose(1, 2), lse


def _yunchang_layer(st, u, r, native):
    """One LongContextAttention per (u, r, native), with yunchang's own process groups (Ulysses
    over adjacent ranks, use_ulysses_low=True). Created in the same order on every rank."""
    key = (u, r, bool(native))
    cache = _state.setdefault("yc_layers", {})  # survives shape changes: groups are expensive
    if key not in cache:
        import yunchang
        from yunchang.kernels import AttnType

        yunchang.set_seq_parallel_pg(u, r, dist.get_rank(), dist.get_world_size())
        if native:  # its CPU path: torch math SDPA with LSE = 0 (wrong as soon as r > 1)
            layer = yunchang.LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)
        else:
            # The kernel hook: select_flash_attn_impl() returns `attn_processor` for an attn_type
            # that names none of its built-in kernels.
            layer = yunchang.LongContextAttention(ring_impl_type="basic", attn_type=None,
                                                  attn_processor=yunchang_kernel)
        cache[key] = layer
    return cache[key]


def _broadcast_text(out, rows, T):
    """The text output on every rank, from yunchang's output shard: rows [lo, hi) of the
    [text; image] sequence are this rank's; each rank holding text rows broadcasts them (gloo),
    as an engine must before its next (replicated) text layer. Returns [B, T, H, D]."""
    lo, hi = rows
    n = hi - lo
    parts = []
    for src in range((T + n - 1) // n):
        a, b = src * n, min(T, (src + 1) * n)
        buf = out[:, : b - a].contiguous() if src == dist.get_rank() else out.new_empty(
            out.shape[0], b - a, *out.shape[2:])
        dist.broadcast(buf, src)
        parts.append(buf)
    return torch.cat(parts, 1)


def yunchang_available(rank, world_size):
    try:
        import yunchang  # noqa: F401
    except Exception as exc:  # not installed, or broken by a missing optional dependency
        return {"ok": False, "reason": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "version": getattr(yunchang, "__version__", "?")}


# ──────────────────────────────────────────────────────────────────────── the call


def _transport(name="torch"):
    """The default group's transport `name` (the plan's), as streamattn.attention uses it."""
    from streamattn import api

    if name == "torch":
        return api.group_transport(None)
    return api.group_transport(None, name)


class _Counters:
    """Payload bytes this rank sent on the default group, over every transport streamattn made
    for it (torch, shm, ...)."""

    def __init__(self):
        from streamattn import api

        self.api = api

    def reset(self):
        if hasattr(self.api, "reset_byte_counters"):
            self.api.reset_byte_counters(None)
        else:
            _transport().counters.reset()

    def as_dict(self):
        if hasattr(self.api, "byte_counters"):
            return self.api.byte_counters(None)
        return _transport().counters.as_dict()


def _last_entry():
    from streamattn import api

    return next(reversed(api.plan_cache.values())) if api.plan_cache else (None, None)


def _wire_tx():
    iface = os.environ.get("STREAMATTN_BENCH_IFACE")
    if not iface:
        return None
    try:
        with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def _run_streamattn(st, cfg, mode, check):
    import streamattn
    from streamattn import api

    ql, kl, vl = st["shard"]
    joint = st["joint"]
    ckey = cfg["name"]
    kw = dict(algorithm=cfg.get("algorithm", "auto"), ulysses_degree=cfg.get("ulysses_degree"),
              ring_degree=cfg.get("ring_degree"))
    if cfg.get("comm_dtype"):
        kw["comm_dtype"] = DTYPES[cfg["comm_dtype"]]
    if joint is not None:
        kw.update(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2], joint_strategy="front")
    if mode == "full" or ckey not in st["plans"]:
        tune = cfg.get("autotune")  # an agreed setting: every rank runs this configuration alike
        if cfg.get("force_auto"):
            tune = 0  # the negative control runs its bad plan, not the tuning's measured winner
        with _forced_auto(cfg.get("force_auto")), (override(STREAMATTN_AUTOTUNE=tune)
                                                   if tune is not None else contextlib.nullcontext()):
            if ckey not in st["plans"]:
                # a tuning's trial calls (STREAMATTN_AUTOTUNE: by default where the ranks
                # outnumber the cores), all in the configuration's first (warm-up) call
                streamattn.attention(ql, kl, vl, **kw)
                for _ in range(64):
                    if not api.tunings.active:
                        break
                    streamattn.attention(ql, kl, vl, **kw)
            res = streamattn.attention(ql, kl, vl, **kw)
            st["plans"][ckey] = _last_entry()
        if mode == "full":
            return res
    problem, plan = st["plans"][ckey]
    real = _transport(getattr(plan, "transport", "torch"))
    if mode == "compute":
        return api.run_plan(plan, _skip_transport(real, lambda p: False), problem, ql, kl, vl, joint)
    with _stubbed_kernels():
        if mode == "comm":
            return api.run_plan(plan, real, problem, ql, kl, vl, joint)
        if mode == "inter":
            me = real.node_of[real.rank]
            return api.run_plan(plan, _skip_transport(real, lambda p: real.node_of[p] != me), problem,
                            ql, kl, vl, joint)
    raise ValueError(f"unknown mode {mode!r}")


def bench_call(rank, world_size, *, shape, cfg, mode="full", check=False, seed=0, trace=False):
    """One timed call of configuration `cfg` on `shape`, on every rank.

    Returns this rank's {"t": seconds (the slowest rank's, same on all ranks), "cpu": this
    process's CPU seconds in the call (all its threads, gloo's included; time.process_time: on an
    oversubscribed CPU the sum over ranks is what the call costs the shared cores), "bytes": payload
    bytes this rank sent in the call by link class, "wire_tx": bytes its node's uplink transmitted
    (emulated cluster only), "faults": its minor page faults in the call, "late": how long after
    the common start it began (_start_together), "plan", "predicted_s", "err" (when check); rank 0
    also "plan_context" (the planner's problem, links and measured terms) and "predicted_steps"
    (the chosen candidate's steps, Step.to_dict)}.
    trace=True (streamattn configurations): the call runs under a streamattn.trace recorder and
    the result also has "spans"/"events" (seconds from this rank's call start), "t_rank" (this
    rank's own time) and "t0_abs" (its CLOCK_MONOTONIC start, to align ranks of one host).
    """
    st = _inputs(rank, world_size, shape, seed)
    kind = cfg.get("kind", "streamattn")
    T = st["joint"][0].shape[1] if st["joint"] is not None else 0  # text tokens
    if kind == "yunchang":
        layer = _yunchang_layer(st, cfg["ulysses_degree"], cfg["ring_degree"], cfg.get("native"))
        ql, kl, vl = st["yc_shard"]
        text_local = cfg.get("text_local") or not T

        def call():
            out = layer(ql, kl, vl, softmax_scale=1.0 / math.sqrt(ql.shape[-1]))
            return out if text_local else (out, _broadcast_text(out, st["yc_rows"], T))
        counters = None
    else:
        counters = _Counters() if world_size > 1 else None
        if mode != "full" and cfg["name"] not in st["plans"]:
            _run_streamattn(st, cfg, "full", False)  # plan first, outside the timed region

        def call():
            return _run_streamattn(st, cfg, mode, check)

    dist.barrier()
    tx0 = _wire_tx()
    if counters is not None:
        counters.reset()
    traced = _traced() if trace and kind != "yunchang" else contextlib.nullcontext()
    # the recorder is set up (its hooks wrapped) before the common start: ranks doing that after it
    # entered a traced call up to 9 ms apart on 4 ranks / 2 cores, a skew no untraced call has
    with traced as rec:
        late = _start_together()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0, t0 = time.process_time(), time.perf_counter()
        out = call()
        t = time.perf_counter() - t0
        cpu = time.process_time() - c0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    nbytes = counters.as_dict() if counters is not None else None
    tx = None
    if tx0 is not None:
        dist.barrier()  # every rank of the node is done sending (barrier bytes are counted too)
        tx = _wire_tx() - tx0
    tt = torch.tensor([t], dtype=torch.float64)
    dist.all_reduce(tt, op=dist.ReduceOp.MAX)  # a call is as slow as its slowest rank
    res = {"t": float(tt), "cpu": cpu, "faults": faults, "late": late, "bytes": nbytes, "wire_tx": tx}
    if rec is not None:
        shift = t0 - rec.start
        res.update(t_rank=t, t0_abs=t0, hooks=rec.hooks,
                   spans=[[k, a - shift, b - shift, p, i, n] for k, a, b, p, i, n in rec.spans],
                   events=[[k, a - shift, p, i, n] for k, a, p, i, n in rec.events])
    if kind != "yunchang":
        plan = st["plans"].get(cfg["name"], (None, None))[1]
        if plan is not None:
            res.update(plan=str(plan), algorithm=plan.algorithm, ulysses_degree=plan.ulysses_degree,
                       ring_degree=plan.ring_degree, torus_degree=getattr(plan, "torus_degree", 1),
                       chunks=getattr(plan, "chunks", 1), joint_fold=getattr(plan, "joint_fold", False),
                       joint_all=getattr(plan, "joint_all", False),
                       predicted_s=plan.predicted_s,
                       transport=getattr(plan, "transport", "torch"))
            if rank == 0:  # what the prediction was made from: the measured terms, the steps
                won = plan.chosen()
                res.update(plan_context=plan.context,
                           predicted_steps=[s.to_dict() for s in won.steps] if won else None)
    if check and mode == "full":
        if kind == "yunchang":
            lo, hi = st["yc_rows"]
            o, text = out if isinstance(out, tuple) else (out, None)
            res["err"] = rel_err(o, _ref_rows(st, lo, hi))
            if text is not None:
                res["err"] = max(res["err"], rel_err(text, _ref_rows(st, 0, text.shape[1])))
        else:
            o, jo = out if st["joint"] is not None else (out, None)
            lo = T + st["img_start"]
            err = rel_err(o, _ref_rows(st, lo, lo + st["img_len"]))
            if jo is not None:
                err = max(err, rel_err(jo, _ref_rows(st, 0, T)))
            res["err"] = err
    return res


def bench_limit(rank, world_size, *, shape, seed=0, iters=3):
    """The compute half of the limit: the whole attention of `shape` (image + text tokens, all
    heads) in ONE process on all of this machine's cores, no communication (rank 0 computes, the
    other ranks wait in a barrier, so the cores are free). Returns {"t": best seconds, "cpu": that
    call's process CPU seconds, "threads"} on rank 0.
    On an emulated cluster every node shares these cores, so this is the compute bound."""
    from streamattn.kernels import attention_with_lse

    st = _inputs(rank, world_size, shape, seed)
    res = {"t": None, "cpu": None, "threads": None}
    dist.barrier()
    if rank == 0:
        cq, ck, cv = (x.transpose(1, 2) for x in st["combined"])
        threads = torch.get_num_threads()
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        torch.set_num_threads(cores)
        try:
            scale = 1.0 / math.sqrt(cq.shape[-1])
            attention_with_lse(cq, ck, cv, scale=scale)  # warm-up
            ts = []
            for _ in range(iters):
                c0, t0 = time.process_time(), time.perf_counter()
                attention_with_lse(cq, ck, cv, scale=scale)
                ts.append((time.perf_counter() - t0, time.process_time() - c0))
        finally:
            torch.set_num_threads(threads)
        t, cpu = min(ts)
        res = {"t": t, "cpu": cpu, "threads": cores}
    dist.barrier()
    return res


def group_topology(rank, world_size):
    """The world group's topology as streamattn resolves it (declared, cached or probed;
    collective): {"nodes", "ranks_per_node", "inter_bit_s" (None on one node), "source"}."""
    from streamattn.topology import resolve_topology

    t = resolve_topology(None)
    nodes = len(set(t.node))
    inter = t.inter.bandwidth_Bps * 8 if (t.inter is not None and nodes > 1) else None
    return {"nodes": nodes, "ranks_per_node": world_size // max(1, nodes), "inter_bit_s": inter,
            "source": (t.inter.source if t.inter is not None else t.provenance) or t.provenance}


def recorder_at_common_start(rank, world_size, *, seq=64, heads=4, head_dim=8):
    """(tests) bench_call's common start (_start_together) spied on for one traced and one untraced
    USP call: [whether a trace recorder was active when the start was reached] for each, in that
    order. A traced call must have its recorder (and its wrapped hooks) set up before the start."""
    global _start_together
    from streamattn import trace

    shape = {"seq": seq, "heads": heads, "head_dim": head_dim, "joint_len": 0, "batch": 1,
             "dtype": "float32"}
    cfg = {"name": "usp", "kind": "streamattn", "algorithm": "usp",
           "ulysses_degree": world_size, "ring_degree": 1}
    seen, real = [], _start_together

    def spy():
        seen.append(trace.enabled())
        return real()

    _start_together = spy
    try:
        for traced in (True, False):
            bench_call(rank, world_size, shape=shape, cfg=cfg, trace=traced)
    finally:
        _start_together = real
    return seen


def trace_hook_cost(rank, world_size):
    """Seconds one disabled streamattn.trace hook costs in this process."""
    from streamattn import trace

    return {"t": trace.hook_cost_s()}


def bench_env(rank, world_size):
    """Ready this rank's process for timing and return facts about it for the environment block:
    the C allocator as streamattn sets it at a CPU group's first call (cpu_malloc), applied here
    before anything is timed so that the limit, yunchang and streamattn all run on the same one."""
    from .. import cpu_malloc

    return {"rank": rank, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "cpu_malloc": cpu_malloc.apply(),
            "topology_env": os.environ.get("STREAMATTN_TOPOLOGY"),
            "iface": os.environ.get("STREAMATTN_BENCH_IFACE"),
            "node": os.environ.get("STREAMATTN_EMULATED_NODE")}
