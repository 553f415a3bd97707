"""Tasks the RankPool runs on every rank (tests, demo). Each is fn(rank, world_size, **json_kwargs)
and returns JSON. Inputs are generated from a seed identically on every rank, so each rank can
build the float64 reference of the whole sequence and check its own shard."""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist

import streamattn
from streamattn.reference import reference_attention
from ..reference import rel_err
from ..sharding import shard, shard_rows, split_lengths
from .faults import break_ring_lse, reverse_folded_joint_rows

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def ping(rank, world_size):
    return {"rank": rank, "pid": os.getpid()}


def make_inputs(*, seed, batch, seq, heads, kv_heads, head_dim, joint_len=0, dtype="float32"):
    """Global tensors (bshd) in `dtype`, the same on every rank for a seed."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    q, k, v = rnd(batch, seq, heads, head_dim), rnd(batch, seq, kv_heads, head_dim), rnd(batch, seq, kv_heads, head_dim)
    joint = None
    if joint_len:
        joint = (rnd(batch, joint_len, heads, head_dim), rnd(batch, joint_len, kv_heads, head_dim),
                 rnd(batch, joint_len, kv_heads, head_dim))
    return q, k, v, joint


def check_attention(rank, world_size, *, seq, heads=8, kv_heads=None, head_dim=16, batch=1,
                    lens=None, dtype="float32", layout="bshd", causal=False, joint_len=0,
                    joint_strategy="front", algorithm="auto", ulysses_degree=None, ring_degree=None,
                    seed=0, scale=None, repeat=1, settings=None):
    """Run streamattn.attention on this rank's shard and compare with the float64 reference.
    settings: {STREAMATTN_*: value} set around the call (config.override).
    Returns {"err", "joint_err", "plan", "shape"}: errors are max|out-ref| / max|ref|."""
    from streamattn.config import override

    with override(**(settings or {})):
        return _check_attention(rank, world_size, seq=seq, heads=heads, kv_heads=kv_heads,
                                head_dim=head_dim, batch=batch, lens=lens, dtype=dtype, layout=layout,
                                causal=causal, joint_len=joint_len, joint_strategy=joint_strategy,
                                algorithm=algorithm, ulysses_degree=ulysses_degree,
                                ring_degree=ring_degree, seed=seed, scale=scale, repeat=repeat)


def _check_attention(rank, world_size, *, seq, heads, kv_heads, head_dim, batch, lens, dtype, layout,
                     causal, joint_len, joint_strategy, algorithm, ulysses_degree, ring_degree, seed,
                     scale, repeat):
    kv_heads = kv_heads or heads
    lens = lens or split_lengths(seq, world_size)
    q, k, v, joint = make_inputs(seed=seed, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype=dtype)
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2], joint_strategy=joint_strategy)
    ref = reference_attention(q, k, v, scale=scale, causal=causal, rows=shard_rows(lens, rank), **kw)
    ref, jref = ref if joint is not None else (ref, None)

    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    if layout == "bhsd":
        ql, kl, vl = (t.transpose(1, 2).contiguous() for t in (ql, kl, vl))
        kw = {n: (t.transpose(1, 2).contiguous() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    for _ in range(repeat):
        res = streamattn.attention(ql, kl, vl, layout=layout, causal=causal, scale=scale,
                                   algorithm=algorithm, ulysses_degree=ulysses_degree,
                                   ring_degree=ring_degree, **kw)
    out, jout = res if joint is not None else (res, None)
    if layout == "bhsd":
        out = out.transpose(1, 2)
        jout = jout.transpose(1, 2) if jout is not None else None
    assert out.dtype == q.dtype, f"output dtype {out.dtype} != input dtype {q.dtype}"
    assert tuple(out.shape) == tuple(shard(q, lens, rank).shape), f"output shape {tuple(out.shape)}"
    plan = last_plan() if world_size > 1 else None
    result = {"err": rel_err(out, ref), "joint_err": None,
              "plan": str(plan) if plan else "Plan(local)", "shape": list(out.shape),
              "algorithm": plan.algorithm if plan else "local",
              "ulysses_degree": plan.ulysses_degree if plan else 1,
              "ring_degree": plan.ring_degree if plan else 1}
    if jref is not None:
        result["joint_err"] = rel_err(jout, jref)
        result["joint_digest"] = float(jout.double().sum())
    return result


def last_plan():
    from streamattn import api

    return api.last_plan()[1]


def bad_input(rank, world_size, *, bad_rank, kind, seq=24, heads=8, head_dim=16):
    """One rank passes different heads / dtype / layout / malformed shapes; every rank must raise
    ValueError. Returns {"type", "error", "seconds"}."""
    q, k, v, _ = make_inputs(seed=1, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=head_dim)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank).contiguous() for t in (q, k, v))
    layout = "bshd"
    if rank == bad_rank:
        if kind == "heads":
            ql, kl, vl = ql[:, :, : heads // 2], kl[:, :, : heads // 2], vl[:, :, : heads // 2]
        elif kind == "dtype":
            ql, kl, vl = ql.double(), kl.double(), vl.double()
        elif kind == "layout":
            ql, kl, vl = (t.transpose(1, 2).contiguous() for t in (ql, kl, vl))
            layout = "bhsd"
        elif kind == "ndim":
            ql = ql[0]
        elif kind == "head_dim":
            ql, kl, vl = ql[..., :8], kl[..., :8], vl[..., :8]
    t0 = time.monotonic()
    try:
        streamattn.attention(ql, kl, vl, layout=layout)
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "seconds": time.monotonic() - t0}
    return {"type": None, "error": None, "seconds": time.monotonic() - t0}


def die_mid_call(rank, world_size, *, dying_rank, algorithm="ring", seq=64, heads=12):
    """dying_rank exits abruptly inside the call; the others must raise an error naming it."""
    q, k, v, _ = make_inputs(seed=2, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=16)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    streamattn.attention(ql, kl, vl, algorithm=algorithm)  # warm: plan cached, metadata agreed
    if rank == dying_rank:
        from streamattn import kernels

        def dying(*a, **kw):
            os._exit(17)

        kernels.attention_with_lse = dying
        import streamattn.algorithms.ring as ring_mod
        import streamattn.algorithms.local as local_mod

        ring_mod.attention_with_lse = dying
        local_mod.attention_with_lse = dying
    t0 = time.monotonic()
    try:
        out = streamattn.attention(ql, kl, vl, algorithm=algorithm)
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "seconds": time.monotonic() - t0,
                "peer": getattr(exc, "peer", None)}
    # One-sided puts can deliver everything a rank needs before the peer dies: then its result
    # must be exact, never silently wrong.
    ref = reference_attention(q, k, v, rows=shard_rows(lens, rank))
    return {"type": None, "error": None, "seconds": time.monotonic() - t0, "peer": None,
            "err": rel_err(out, ref)}


def zero_lse_ring(rank, world_size, *, seq=40, heads=4):
    """Negative control: a kernel that returns LSE = 0 (the known CPU bug of a peer library) must
    make the ring visibly wrong, proving the checks can fail."""
    undo = break_ring_lse()
    try:
        return check_attention(rank, world_size, seq=seq, heads=heads, algorithm="ring", seed=5)
    finally:
        undo()


def reversed_fold_rows(rank, world_size, *, seq=29, heads=4, joint_len=9):
    """Negative control of the folded-joint path: its joint output rows put in the wrong order
    must fail the same joint check (STREAMATTN_JOINT_FOLD=always makes the call fold)."""
    undo = reverse_folded_joint_rows()
    try:
        return check_attention(rank, world_size, seq=seq, heads=heads, joint_len=joint_len, seed=6,
                               settings={"STREAMATTN_JOINT_FOLD": "always"})
    finally:
        undo()


def unordered_joint_all(rank, world_size, *, seq=37, heads=4, joint_len=9):
    """Negative control of the all-joint-queries ring (STREAMATTN_JOINT_ALL=always): its joint
    partials merged in arrival order (each member's own ring order) instead of member order must
    give joint outputs that differ between the ranks (still exact to rounding)."""
    from streamattn.algorithms import ring

    real = ring.in_member_order
    ring.in_member_order = lambda parts: [p for _, p in parts]
    try:
        return check_attention(rank, world_size, seq=seq, heads=heads, joint_len=joint_len, seed=7,
                               algorithm="ring", settings={"STREAMATTN_JOINT_ALL": "always"})
    finally:
        ring.in_member_order = real


def traced_with_spy(rank, world_size, module, name, wrap, **kw):
    """check_attention(**kw) once, then once traced (streamattn.trace) with module.name replaced
    by wrap(the real one): (the trace recorder, that call's result)."""
    from streamattn import trace

    check_attention(rank, world_size, **kw)
    real = getattr(module, name)
    setattr(module, name, wrap(real))
    try:
        with trace.recording() as rec:
            res = check_attention(rank, world_size, **kw)
    finally:
        setattr(module, name, real)
    return rec, res


def posts_before_first_kernel(rank, world_size, *, seq=64, heads=4, head_dim=16, joint_len=6,
                              joint_strategy="front", algorithm="ring", ulysses_degree=None,
                              ring_degree=None, settings=None):
    """One traced call (after an untraced one): the messages this rank posted before the ring's
    first attention kernel began, [[peer, bytes], ...] (streamattn.trace events)."""
    import time

    from streamattn.algorithms import ring

    kernel_starts = []

    def timed(real):
        def kernel(*a, **k):
            kernel_starts.append(time.perf_counter())
            return real(*a, **k)
        return kernel

    rec, res = traced_with_spy(rank, world_size, ring, "attention_with_lse", timed, seq=seq,
                               heads=heads, head_dim=head_dim, joint_len=joint_len,
                               joint_strategy=joint_strategy, algorithm=algorithm,
                               ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                               settings=settings)
    first = min(kernel_starts, default=float("inf")) - rec.start
    return {"posts": [[e[2], e[4]] for e in rec.events if e[0] == "post" and e[1] < first],
            "kernels": len(kernel_starts), "err": res["err"], "plan": res["plan"]}


def posts_and_waits(rank, world_size, **kw):
    """One traced call of check_attention(**kw) (after an untraced one): {"posts": [[peer, bytes,
    t], ...], "waits": [[peer, t0], ...], "err"} in the order they happened (streamattn.trace;
    peer None: a collective's wait, or USP's for its Ulysses all-to-all, usp.scatter_landed)."""
    from streamattn import trace
    from streamattn.algorithms import usp

    def as_wait(real):  # USP's wait for its Ulysses all-to-all, as a wait on no peer
        def landed(*a):
            with trace.span("wait"):
                return real(*a)
        return landed

    rec, res = traced_with_spy(rank, world_size, usp, "scatter_landed", as_wait, **kw)
    return {"posts": [[e[2], e[4], e[1]] for e in rec.events if e[0] == "post"],
            "waits": [[s[3], s[1]] for s in rec.spans if s[0] == "wait"],
            "err": res["err"]}


def cpu_plan_terms(rank, world_size, *, seq=256, heads=8, head_dim=16, nodes=1):
    """The numbers a CPU group measures when it plans a shape (planner.agreed_calibration): the
    synchronising-exchange cost, the core share and the CPU per network byte, as this rank got
    them, with the group described as `nodes` nodes (the ranks all run on this machine)."""
    import torch

    from streamattn import api
    from streamattn.planner import agreed_calibration
    from streamattn.problem import Problem
    from streamattn.tags import RATE
    from streamattn.topology import usable_cores

    from streamattn.topology import resolve_topology

    transport = api.group_transport(None)  # the group's two-sided transport
    lens = split_lengths(seq, world_size)
    problem = Problem(1, heads, heads, head_dim, torch.float32, tuple(lens), head_dim ** -0.5)
    topo = resolve_topology(topology=f"{nodes}x{world_size // nodes}")
    got = agreed_calibration(transport, problem, topo, RATE)
    return {"sync_s": got["sync_s"], "overlap": got["overlap"], "net_cpu": got["net_cpu"],
            "cores": usable_cores(),
            "threads": torch.get_num_threads(), "shapes": len(got["block_rates"])}


def group_terms_measured_once(rank, world_size, *, seq=256, heads=8, head_dim=16, plans=3):
    """How often planning `plans` shapes on a fresh transport measures the synchronising-exchange
    cost (planner.measure_sync), and the sync_s each planning got."""
    import torch

    from streamattn import api, planner
    from streamattn.problem import Problem
    from streamattn.tags import RATE
    from streamattn.topology import resolve_topology

    api.release(None)  # a fresh transport: the group's terms are measured once per transport
    transport = api.group_transport(None)
    topo = resolve_topology(topology=f"1x{world_size}")
    calls, real = [], planner.measure_sync

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    planner.measure_sync = counted
    try:
        got = []
        for i in range(plans):
            lens = split_lengths(seq + 8 * i, world_size)
            problem = Problem(1, heads, heads, head_dim, torch.float32, tuple(lens), head_dim ** -0.5)
            got.append(planner.agreed_calibration(transport, problem, topo, RATE)["sync_s"])
    finally:
        planner.measure_sync = real
    return {"measured": len(calls), "sync_s": got}


def calibrated_shapes(rank, world_size, *, requests, cache_dir, seq=512, heads=8, head_dim=16):
    """planner.agreed_calibration for each request ({"algorithm", "ulysses_degree", ...}) in turn,
    with the calibration cache in `cache_dir` (an empty directory): [{"timed": distinct block
    shapes the kernel was timed at, "rated": shapes in block_rates}] per request."""
    from streamattn import api, calibration
    from streamattn.config import override
    from streamattn.planner import agreed_calibration
    from streamattn.problem import Problem
    from streamattn.tags import RATE
    from streamattn.topology import resolve_topology

    transport = api.group_transport(None)
    problem = Problem(1, heads, heads, head_dim, torch.float32, tuple(split_lengths(seq, world_size)),
                      head_dim ** -0.5)
    topo = resolve_topology(topology=f"1x{world_size}")
    real, timed, out = calibration.time_block, set(), []

    def counting(shape, *a, **kw):
        timed.add(tuple(shape))
        return real(shape, *a, **kw)

    calibration.time_block = counting
    try:
        with override(STREAMATTN_CACHE_DIR=cache_dir):
            for req in requests:
                timed.clear()
                got = agreed_calibration(transport, problem, topo, RATE, **req)
                out.append({"timed": len(timed), "rated": len(got.get("block_rates", {}))})
    finally:
        calibration.time_block = real
    return out


def timed_attention(rank, world_size, *, seq, heads, head_dim, joint_len=0, batch=1, algorithm="auto",
                    ulysses_degree=None, ring_degree=None, iters=5, warmup=1, dtype="float32", seed=0):
    """Median latency (s) of streamattn.attention over iters, plus the max error vs float64."""
    res = check_attention(rank, world_size, seq=seq, heads=heads, head_dim=head_dim, batch=batch,
                          joint_len=joint_len, algorithm=algorithm, ulysses_degree=ulysses_degree,
                          ring_degree=ring_degree, dtype=dtype, seed=seed)
    lens = split_lengths(seq, world_size)
    q, k, v, joint = make_inputs(seed=seed, batch=batch, seq=seq, heads=heads, kv_heads=heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype=dtype)
    ql, kl, vl = (shard(t, lens, rank).contiguous() for t in (q, k, v))
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        t0 = time.perf_counter()
        streamattn.attention(ql, kl, vl, algorithm=algorithm, ulysses_degree=ulysses_degree,
                             ring_degree=ring_degree, **kw)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a call is as slow as its slowest rank
        if i >= warmup:
            times.append(float(dt))
    times.sort()
    res["latency_s"] = times[len(times) // 2]
    return res


def count_metadata_exchanges(rank, world_size, *, calls=5, seq=30, heads=6):
    """How many metadata exchanges `calls` identical calls make (must be 1)."""
    from streamattn.transport.base import Transport

    q, k, v, _ = make_inputs(seed=3, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    real, n = Transport.all_gather_vector, [0]

    def counting(self, *a, **kw):
        n[0] += 1
        return real(self, *a, **kw)

    Transport.all_gather_vector = counting
    try:
        streamattn.attention(ql, kl, vl, scale=0.123)  # a fresh key for this task
        first = n[0]
        for _ in range(calls - 1):
            streamattn.attention(ql, kl, vl, scale=0.123)
    finally:
        Transport.all_gather_vector = real
    return {"first": first, "later": n[0] - first}


def silent_peer(rank, world_size, *, silent_rank, seq=16, heads=4, warm=False, exits=False):
    """silent_rank never joins the call; the others must time out naming it. warm: every rank
    makes one call first (so the call's signature goes through the warm transport, the shm
    signature board); exits: the silent rank's process exits instead (os._exit(17))."""
    q, k, v, _ = make_inputs(seed=4, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    if warm:
        streamattn.attention(ql, kl, vl, algorithm="ring")
    if rank == silent_rank:
        if exits:
            os._exit(17)
        time.sleep(float(os.environ.get("STREAMATTN_TIMEOUT_S", "3")) + 2)
        return {"type": None, "error": None, "seconds": 0.0}
    t0 = time.monotonic()
    try:
        streamattn.attention(ql, kl, vl, algorithm="ring")
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "seconds": time.monotonic() - t0,
                "peer": getattr(exc, "peer", None)}
    return {"type": None, "error": None, "seconds": time.monotonic() - t0}


def cpu_malloc_state(rank, world_size, *, seq=21, heads=4):
    """The C allocator's state (streamattn.cpu_malloc) after a call on the default CPU group."""
    from streamattn import cpu_malloc

    q, k, v, _ = make_inputs(seed=3, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    streamattn.attention(*(shard(t, lens, rank).contiguous() for t in (q, k, v)))
    return {"state": cpu_malloc.state()}


def core_turns_state(rank, world_size, *, seq=21, heads=4):
    """After a call on the default CPU group: whether its shm transport found the machine's cores
    oversubscribed, whether this process's CPU kernels yield first (streamattn.core_turns), and
    how many times the next call yielded."""
    from streamattn import api, core_turns

    q, k, v, _ = make_inputs(seed=4, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    mine = [shard(t, lens, rank).contiguous() for t in (q, k, v)]
    streamattn.attention(*mine)
    transport = api.group_transport(None, api.last_plan()[1].transport)
    yields, real = [0], core_turns.os.sched_yield

    def counted():
        yields[0] += 1
        real()
    core_turns.os.sched_yield = counted
    try:
        streamattn.attention(*mine, algorithm="ring")
    finally:
        core_turns.os.sched_yield = real
    return {"oversubscribed": getattr(transport, "oversubscribed", None),
            "shared": core_turns.shared(), "yields": yields[0]}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(rank, world_size, *, calls=10000, seq=24, heads=4, algorithm="usp"):
    """Many calls with the same shape (and a few shapes cycling): resident memory must stay flat.
    Returns RSS (bytes) after warm-up and at the end."""
    import gc

    shapes = [seq, seq + world_size, seq + 2 * world_size]
    inputs = []
    for i, s in enumerate(shapes):
        q, k, v, joint = make_inputs(seed=9 + i, batch=1, seq=s, heads=heads, kv_heads=heads // 2,
                                     head_dim=8, joint_len=3)
        lens = split_lengths(s, world_size)
        inputs.append([shard(t, lens, rank).contiguous() for t in (q, k, v)] + list(joint))
    algo = algorithm if world_size % 2 == 0 or algorithm != "usp" else "ring"
    u = 2 if algo == "usp" and world_size > 2 else None
    warm = min(1000, calls // 10)
    rss_warm = None
    for i in range(calls):
        ql, kl, vl, jq, jk, jv = inputs[i % len(inputs)]
        streamattn.attention(ql, kl, vl, algorithm=algo if u or algo != "usp" else "auto",
                             ulysses_degree=u, joint_q=jq, joint_k=jk, joint_v=jv)
        if i + 1 == warm:
            gc.collect()
            rss_warm = _rss_bytes()
    gc.collect()
    return {"rss_warm": rss_warm, "rss_end": _rss_bytes(), "calls": calls}


def cyclic_garbage(rank, world_size, *, requests, seq=37, heads=8, kv_heads=4, head_dim=8):
    """What one call of each request leaves to the cyclic garbage collector (objects kept alive
    only by reference cycles: their tensors stay allocated until a full collection, which at
    large shapes is tens of calls later). requests: [{"algorithm", "ulysses_degree",
    "ring_degree", "joint_len", "causal", "backward", "stale", "settings"}] (missing keys:
    defaults; "stale": the stale_kv path, one StaleKV state per request).
    Each request is called twice first (planning and warm-up), then once with the collector
    saving what it finds. Returns {request index: sorted type names of the garbage}."""
    import gc

    from streamattn.config import override

    out = {}
    for i, req in enumerate(requests):
        jl, bwd = req.get("joint_len", 0), req.get("backward", False)
        q, k, v, joint = make_inputs(seed=3 + i, batch=1, seq=seq, heads=heads, kv_heads=kv_heads,
                                     head_dim=head_dim, joint_len=jl)
        lens = split_lengths(seq, world_size)
        ql, kl, vl = (shard(t, lens, rank).contiguous().requires_grad_(bwd) for t in (q, k, v))
        kw = dict(algorithm=req.get("algorithm", "auto"), ulysses_degree=req.get("ulysses_degree"),
                  ring_degree=req.get("ring_degree"), causal=req.get("causal", False))
        if req.get("stale"):  # the approximate path: its own exchange of the previous step's K/V
            kw = dict(stale_kv=streamattn.StaleKV(None, warmup_steps=1), layer="l0")
        if jl:
            kw.update(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])

        def call():
            o = streamattn.attention(ql, kl, vl, **kw)
            o = o[0] if isinstance(o, tuple) else o
            if bwd:
                o.sum().backward()

        with override(**req.get("settings", {})):
            call()
            call()
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                call()
                gc.collect()
                out[i] = sorted(type(o).__name__ for o in gc.garbage)
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    return out


def overhead_p1(rank, world_size, *, seq=4096, heads=24, head_dim=64, iters=20):
    """P=1 overhead: streamattn.attention (group of one) against the local kernel called directly,
    same inputs, in back-to-back pairs whose order alternates. The second of a pair runs a few
    percent slower here, so the ratio is the geometric mean of two medians of op / kernel over
    pairs, one per order: a slow stretch of the machine (a neighbour, a frequency step) lands on
    both halves of the pairs it covers instead of on whichever of two separate medians it hit.
    Returns the medians of both times, the ratio, and the two per-order medians."""
    from streamattn.kernels import attention_with_lse

    if iters < 2:
        raise ValueError(f"overhead_p1 needs iters >= 2 (one pair in each order), got {iters}")

    q, k, v, _ = make_inputs(seed=0, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=head_dim)
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    scale = head_dim ** -0.5
    group = dist.new_group([rank]) if dist.is_initialized() else None

    def kernel():
        attention_with_lse(qb, kb, vb, scale=scale)

    def op():
        streamattn.attention(q, k, v, group)

    times = {kernel: [], op: []}
    for i in range(iters + 2):
        for fn in ((kernel, op) if i % 2 else (op, kernel)):
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                times[fn].append(time.perf_counter() - t0)

    median = statistics.median_high  # the middle sample (the upper one of an even count)
    pairs = [b / a for a, b in zip(times[kernel], times[op])]
    by_order = (median(pairs[0::2]), median(pairs[1::2]))
    return {"kernel_s": median(times[kernel]), "streamattn_s": median(times[op]),
            "ratio": (by_order[0] * by_order[1]) ** 0.5, "ratio_by_order": by_order}


def _shm_transport(group=None, node_of=None, slot_bytes=4096):
    """A OneSidedTransport on shared memory over `group` (default WORLD), with a declared node map
    (default: one node)."""
    from streamattn.transport import TorchTransport
    from streamattn.transport.onesided import OneSidedTransport
    from streamattn.transport.shm import ShmHeap

    return OneSidedTransport(TorchTransport(group, node_of=node_of), ShmHeap, slot_bytes=slot_bytes)


def shm_rounds(rank, world_size, *, rounds=10000, slot_bytes=4096, groups=2):
    """Ordering and signal semantics of the one-sided protocol: `rounds` exchanges with every node
    peer on `groups` process groups at once, sizes from 0 to several chunks; every payload encodes
    (group, round, src, dst) and is checked. Returns counts."""
    pgs = [dist.new_group(list(range(world_size))) for _ in range(groups)]
    ts = [_shm_transport(pg, slot_bytes=slot_bytes) for pg in pgs]
    sizes = [0, 1, 7, 1024, slot_bytes // 8, slot_bytes // 8 + 3, 3 * slot_bytes // 8 + 5]
    checked = 0
    for i in range(rounds):
        pend, expect = [], []
        for gi, t in enumerate(ts):
            n = sizes[(i + gi) % len(sizes)]
            sends, recvs = [], []
            for p in range(world_size):
                if p == rank:
                    continue
                val = float(((gi * 7 + i) * 16 + rank) * 16 + p)
                sends.append((p, torch.full((n,), val, dtype=torch.float64)))
                buf = torch.empty(n, dtype=torch.float64)
                recvs.append((p, buf))
                expect.append((buf, float(((gi * 7 + i) * 16 + p) * 16 + rank)))
            pend.append(t.exchange(sends, recvs, tag=5))
        for p in pend[::-1]:  # complete in the other order than posted
            p.wait()
        for buf, val in expect:
            if buf.numel() and not bool((buf == val).all()):
                raise AssertionError(f"round {i}: wrong payload {buf[:3].tolist()} != {val}")
            checked += 1
    for t in ts:
        t.close()
    return {"checked": checked, "chunks_sent": sum(sum(t.sent) for t in ts)}


def parts_rounds(rank, world_size, *, node_of=None, slot_bytes=4096, transport="shm", rounds=6,
                 swap_control=False):
    """Transport.exchange_parts: every rank sends every peer a Parts of three strided views (a head
    slice, a transposed slice, a row block) of a tensor whose values encode (round, src, dst,
    position), sized from one element to several slots, and receives into strided views of its
    own buffers in the same shapes; every element is checked. Returns the wrong messages, the
    bytes counted against the packed size, and how many Parts were packed (staged) rather than
    moved directly. swap_control (negative control): receives into the parts in another order."""
    from streamattn.transport import TorchTransport
    from streamattn.transport import base as tbase

    t = _shm_transport(node_of=node_of, slot_bytes=slot_bytes) if transport == "shm" else \
        TorchTransport(None, node_of=node_of)
    packed, real_pack = [0], tbase.Parts.pack

    def counting_pack(self):
        packed[0] += 1
        return real_pack(self)

    def source(i, src, dst, n):
        base = torch.arange(2 * n * 6 * 3, dtype=torch.float64).view(2, n, 6, 3)
        return base + 1e6 * (((i * 16) + src) * 16 + dst)

    def views(x):  # three strided parts of a [2, n, 6, 3] tensor
        return [x[:, :, 1:4], x[:, :, 4:].transpose(0, 1), x[1, :, :1]]

    tbase.Parts.pack = counting_pack
    wrong, counted, expected_bytes, sizes = [], 0, 0, []
    try:
        for i in range(rounds):
            # a message is 33 n float64: from one element per part up to 2.6 slots
            n = [1, 5, slot_bytes // 264, slot_bytes // 100][i % 4]
            sizes.append(33 * n * 8)
            sends, recvs, checks = [], [], []
            for p in range(world_size):
                if p == rank:
                    continue
                sends.append((p, tbase.Parts(views(source(i, rank, p, n)))))
                expected_bytes += sum(v.numel() for v in views(source(i, rank, p, n))) * 8
                dst = torch.full((2, n, 6, 3), -1.0, dtype=torch.float64)
                parts = views(dst)
                if swap_control:
                    parts = [parts[1], parts[0], parts[2]] if parts[0].numel() == parts[1].numel() \
                        else parts[::-1]
                recvs.append((p, tbase.Parts([x for x in parts])))
                checks.append((p, dst))
            before = t.counters.intra + t.counters.inter
            t.exchange_parts(sends, recvs, tag=5).wait()
            counted += t.counters.intra + t.counters.inter - before
            for p, dst in checks:
                want = torch.full_like(dst, -1.0)
                for a, b in zip(views(want), views(source(i, p, rank, n))):
                    a.copy_(b)
                if not torch.equal(dst, want):
                    wrong.append([i, p])
    finally:
        tbase.Parts.pack = real_pack
        if transport == "shm":
            t.close()
    return {"wrong": wrong, "counted": counted, "expected_bytes": expected_bytes, "packed": packed[0],
            "message_bytes": sizes}


def signature_rows(rank, world_size, *, node_of, calls=5, words=9, skew_rank=None):
    """OneSidedTransport.all_gather_small on a declared node map: `calls` gathers of a vector that
    encodes (rank, call); returns the (call, rank) rows that did not come back as expected, and
    how many messages this rank sent to other nodes. skew_rank (negative control): that rank
    sends its row + 1, which every rank must see."""
    from streamattn import tags
    t = _shm_transport(node_of=node_of)
    base = t.base
    real, sent = base.exchange, [0]

    def counting(sends, recvs, tag, count=True):
        sent[0] += sum(1 for p, _ in sends if node_of[p] != node_of[rank])
        return real(sends, recvs, tag, count)

    base.exchange = counting
    wrong = []
    try:
        for c in range(calls):
            row = lambda g: [g * 1000 + c * 10 + i for i in range(words)]  # noqa: E731
            mine = torch.tensor(row(rank), dtype=torch.int64) + (rank == skew_rank)
            got = t.all_gather_small(mine, tags.SIG)
            wrong += [(c, g) for g in range(world_size) if got[g].tolist() != row(g)]
    finally:
        base.exchange = real
        t.close()
    return {"wrong": wrong, "remote_sends": sent[0]}


def signature_silent_rank(rank, world_size, *, node_of, silent_rank):
    """A warm OneSidedTransport.all_gather_small on a declared node map, then `silent_rank` stays
    away from the next one: every other rank reports what it raised, whom it named, and when."""
    from streamattn import tags
    t = _shm_transport(node_of=node_of)
    base = t.base
    vec = torch.tensor([rank, 1, 2], dtype=torch.int64)
    base.begin_call()
    t.all_gather_small(vec, tags.SIG)
    if rank == silent_rank:
        from streamattn.transport.onesided import LEADER_GRACE_S

        time.sleep(float(os.environ.get("STREAMATTN_TIMEOUT_S", "3")) + 2 * LEADER_GRACE_S + 2)
        return {"type": None, "error": None, "peer": None, "seconds": 0.0}
    base.begin_call()
    t0 = time.monotonic()
    try:
        t.all_gather_small(vec, tags.SIG)
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "peer": getattr(exc, "peer", None),
                "seconds": time.monotonic() - t0}
    return {"type": None, "error": None, "peer": None, "seconds": time.monotonic() - t0}


def shm_silent_peer(rank, world_size, *, silent_rank):
    """A peer that never signals: the waiting ranks time out naming it."""
    t = _shm_transport()
    if rank == silent_rank:
        time.sleep(float(os.environ.get("STREAMATTN_TIMEOUT_S", "3")) + 2)
        return {"type": None, "error": None, "peer": None}
    peer = silent_rank
    t0 = time.monotonic()
    try:
        t.exchange([], [(peer, torch.empty(10))], tag=9).wait()
    except Exception as exc:
        return {"type": type(exc).__name__, "error": str(exc), "peer": getattr(exc, "peer", None),
                "seconds": time.monotonic() - t0}
    return {"type": None, "error": None, "peer": None}


def shm_blocked_wait(rank, world_size, *, delay=0.3, bells=True):
    """Rank 0 sends one message `delay` seconds late to every other rank, whose wait runs as on an
    oversubscribed node. Returns this rank's doorbell state, and for the waiters the looks their
    wait took (time.sleep and heap.sleep_until_woken calls), its CPU time and when it returned;
    rank 0 returns when it sent (CLOCK_MONOTONIC: one host)."""
    from streamattn.transport import onesided

    t = _shm_transport()
    t.oversubscribed = True
    usable = t.heap.bell is not None and t.heap.bell.usable
    if not bells and t.heap.bell is not None:
        t.heap.bell.usable = False
    out = {"usable": usable}
    try:
        dist.barrier()
        if rank == 0:
            time.sleep(delay)
            out["sent"] = time.monotonic()
            t.exchange([(p, torch.full((64,), 1.0)) for p in range(1, world_size)], [], tag=11).wait()
        else:
            looks = [0]
            real_sleep, real_woken = onesided.time.sleep, t.heap.sleep_until_woken

            def counted(f):
                def g(*a):
                    looks[0] += 1
                    return f(*a)
                return g
            onesided.time.sleep, t.heap.sleep_until_woken = counted(real_sleep), counted(real_woken)
            buf = torch.zeros(64)
            c0 = time.thread_time()
            try:
                t.exchange([], [(0, buf)], tag=11).wait()
            finally:
                onesided.time.sleep, t.heap.sleep_until_woken = real_sleep, real_woken
            out.update(done=time.monotonic(), cpu=time.thread_time() - c0, looks=looks[0],
                       ok=bool((buf == 1.0).all()))
        dist.barrier()
    finally:
        t.close()
    return out


def shm_hold(rank, world_size, *, seconds=30.0):
    """Build an shm transport, then block: the test kills a rank with SIGKILL meanwhile."""
    t = _shm_transport()
    print("shm ready", flush=True)
    time.sleep(seconds)
    t.close()
    return {"ok": True}


def bytes_per_call(rank, world_size, *, seq, heads, head_dim, algorithm, ulysses_degree=None,
                   ring_degree=None, batch=1, dtype="float32", settings=None, joint_len=0,
                   comm_dtype=None):
    """Bytes this rank sends in one call (after a warm-up call), per link class; settings:
    {STREAMATTN_*: value} set around the calls (config.override); joint_len: text tokens;
    comm_dtype: "bfloat16" for the reduced-precision wire, or None."""
    from streamattn.config import override

    with override(**(settings or {})):
        return _bytes_per_call(rank, world_size, seq=seq, heads=heads, head_dim=head_dim,
                               algorithm=algorithm, ulysses_degree=ulysses_degree,
                               ring_degree=ring_degree, batch=batch, dtype=dtype,
                               joint_len=joint_len, comm_dtype=comm_dtype)


def _bytes_per_call(rank, world_size, *, seq, heads, head_dim, algorithm, ulysses_degree,
                    ring_degree, batch, dtype, joint_len, comm_dtype):
    from streamattn import api

    q, k, v, joint = make_inputs(seed=6, batch=batch, seq=seq, heads=heads, kv_heads=heads,
                                 head_dim=head_dim, dtype=dtype, joint_len=joint_len)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    kw = dict(algorithm=algorithm, ulysses_degree=ulysses_degree, ring_degree=ring_degree)
    if joint is not None:
        kw.update(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
    if comm_dtype is not None:
        kw.update(comm_dtype=getattr(torch, comm_dtype))
    streamattn.attention(ql, kl, vl, **kw)
    api.reset_byte_counters()
    streamattn.attention(ql, kl, vl, **kw)
    out = api.byte_counters()
    out["plan"] = str(last_plan())
    return out


def triton_usage(rank, world_size, **kw):
    """check_attention with every Triton entry point counted (STREAMATTN_TRITON=1 and
    TRITON_INTERPRET=1 in the environment): proves the library, not only the tests, calls them."""
    from streamattn import triton_kernels as tk

    names = ("attention_fwd", "merge_", "pack_seq", "unpack_heads", "pack_heads", "unpack_seq")
    calls = {n: 0 for n in names}
    real = {n: getattr(tk, n) for n in names}

    def counted(name):
        def wrapper(*a, **k):
            calls[name] += 1
            return real[name](*a, **k)
        return wrapper

    for n in names:
        setattr(tk, n, counted(n))
    try:
        res = check_attention(rank, world_size, **kw)
    finally:
        for n in names:
            setattr(tk, n, real[n])
    res["calls"] = calls
    return res
