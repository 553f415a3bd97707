"""The eager call behind `streamattn.attention` (streamattn.dispatch picks it for inference calls).

Per call: local checks → (first call of a shape) metadata exchange, agreement check and plan →
the plan's algorithm over the group's transport → output in the caller's layout.
"""
from __future__ import annotations

import dataclasses
import logging
import itertools
import math
import time

import torch
import torch.distributed as dist

from . import agreement, algorithms, autotune, cpu_malloc, tags
from .config import joint_all_mode, joint_fold_mode, ring_chunks_override, ulysses_chunks_override
from .planner import make_plan
from .problem import Problem
from .transport import TorchTransport, choose_transport, make_transport
from .transport.cast import CastTransport, check_comm_dtype
from .validate import DTYPES, ZIGZAG, check_agreement, check_local, encode

log = logging.getLogger("streamattn")

TAG_META, TAG_RATE, TAG_AUTOTUNE = tags.META, tags.RATE, tags.AUTOTUNE
group_transports: dict = {}   # id(group) -> (group, {name: transport}); see release()
plan_cache = agreement.PlanCache()  # (group token, agreed call key) -> (Problem, Plan)
tunings = autotune.Tunings()  # autotune trials in progress, by (group token, agreed call key)
_tokens = itertools.count(1)


def attention(q, k, v, group=None, *, layout="bshd", causal=False, scale=None, joint_q=None,
              joint_k=None, joint_v=None, joint_strategy="front", algorithm="auto",
              ulysses_degree=None, ring_degree=None, stale_kv=None, layer=None,
              seq_layout="contiguous", comm_dtype=None):
    """Exact attention over a sequence sharded across the ranks of `group`.

    q: this rank's shard, [B, S_local, H, D] (layout "bshd") or [B, H, S_local, D] ("bhsd").
    k, v: [B, S_local, Hk, D] (or bhsd), Hk dividing H (GQA/MQA). Shards are in rank order; S_local
    may differ between ranks (e.g. 4097 tokens on 4 ranks: 1025/1024/1024/1024).
    joint_q/k/v: text tokens replicated on every rank, [B, T, H|Hk, D] in the same layout, placed in
    front of ("front") or behind ("rear") the image sequence; then the call returns
    (out, joint_out) with joint_out identical on every rank.
    causal: mask by global position (rank order). scale: default 1/sqrt(D).
    seq_layout: "contiguous" (rank r holds the r-th slice) or "zigzag" (load-balanced causal: rank
    r holds chunks r and 2P-1-r of 2P; shard with streamattn.zigzag_shard; runs as a ring).
    algorithm: "auto" | "ulysses" | "ring" | "usp" | "torus"; ulysses_degree / ring_degree force a
    split (for "torus": ulysses_degree = ranks per node, ring_degree = the ring factor).
    group=None: the default group, or a group of one if torch.distributed is not initialised.
    stale_kv: opt-in, approximate: a streamattn.stale.StaleKV (per-layer state; `layer` names the
    layer) that, after its warm-up steps, attends the other ranks' K/V of the previous diffusion
    step while this step's K/V travel in the background.
    comm_dtype: opt-in, approximate, inference only: torch.bfloat16 sends float32 payloads as
    bfloat16 (half the bytes; about 1e-2 relative error, see streamattn.transport.cast); None
    (default) is exact. Must be the same on every rank (part of the per-call signature).
    Returns out in q's layout, shape and dtype.
    """
    wants_grad = needs_grad(q, k, v, joint_q, joint_k, joint_v)
    causal = causal_mode(causal, seq_layout)
    if stale_kv is not None:
        if wants_grad:
            raise NotImplementedError(
                "streamattn.attention: stale_kv (approximate, inference-only) has no backward; "
                "call it under torch.no_grad() or without stale_kv")
        if layer is None:
            raise ValueError("streamattn.attention: stale_kv needs layer= (a key naming the layer)")
        if causal or algorithm != "auto" or ulysses_degree or ring_degree:
            raise ValueError("streamattn.attention: stale_kv runs its own exchange; it takes no "
                             "causal, algorithm or degrees")
        return stale_kv.attention(layer, q, k, v, joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                                  joint_strategy=joint_strategy, scale=scale, layout=layout)
    err = check_local(q, k, v, layout, causal, scale, joint_q, joint_k, joint_v, joint_strategy,
                      algorithm, ulysses_degree, ring_degree)
    if err is None and comm_dtype is not None:
        try:
            check_comm_dtype(comm_dtype, q.dtype)
        except ValueError as exc:  # travels with the signature: the same error on every rank
            err, comm_dtype = str(exc), None
    size = group_size(group)
    if size == 1:
        if err:
            raise ValueError(f"streamattn.attention: {err}")
        return _local(q, k, v, layout, causal, scale, joint_q, joint_k, joint_v, joint_strategy)

    if wants_grad:
        if comm_dtype is not None:
            raise NotImplementedError(
                "streamattn.attention: comm_dtype (approximate, inference-only) has no backward; "
                "call it under torch.no_grad() or without comm_dtype")
        # Gradients go through the registered op (streamattn.op, streamattn.attention); this
        # entry point has no backward: autograd through the exchanges would silently drop the
        # remote contributions (wrong dq, dk, dv).
        raise NotImplementedError(
            "streamattn.api.attention has no backward (an input requires grad): call "
            "streamattn.attention (the registered op), or run under torch.no_grad()")
    joint = None if joint_q is None else (joint_q, joint_k, joint_v)
    transport, problem, plan, trial = tuned_plan_call(group, err, q, k, layout, causal, scale, joint,
                                                      joint_strategy, algorithm, ulysses_degree,
                                                      ring_degree, comm_dtype)
    t0 = time.perf_counter()
    if comm_dtype is not None and q.dtype != comm_dtype:
        transport = _cast(transport, comm_dtype)

    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if joint is not None:
            joint = tuple(t.transpose(1, 2) for t in joint)
    out, jout = run_plan(plan, transport, problem, q, k, v, joint)
    if trial is not None:
        finish_trial(group, trial, time.perf_counter() - t0)
    out = _to_layout(out, layout)
    if joint is None:
        return out
    return out, _to_layout(jout, layout)


