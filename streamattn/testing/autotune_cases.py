"""Rank tasks for tests/test_autotune.py: STREAMATTN_AUTOTUNE on real process groups."""
from __future__ import annotations

import contextlib
import time

import torch

import streamattn
from streamattn import api

from ..config import override
from ..reference import reference_attention, rel_err
from ..sharding import shard, split_lengths
from .cases import make_inputs


def tuned_calls(rank, world_size, *, calls=10, reps: "int | None" = 2, seq=61, heads=8,
                joint_len=5, slow=None, delay=0.15):
    """`calls` eager calls with STREAMATTN_AUTOTUNE=reps (None: unset, the default), each checked
    against float64. slow: a plan, as the returned labels name it ("usp 2x1x2/1",
    "usp 2x1x2/1+jall"), made `delay` s slower on every rank (a planted handicap the tuning must
    see).
    Returns per call the plan that ran and its error, and the cached plan at the end."""
    q, k, v, joint = make_inputs(seed=3, batch=1, seq=seq, heads=heads, kv_heads=heads // 2,
                                 head_dim=16, joint_len=joint_len)
    ref, jref = reference_attention(q, k, v, joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    ran = []
    real = api.run_plan

    def recording(plan, *a, **kw):
        ran.append(_label(plan))
        if ran[-1] == slow:
            time.sleep(delay)
        return real(plan, *a, **kw)

    api.run_plan = recording
    errs = []
    try:
        with override(STREAMATTN_AUTOTUNE=reps) if reps is not None else contextlib.nullcontext():
            for _ in range(calls):
                out, jout = streamattn.attention(ql, kl, vl, joint_q=joint[0], joint_k=joint[1],
                                                 joint_v=joint[2])
                errs.append(max(rel_err(out, shard(ref, lens, rank)), rel_err(jout, jref)))
        _, plan = api.last_plan(None)
        tuning_left = len(api.tunings.active)
    finally:
        api.run_plan = real
    return {"ran": ran, "errs": errs, "final": _label(plan), "reason": plan.reason,
            "tuning_left": tuning_left, "cores_shared": plan.cores_shared}


def _label(plan) -> str:
    # every field trial_plans varies is named: a variant and its plain twin are two trials (CI133
    # counted a jall pick and its twin as one label)
    return (f"{plan.algorithm} {plan.ulysses_degree}x{plan.torus_degree}x{plan.ring_degree}"
            f"/{plan.chunks}{'+fold' if plan.joint_fold else ''}"
            f"{'+jall' if plan.joint_all else ''}")


def release_group(rank, world_size):
    """Forget the default group's plans and tunings (the next test starts afresh)."""
    api.release(None)
    torch.distributed.barrier()
    return True
