"""RankPool tasks for the per-call agreement (streamattn.agreement): shape sequences whose local
shapes repeat on some ranks only, settings that differ between ranks, invalid settings."""
from __future__ import annotations

import time

import torch.distributed as dist

import streamattn

from ..config import override
from ..reference import rel_err
from ..sharding import shard, shard_rows, split_lengths

from .cases import make_inputs


def _call(rank, world_size, seq, *, heads=4, kv_heads=None, head_dim=8, seed=0, group=None,
          lens=None, **kw):
    """One checked call on `group`; returns the relative error against float64."""
    from streamattn.reference import reference_attention

    kv_heads = kv_heads or heads
    lens = lens or split_lengths(seq, world_size)
    q, k, v, _ = make_inputs(seed=seed, batch=1, seq=seq, heads=heads, kv_heads=kv_heads,
                             head_dim=head_dim)
    ref = reference_attention(q, k, v, causal=kw.get("causal", False), rows=shard_rows(lens, rank))
    out = streamattn.attention(*(shard(t, lens, rank) for t in (q, k, v)), group, **kw)
    return rel_err(out, ref)


def shape_sequence(rank, world_size, *, seqs, algorithm="auto", timeout_s=10):
    """Calls with these total lengths in order (e.g. 64 then 67 on 4 ranks: 16/16/16/16 then
    17/17/17/16, so rank 3 sees a local shape it has seen before and the others do not).
    Returns every call's error; a hang shows as a PeerTimeoutError after timeout_s."""
    errs = []
    with override(STREAMATTN_TIMEOUT_S=timeout_s):
        for i, s in enumerate(seqs):
            errs.append(_call(rank, world_size, s, seed=100 + i, algorithm=algorithm))
    return {"errs": errs}


def settings_mismatch(rank, world_size, *, name, value, on_rank, transport=None, fresh_group=False,
                      algorithm="ulysses", seq=40, heads=8, timeout_s=10):
    """`name`=`value` on rank `on_rank` only; the call must raise the same ValueError on every
    rank (returned), quickly; then a call with equal settings must work on the same group."""
    group = dist.new_group(list(range(world_size))) if fresh_group else None
    common = {"STREAMATTN_TIMEOUT_S": timeout_s, "STREAMATTN_TRANSPORT": transport}
    if name == "STREAMATTN_TIMEOUT_S":
        common.pop(name)
    t0 = time.monotonic()
    result = {"type": None, "error": None}
    with override(**common):
        with override(**({name: value} if rank == on_rank else {})):
            try:
                _call(rank, world_size, seq, heads=heads, group=group, algorithm=algorithm)
            except Exception as exc:
                result = {"type": type(exc).__name__, "error": str(exc)}
        result["seconds"] = time.monotonic() - t0
        result["after_err"] = _call(rank, world_size, seq, heads=heads, group=group,
                                    algorithm=algorithm, seed=7)
    if group is not None:
        dist.destroy_process_group(group)
    return result


def agreement_overhead(rank, world_size, *, seq=1024, heads=24, head_dim=32, joint_len=256,
                       iters=20):
    """Per-call cost of the agreement (settings read, signature, its exchange, cache lookup)
    against whole calls of the same shape (flux-1024-cpu: 24 heads x 32, 256 text tokens),
    interleaved in one run. Returns both medians (s) and their ratio."""
    from streamattn import agreement, api

    q, k, v, joint = make_inputs(seed=0, batch=1, seq=seq, heads=heads, kv_heads=heads,
                                 head_dim=head_dim, joint_len=joint_len)
    lens = split_lengths(seq, world_size)
    ql, kl, vl = (shard(t, lens, rank).contiguous() for t in (q, k, v))
    kw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2])
    streamattn.attention(ql, kl, vl, **kw)
    transport = api.group_transport(None)
    fast = api.signature_transport(None, transport)
    problem, plan = api.last_plan()
    real = agreement.exchange
    memo = {}

    def local_only(transport, row, cache, token):  # the old path: a local key, no message
        key = tuple(row.tolist())
        if key not in memo:
            memo[key] = real(transport, row, cache, token)
        return memo[key]

    local_only(fast, *_row(agreement, api, transport, ql, kl, joint_len))
    with_sig, without = [], []
    for i in range(2 * iters):
        patched = i % 2 == 1
        agreement.exchange = local_only if patched else real
        try:
            dist.barrier()
            t0 = time.perf_counter()
            streamattn.attention(ql, kl, vl, **kw)
            dt = time.perf_counter() - t0
        finally:
            agreement.exchange = real
        (without if patched else with_sig).append(dt)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    diffs = [a - b for a, b in zip(with_sig, without)]
    return {"with_signature_s": med(with_sig), "local_key_s": med(without),
            "paired_diff_s": med(diffs), "overhead": med(diffs) / med(without), "plan": str(plan)}


def _row(agreement, api, transport, ql, kl, joint_len):
    row = agreement.signature(None, ql, kl, "bshd", False, None, joint_len, "front", "auto", None,
                              None, agreement.Settings(), api.plan_cache.generation(transport.plan_token))
    return row, api.plan_cache, transport.plan_token


def plan_settings(rank, world_size, *, kernel):
    """One call with STREAMATTN_KERNEL=kernel; returns the settings its Plan recorded (JSON)."""
    from streamattn import api

    with override(STREAMATTN_KERNEL=kernel):
        err = _call(rank, world_size, 12 * world_size + 1)
    return {"err": err, "settings": api.last_plan()[1].to_dict()["settings"]}