def plan_call(group, err, q, k, layout, causal, scale, joint, joint_strategy, algorithm,
              ulysses_degree, ring_degree, comm_dtype=None):
    """(transport, Problem, Plan) of a call on a group of more than one rank. Every rank sends
    the others a small signature (streamattn.agreement); from all signatures every rank takes
    the same path: the cached plan, the full metadata exchange (raising the same error everywhere
    on bad input; `err` is this rank's local error or None), or that error."""
    return tuned_plan_call(group, err, q, k, layout, causal, scale, joint, joint_strategy, algorithm,
                           ulysses_degree, ring_degree, comm_dtype, tune=False)[:3]


def tuned_plan_call(group, err, q, k, layout, causal, scale, joint, joint_strategy, algorithm,
                    ulysses_degree, ring_degree, comm_dtype=None, tune=True):
    """plan_call, plus the call's autotune trial (streamattn.autotune) when `tune` and
    STREAMATTN_AUTOTUNE ask for one: (transport, Problem, Plan, (tuning, token, key) or None)."""
    transport = group_transport(group)
    transport.begin_call()
    if err is None and q.device.type != transport.device.type:
        err = (f"tensors are on {q.device} but the group's backend ({transport.backend}) "
               f"communicates on {transport.device.type}")
    settings = agreement.Settings()
    err = err or settings.error
    joint_len = 0 if err or joint is None else joint[0].shape[1 if layout == "bshd" else 2]
    cache, token = plan_cache, transport.plan_token
    row = agreement.signature(err, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm,
                              ulysses_degree, ring_degree, settings, cache.generation(token),
                              comm_dtype)
    key, full = agreement.exchange(signature_transport(group, transport), row, cache, token)
    cached = None if full else cache.lookup(token, key)
    fresh = cached is None
    if fresh:
        cached = _setup(transport, err, q, k, layout, causal, scale, joint, joint_strategy, algorithm,
                        ulysses_degree, ring_degree, comm_dtype)
        cache.put(token, key, cached)
    problem, plan = cached
    trial = None
    if tune:
        tuning = tunings.get(token, key)
        reps = autotune.reps(int(settings.values.get("STREAMATTN_AUTOTUNE", -1)), plan.cores_shared)
        if (tuning is None and fresh and reps > 0 and algorithm == "auto" and not ulysses_degree
                and not ring_degree and not problem.zigzag):
            plans = autotune.trial_plans(plan)
            if len(plans) > 1:
                tuning = tunings.start(token, key, plans, reps)
        if tuning is not None:
            plan, trial = tuning.plan(), (tuning, token, key)
    return group_transport(group, plan.transport), problem, plan, trial


