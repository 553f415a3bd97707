"""RankPool tasks for issue 11: non-finite inputs, group release cycles, randomized soak."""
from __future__ import annotations

import os
import random
import time

import torch
import torch.distributed as dist

import streamattn

from ..config import override
from ..reference import rel_err

from ..sharding import shard, shard_rows, split_lengths

from .cases import last_plan, make_inputs


def _masked_reference(q, k, v, causal):
    """Float64 attention where a row only ever touches the keys it sees (so a non-finite value of a
    masked key's V stays out of it); q, k, v [B, S, H|Hk, D], default scale. Returns (out, rows
    [B, S, H] whose every visible score is -inf: the documented exception, see nonfinite.py)."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    S = q.shape[2]
    vis = torch.ones(S, S, dtype=torch.bool).tril() if causal else torch.ones(S, S, dtype=torch.bool)
    all_neg = (torch.isneginf(s) | ~vis).all(-1).transpose(1, 2)
    if not causal:
        return (torch.softmax(s, -1) @ v).transpose(1, 2), all_neg
    rows = [torch.softmax(s[:, :, i, : i + 1], -1).unsqueeze(2) @ v[:, :, : i + 1]
            for i in range(S)]
    return torch.cat(rows, 2).transpose(1, 2), all_neg


def nonfinite_attention(rank, world_size, *, algorithm, where, value, pos, seq=24, heads=4,
                        causal=False, dtype="float32", seed=0):
    """One non-finite `value` ("nan", "inf", "-inf") in q, k or v (`where`) at global token `pos`;
    the output must have NaN exactly where the float64 reference has, and match it elsewhere."""
    q, k, v, _ = make_inputs(seed=seed, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8,
                             dtype=dtype)
    {"q": q, "k": k, "v": v}[where][0, pos, 1, 3] = float(value)
    lens = split_lengths(seq, world_size)
    out = streamattn.attention(*(shard(t, lens, rank) for t in (q, k, v)), algorithm=algorithm,
                               causal=causal)
    ref, all_neg = _masked_reference(q, k, v, causal)
    ref, all_neg = shard(ref, lens, rank), shard(all_neg, lens, rank).unsqueeze(-1).expand_as(out)
    out = out.double()
    ref = ref.masked_fill(all_neg, 0.0)  # nonfinite.py: such a row returns 0, not NaN
    got_nan, ref_nan = out.isnan(), ref.isnan()
    fin, inf = torch.isfinite(ref), torch.isinf(ref)
    err = rel_err(out[fin], ref[fin]) if bool(fin.any()) else 0.0
    return {"nan_rows": int(got_nan.any(-1).sum()), "ref_nan_rows": int(ref_nan.any(-1).sum()),
            "same_nan": bool(torch.equal(got_nan, ref_nan)) and bool(torch.equal(out[inf], ref[inf])),
            "err": err,
            "plan": str(last_plan())}


# -- group release ------------------------------------------------------------------------------

def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _maps_shm() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/" in line)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def group_cycles(rank, world_size, *, cycles, transport="shm", explicit_release=False, seq=12,
                 heads=4):
    """`cycles` x (new_group -> one checked call -> destroy_process_group). Returns RSS, open
    fds, shm mappings and streamattn's live transports after a warm-up and at the end."""
    import gc

    from streamattn import api

    q, k, v, _ = make_inputs(seed=3, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    ref = streamattn.reference_attention(q, k, v, rows=shard_rows(lens, rank))
    marks, worst = {"transports_before": len(api.group_transports)}, 0.0
    with override(STREAMATTN_TRANSPORT=transport):
        warm = max(1, min(50, cycles // 10))
        for i in range(cycles):
            g = dist.new_group(list(range(world_size)))
            out = streamattn.attention(ql, kl, vl, g, algorithm="ring")
            worst = max(worst, rel_err(out, ref))
            if explicit_release:
                streamattn.release(g)
            dist.destroy_process_group(g)
            del g
            if i + 1 == warm:
                gc.collect()
                marks["warm"] = {"rss": _rss(), "fds": _fds(), "shm_maps": _maps_shm(),
                                 "transports": len(api.group_transports)}
        gc.collect()
        marks["end"] = {"rss": _rss(), "fds": _fds(), "shm_maps": _maps_shm(),
                        "transports": len(api.group_transports)}
    marks["err"] = worst
    marks["cycles"] = cycles
    return marks


def group_freed_on_destroy(rank, world_size, *, transport, algorithm="usp", call="eager"):
    """References to a group left after destroy_process_group(), with the cyclic garbage collector
    off: {"baseline": a group streamattn never saw, "used": a group that carried two calls}.
    call: "eager" (inference), "grad" (the op, forward + backward) or "bf16" (comm_dtype's
    wrapper transport). They must be equal. Anything streamattn keeps (a reference cycle is
    enough) keeps the group and its gloo worker threads alive past destroy; a group freed by the
    collector at interpreter exit then aborts the process (its worker threads need the GIL the
    finalizing interpreter holds)."""
    import gc
    import sys

    q, k, v, _ = make_inputs(seed=5, batch=1, seq=16, heads=4, kv_heads=4, head_dim=8)
    lens = split_lengths(16, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    refs = {}
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        with override(STREAMATTN_TRANSPORT=transport):
            for name, calls in (("baseline", 0), ("used", 2)):
                g = dist.new_group(list(range(world_size)))
                dist.barrier(g)
                for _ in range(calls):
                    if call == "grad":
                        x = ql.clone().requires_grad_()
                        streamattn.attention(x, kl, vl, g, algorithm=algorithm).sum().backward()
                    elif call == "bf16":
                        streamattn.attention(ql, kl, vl, g, algorithm=algorithm,
                                             comm_dtype=torch.bfloat16)
                    else:
                        streamattn.attention(ql, kl, vl, g, algorithm=algorithm)
                dist.destroy_process_group(g)
                refs[name] = sys.getrefcount(g)
                del g
    finally:
        if was:
            gc.enable()
    return refs


# -- randomized soak ----------------------------------------------------------------------------

def random_soak(rank, world_size, *, calls, seed=0, check_every=5, max_seq=4097, timeout_s=60):
    """`calls` calls with random shapes and options, drawn from one seed (identical on every rank):
    S in 1..max_seq split unevenly at random, joint tokens on/off, causal on/off, GQA, dtype,
    layout, algorithm. Every `check_every`-th call (and every small one) is checked against
    float64. Returns counts and the worst error per dtype."""
    rng = random.Random(seed)
    algos = ["auto", "ring", "ulysses", "usp"]
    worst, checked, done = {}, 0, 0
    t_start = time.monotonic()
    with override(STREAMATTN_TIMEOUT_S=timeout_s):
        for i in range(calls):
            S = rng.randint(1, max_seq) if rng.random() < 0.5 else rng.randint(1, 64)
            cuts = sorted(rng.randint(0, S) for _ in range(world_size - 1))
            lens = [b - a for a, b in zip([0] + cuts, cuts + [S])]
            hk = rng.choice([1, 2, 4])
            heads = hk * rng.choice([1, 2, 3])
            if rng.random() < 0.5:
                heads = max(heads, world_size) // hk * hk or hk
            causal = rng.random() < 0.3
            joint_len = 0 if causal or rng.random() < 0.5 else rng.randint(1, 9)
            dtype = rng.choice(["float32", "float32", "float64", "bfloat16"])
            layout = rng.choice(["bshd", "bhsd"])
            algorithm = rng.choice(algos)
            if algorithm in ("ulysses", "usp") and heads % world_size:
                algorithm = "ring" if algorithm == "ulysses" else "auto"
            kw = dict(ulysses_degree=2, ring_degree=world_size // 2) if (
                algorithm == "usp" and world_size % 2 == 0 and heads % 2 == 0) else {}
            if algorithm == "usp" and not kw:
                algorithm = "auto"
            check = i % check_every == 0 or S <= 64
            res = _soak_call(rank, world_size, seed + i, S, lens, heads, hk, causal, joint_len,
                             dtype, layout, algorithm, kw, check)
            done += 1
            if res is not None:
                checked += 1
                worst[dtype] = max(worst.get(dtype, 0.0), res)
    return {"calls": done, "checked": checked, "worst": worst,
            "seconds": time.monotonic() - t_start}


def _soak_call(rank, world_size, seed, S, lens, heads, hk, causal, joint_len, dtype, layout,
               algorithm, kw, check):
    q, k, v, joint = make_inputs(seed=seed, batch=1, seq=S, heads=heads, kv_heads=hk, head_dim=8,
                                 joint_len=joint_len, dtype=dtype)
    jkw = {}
    if joint is not None:
        jkw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    call_jkw = jkw
    if layout == "bhsd":
        ql, kl, vl = (t.transpose(1, 2) for t in (ql, kl, vl))
        call_jkw = {n: t.transpose(1, 2) for n, t in jkw.items()}
    res = streamattn.attention(ql, kl, vl, layout=layout, causal=causal, algorithm=algorithm,
                               **kw, **call_jkw)
    out, jout = res if joint is not None else (res, None)
    if layout == "bhsd":
        out = out.transpose(1, 2)
        jout = jout.transpose(1, 2) if jout is not None else None
    if tuple(out.shape) != (1, lens[rank], heads, 8):
        raise AssertionError(f"output shape {tuple(out.shape)}")
    if not check:
        return None
    ref = streamattn.reference_attention(q, k, v, causal=causal, rows=shard_rows(lens, rank), **jkw)
    ref, jref = ref if joint is not None else (ref, None)
    err = rel_err(out, ref) if out.numel() else 0.0
    if jref is not None:
        err = max(err, rel_err(jout, jref))
    tol = 1e-5 if dtype in ("float32", "float64") else 2e-2
    if not err < tol:
        raise AssertionError(f"call seed {seed}: S={S} lens={lens} heads={heads}/{hk} causal={causal} "
                             f"joint={joint_len} {dtype} {layout} {algorithm} {kw}: error {err:.3g}")
    return err


def nonfinite_sweep(rank, world_size, *, algorithm, causal, seq=18, heads=6, dtype="float32"):
    """nonfinite_attention for NaN, +Inf and -Inf in each of q, k, v at two positions."""
    out = []
    for where in ("q", "k", "v"):
        for value in ("nan", "inf", "-inf"):
            for pos in (1, seq // 2):
                r = nonfinite_attention(rank, world_size, algorithm=algorithm, where=where,
                                        value=value, pos=pos, seq=seq, heads=heads, causal=causal,
                                        dtype=dtype)
                r.update(where=where, value=value, pos=pos)
                out.append(r)
    return out


# -- failure attribution ------------------------------------------------------------------------

def die_and_exit(rank, world_size, *, dying_rank, out_dir, algorithm="ring", seq=48, heads=12,
                 silent=False):
    """dying_rank exits abruptly inside a warm call (silent=True: stops answering for longer than
    STREAMATTN_TIMEOUT_S, then exits); every other rank records what it raised (JSON in out_dir,
    written atomically) and exits at once, as a real program would, so ranks still waiting see
    their healthy-but-exited peers close. Never returns."""
    import json

    from streamattn import kernels
    from streamattn.algorithms import local, ring

    q, k, v, _ = make_inputs(seed=2, batch=1, seq=seq, heads=heads, kv_heads=heads, head_dim=8)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    streamattn.attention(ql, kl, vl, algorithm=algorithm)  # warm: plan cached
    if rank == dying_rank:
        def dying(*a, **kw):
            if silent:
                time.sleep(float(os.environ["STREAMATTN_TIMEOUT_S"]) * 3 + 2)
            os._exit(17)

        kernels.attention_with_lse = ring.attention_with_lse = local.attention_with_lse = dying
    result = {"rank": rank}
    try:
        out = streamattn.attention(ql, kl, vl, algorithm=algorithm)
        result.update(type=None, err=rel_err(out, streamattn.reference_attention(
            q, k, v, rows=shard_rows(lens, rank))))
    except Exception as exc:
        result.update(type=type(exc).__name__, error=str(exc), peer=getattr(exc, "peer", None))
    path = os.path.join(out_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    os._exit(0)


# -- topology cache ------------------------------------------------------------------------------

def probe_cached(rank, world_size, *, cache_dir, timeout_s=20):
    """probe() of the default group with the topology cache in cache_dir. Returns the topology's
    provenance and node map, or the error, and how long it took."""
    from streamattn.topology import probe

    t0 = time.monotonic()
    with override(STREAMATTN_CACHE_DIR=cache_dir, STREAMATTN_PROBE_BYTES=1 << 16):
        try:
            t = probe(timeout_s=timeout_s)
            return {"provenance": t.provenance, "node": list(t.node), "seconds": time.monotonic() - t0}
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - t0}


# -- exchanges dropped before their wait --------------------------------------------------------

def dropped_exchange(rank, world_size, *, via="raw", late_s=0.3, rounds=4, timeout_s=10):
    """A rank drops a posted exchange before its peers have sent (rank 0 at once; the others
    post late_s later), then every rank runs `rounds` more exchanges (via="raw": the transport on
    a test tag, every payload checked) or a checked attention call (via="stale": the dropped
    handle is a StaleKV state abandoned with its K/V exchange in flight). On a fresh group, so
    that a pair broken by the drop cannot hang the pool's later tasks. Returns {"bad": wrong
    payloads, "err": the call's error against float64, "in_flight": adopted works left after
    a later call began}. via="raw-shm": the raw exchanges on the node's shared-memory transport."""
    import gc

    from streamattn import api

    g = dist.new_group(list(range(world_size)))
    t = api.group_transport(g, "shm" if via == "raw-shm" else "torch")
    out = {"bad": 0, "err": 0.0}
    with override(STREAMATTN_TIMEOUT_S=timeout_s):
        if via.startswith("raw"):
            t.begin_call()
            if rank:
                time.sleep(late_s)
            peers = [p for p in range(world_size) if p != rank]
            sends = [(p, torch.full((1000,), -1.0)) for p in peers]
            pending = t.exchange(sends, [(p, torch.empty(1000)) for p in peers], tag=5)
            if rank:
                pending.wait()
            del pending
            gc.collect()
            for i in range(rounds):
                t.begin_call()
                bufs = {p: torch.empty(1000) for p in peers}
                t.exchange([(p, torch.full((1000,), float(i * 64 + rank * 8 + p))) for p in peers],
                           list(bufs.items()), tag=5).wait()
                out["bad"] += sum(int(not bool((b == i * 64 + p * 8 + rank).all()))
                                  for p, b in bufs.items())
        else:
            q, k, v, _ = make_inputs(seed=9, batch=1, seq=23, heads=4, kv_heads=2, head_dim=8)
            lens = split_lengths(23, world_size)
            ql, kl, vl = (shard(x, lens, rank) for x in (q, k, v))
            state = streamattn.StaleKV(g, warmup_steps=1)
            state.attention("l0", ql, kl, vl)       # exact; posts this step's K/V
            if rank:
                time.sleep(late_s)
            state.attention("l0", ql, kl, vl)       # waits for them, posts the next exchange
            del state
            gc.collect()
            ref = streamattn.reference_attention(q, k, v, rows=shard_rows(lens, rank))
            for algorithm in ("ring", "auto"):
                got = streamattn.attention(ql, kl, vl, g, algorithm=algorithm)
                out["err"] = max(out["err"], rel_err(got, ref))
        t.begin_call()
        out["in_flight"] = len(api.group_transport(g).in_flight)
    streamattn.release(g)
    dist.destroy_process_group(g)
    return out