def finish_trial(group, trial, seconds: float) -> None:
    """Record an autotune trial call's time; after the last one, every rank exchanges its
    medians (tag AUTOTUNE) and the plan cache keeps the winner (the same on every rank)."""
    tuning, token, key = trial
    tuning.record(seconds)
    if not tuning.done:
        return
    mine = torch.tensor(tuning.medians(), dtype=torch.float64)
    rows = [r.tolist() for r in group_transport(group).all_gather_vector(mine, TAG_AUTOTUNE)]
    tunings.finish(token, key)
    problem, _ = plan_cache.lookup(token, key) or (None, None)
    if problem is not None:
        plan_cache.put(token, key, (problem, autotune.pick(tuning.plans, rows)))


def causal_mode(causal, seq_layout):
    """causal as the planner takes it: False, True, or "zigzag" (causal in the zigzag layout;
    without causal the layout is a mere permutation, which attention does not see)."""
    if seq_layout not in ("contiguous", "zigzag"):
        raise ValueError(f"streamattn.attention: seq_layout={seq_layout!r}: expected 'contiguous' "
                         "or 'zigzag'")
    return "zigzag" if causal and seq_layout == "zigzag" else bool(causal)


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def run_plan(plan, transport, problem, q, k, v, joint):
    """(out, joint_out or None) of `plan` on this rank's bshd shard (forward, no LSE)."""
    if plan.joint_fold and joint is not None:
        return algorithms.folded_attention(
            lambda p, fq, fk, fv: _run_algorithm(plan, transport, p, fq, fk, fv, None),
            transport, problem, q, k, v, joint)
    return _run_algorithm(plan, transport, problem, q, k, v, joint)


def _run_algorithm(plan, transport, problem, q, k, v, joint):
    if problem.zigzag:
        return algorithms.zigzag_ring_attention(transport, problem, q, k, v, joint)
    if plan.algorithm == "ulysses":
        return algorithms.ulysses_attention(transport, problem, q, k, v, joint,
                                            members=plan.ulysses_group(transport.rank),
                                            chunks=ulysses_chunks_override() or plan.chunks)
    if plan.algorithm == "ring":
        return algorithms.ring_attention(transport, problem, q, k, v, joint,
                                         members=plan.ring_group(transport.rank),
                                         chunks=ring_chunks_override() or plan.chunks,
                                         joint_all=plan.joint_all)
    if plan.algorithm == "torus":
        return algorithms.torus_attention(transport, problem, q, k, v, joint, plan=plan)
    if plan.algorithm == "usp":
        return algorithms.usp_attention(transport, problem, q, k, v, joint, plan=plan,
                                        chunks=ring_chunks_override() or plan.chunks)
    raise AssertionError(f"no algorithm for {plan}")


def _to_layout(x, layout):
    return (x if layout == "bshd" else x.transpose(1, 2)).contiguous()


def group_size(group) -> int:
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()
    return dist.get_world_size(group)


def group_transport(group, name="torch"):
    """The group's transport called `name` ("torch" | "shm" | "nvshmem"), created on first use.
    Creating a one-sided transport is collective over the node's ranks (it happens in the same
    call on every rank, because every rank runs the same plan)."""
    entry = group_transports.get(id(group))
    if entry is None or entry[0] is not group:
        if entry is not None:  # a dead group's id was reused
            release(entry[0])
        base = TorchTransport(group)
        if base.device.type == "cpu":
            cpu_malloc.apply()  # this call's buffers reused by the next, not faulted in again
        base.plan_token = next(_tokens)  # keys this group's plans (ids of dead groups are reused)
        entry = (group, {"torch": base})
        group_transports[id(group)] = entry
    found = entry[1].get(name)
    if found is None:
        found = entry[1][name] = make_transport(name, entry[1]["torch"])
    return found


def release(group=None) -> None:
    """Forget `group`: close its transports (shm heaps are unmapped), drop its cached plans, and
    let the group be freed. Local (no communication); the next call on the group starts afresh.
    Called automatically by torch.distributed.destroy_process_group (streamattn.lifecycle);
    release(None) releases the default group."""
    entry = group_transports.get(id(group))
    if entry is None or entry[0] is not group:
        return
    del group_transports[id(group)]
    plan_cache.drop(entry[1]["torch"].plan_token)
    tunings.drop(entry[1]["torch"].plan_token)
    for t in entry[1].values():
        close = getattr(t, "close", None)
        if close is not None:
            close()


def release_all() -> None:
    """release() every group this process has used (e.g. after destroy_process_group())."""
    for group, _ in list(group_transports.values()):
        release(group)


def last_plan(group=None):
    """The (Problem, Plan) of the most recent call that planned on `group`, or (None, None)."""
    entry = group_transports.get(id(group))
    if entry is None or entry[0] is not group:
        return None, None
    token = entry[1]["torch"].plan_token
    for (tok, _), value in reversed(plan_cache.items()):
        if tok == token:
            return value
    return None, None


def signature_transport(group, base):
    """The signature's transport: the group's shm transport once a call has created it (on every
    rank in the same call, so the choice is the same everywhere), else the two-sided one."""
    return group_transports[id(group)][1].get("shm", base)


def transports(group=None) -> dict:
    """The transports this process created for `group` so far, by name (their .counters hold the
    bytes sent per link class)."""
    entry = group_transports.get(id(group))
    return dict(entry[1]) if entry is not None and entry[0] is group else {}


def byte_counters(group=None) -> dict:
    """Bytes this rank sent on `group`, summed over its transports: {"intra", "inter", "messages"}."""
    total = {"intra": 0, "inter": 0, "messages": 0}
    for t in transports(group).values():
        for k, v in t.counters.as_dict().items():
            total[k] += v
    return total


def reset_byte_counters(group=None) -> None:
    for t in transports(group).values():
        t.counters.reset()


def _topology(group):
    """The group's Topology: declared (STREAMATTN_TOPOLOGY: .json file, spec such as "2x4", or a
    shipped machine) or probed once and cached on disk. Collective: every rank creates its
    transport, and so resolves the topology, in the same first call."""
    from .topology import resolve_topology

    return resolve_topology(group)


def _cast(transport, wire):
    """The CastTransport over `transport` (created once per transport and wire dtype)."""
    key = ("cast", str(wire))
    cache = transport.__dict__.setdefault("_streamattn_wrappers", {})
    if key not in cache:
        from .algorithms.ring import TAG_JOINT as RING_JOINT
        from .algorithms.torus import TAG_JOINT as TORUS_JOINT

        cache[key] = CastTransport(transport, wire, exact_tags=(RING_JOINT, TORUS_JOINT))
    return cache[key]


def _setup(transport, err, q, k, layout, causal, scale, joint, joint_strategy, algorithm,
           ulysses_degree, ring_degree, comm_dtype=None):
    """First call of a shape: exchange metadata, agree or raise everywhere, then plan."""
    joint_len = 0
    if joint is not None and err is None:
        joint_len = joint[0].shape[1 if layout == "bshd" else 2]
    if err is None and scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    vec = encode(err, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm,
                 ulysses_degree, ring_degree, comm_dtype)
    agreed = check_agreement(transport.all_gather_vector(vec, TAG_META))
    if transport.topology is None:
        # After the metadata exchange: every rank is known to be present and consistent, so the
        # collective topology resolution (maybe a short probe) cannot wait on a missing peer.
        transport.topology = _topology(transport.group)
        transport.node_of = [transport.topology.node_of(r) for r in range(transport.size)]
    problem = Problem(batch=agreed["batch"], heads=agreed["heads"], kv_heads=agreed["kv_heads"],
                      head_dim=agreed["head_dim"], dtype=DTYPES[agreed["dtype"]],
                      seq_lens=agreed["seq_lens"], scale=agreed["scale"], causal=bool(agreed["causal"]),
                      joint_len=joint_len, joint_strategy=joint_strategy,
                      zigzag=agreed["causal"] == ZIGZAG,
                      wire_dtype=comm_dtype if comm_dtype != DTYPES[agreed["dtype"]] else None)
    if problem.zigzag:
        from .zigzag import zigzag_lengths

        want = zigzag_lengths(problem.seq_total, problem.world_size)
        if list(problem.seq_lens) != want:
            raise ValueError(f"streamattn.attention: seq_layout='zigzag' of {problem.seq_total} tokens "
                             f"on {problem.world_size} ranks gives them {want} tokens, got "
                             f"{list(problem.seq_lens)} (shard with streamattn.zigzag_shard)")
        if algorithm not in ("auto", "ring"):
            raise ValueError(f"streamattn.attention: seq_layout='zigzag' runs the ring over every "
                             f"rank; algorithm={algorithm!r} is not available with it")
    request = dict(algorithm=algorithm, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                   joint_fold=joint_fold_mode(), joint_all=joint_all_mode())
    plan = make_plan(problem, transport.topology, **request,
                     **_agreed_rates(transport, problem, request))
    ran_with = tuple(sorted((k, str(v)) for k, v in agreement.Settings().values.items()))
    plan = dataclasses.replace(plan, transport=choose_transport(transport, problem), settings=ran_with)
    log.debug("streamattn plan for %s: %s", problem, plan)
    return problem, plan


def _agreed_rates(transport, problem, request) -> dict:
    """Compute rate and memory bandwidth for the cost model, identical on every rank. Declared
    topologies carry them; CPU ranks measure their own and take rank 0's (TAG_RATE), and time the
    kernel at the block shapes make_plan(**request) can choose from."""
    if transport.topology.peak_flops is not None:
        return {}
    from .calibration import measure_cpu_memory_bandwidth, measure_cpu_rate

    mine = torch.tensor([measure_cpu_rate(problem.dtype), measure_cpu_memory_bandwidth()],
                        dtype=torch.float64)
    rate, mbw = (float(x) for x in transport.all_gather_vector(mine, TAG_RATE)[0])
    from .planner import agreed_calibration  # the kernel timed at each candidate's block shape

    return {"compute_rate": rate, "memory_bandwidth": mbw,
            **agreed_calibration(transport, problem, transport.topology, TAG_RATE, **request)}


def _local(q, k, v, layout, causal, scale, joint_q, joint_k, joint_v, joint_strategy):
    """Group of one: the local kernel, no communication."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    joint = None if joint_q is None else (joint_q, joint_k, joint_v)
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if joint is not None:
            joint = tuple(t.transpose(1, 2) for t in joint)
    out, jout = algorithms.attend(q, k, v, scale=scale, causal=causal, joint=joint,
                                  joint_strategy=joint_strategy)
    if joint is None:
        return _to_layout(out, layout)
    return _to_layout(out, layout), _to_layout(jout, layout)
