"""Every algorithm on each transport over all ranks against the float64 reference (section `dist`),
and what the multi-rank steps share: the JSON all-gather, the transports that failed, the loop that
switches STREAMATTN_TRANSPORT."""
from __future__ import annotations

import json
import math
import os
import time
import traceback

from .cases import DIST_TOL, dist_cases
from .results import short


def _one_dist_case(rank, world, device, algorithm, seq, heads, kv_heads, head_dim, joint_len,
                   causal, dtype, seed=0):
    """This rank's error vs the float64 reference (streamattn.testing.cases helpers, on `device`)."""
    import streamattn
    from streamattn.reference import reference_attention
    from streamattn.reference import rel_err
    from streamattn.sharding import shard, split_lengths
    from streamattn.testing.cases import make_inputs

    lens = split_lengths(seq, world)
    q, k, v, joint = make_inputs(seed=seed, batch=1, seq=seq, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype=dtype)
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0].to(device), joint_k=joint[1].to(device), joint_v=joint[2].to(device))
        ref, jref = reference_attention(q, k, v, causal=causal, joint_q=joint[0], joint_k=joint[1],
                                        joint_v=joint[2])
    else:
        ref, jref = reference_attention(q, k, v, causal=causal), None
    ql, kl, vl = (shard(t, lens, rank).contiguous().to(device) for t in (q, k, v))
    res = streamattn.attention(ql, kl, vl, causal=causal, algorithm=algorithm, **kw)
    out, jout = res if joint is not None else (res, None)
    err = rel_err(out.cpu(), shard(ref, lens, rank))
    if jref is not None:
        err = max(err, rel_err(jout.cpu(), jref))
    from streamattn.testing.cases import last_plan

    plan = last_plan()
    return err, (plan.transport if plan is not None else "?")


def gather(obj, group):
    """Every rank's JSON-able `obj`, in rank order (JSON over a bytes all-gather: no pickle)."""
    from streamattn.topology.comm import all_gather_bytes

    return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode(), group=group)]


class Broken:
    """Transports that failed once: never used again in this run (see the package docstring)."""

    def __init__(self):
        self.why = {}

    def mark(self, transport, text):
        self.why.setdefault(transport, text)

    def reason(self, transport):
        if "torch" in self.why and transport != "torch":
            return f"NCCL (torch) failed earlier: {self.why['torch']}"
        return self.why.get(transport)

    def skip(self, res, section, check, transport) -> bool:
        """True (and a SKIP row in `section`) when `transport` is not to be used any more."""
        why = self.reason(transport)
        if why:
            res.add(section, check, "SKIP", f"transport not used after its first error ({why[:120]})")
        return bool(why)


def each_transport(transports):
    """Each transport name in turn with STREAMATTN_TRANSPORT set to it and a fresh plan cache (a
    plan records the transport chosen at its first call); the variable is restored after."""
    from streamattn import api, config

    with config.override(STREAMATTN_TRANSPORT=os.environ.get("STREAMATTN_TRANSPORT")):
        try:
            for transport in transports:
                os.environ["STREAMATTN_TRANSPORT"] = transport
                api.plan_cache.clear()
                yield transport
        finally:
            api.plan_cache.clear()


def check_distributed(res, rank, world, device, transports, algorithms, dtype, gloo, broken, watch=None):
    try:
        for transport in each_transport(transports):
            for algorithm in algorithms:
                for name, kw in dist_cases(world, dtype):
                    check = f"{transport:<7} {algorithm:<7} {name}"
                    if broken.skip(res, "dist", check, transport):
                        continue
                    if watch is not None:
                        watch("dist", check)
                    t0 = time.monotonic()
                    try:
                        mine = ("ok", _one_dist_case(rank, world, device, algorithm, **kw))
                    except ValueError as exc:
                        mine = ("na", short(exc))
                    except Exception as exc:  # noqa: BLE001
                        mine = ("error", short(exc))
                        if os.environ.get("STREAMATTN_GPU_CHECK_TRACE"):
                            traceback.print_exc()
                    allr = gather(mine, gloo)
                    secs = time.monotonic() - t0
                    if all(k == "ok" for k, _ in allr):
                        err = max(v[0] for _, v in allr)
                        used = sorted({v[1] for _, v in allr})
                        tol = DIST_TOL[dtype]
                        ok = math.isfinite(err) and err <= tol and used == [transport]
                        res.add("dist", check, "PASS" if ok else "FAIL",
                                f"max err {err:.2e} (tol {tol:.0e}) {secs:.1f}s"
                                + ("" if used == [transport] else f"; plan used transport {used}"))
                    elif all(k == "na" for k, _ in allr):
                        res.add("dist", check, "N/A", allr[0][1])
                    else:
                        bad = [(r, v) for r, (k, v) in enumerate(allr) if k != "ok"]
                        text = f"rank {bad[0][0]}: {bad[0][1]}"
                        res.add("dist", check, "ERROR", text)
                        broken.mark(transport, text)
    finally:
        if watch is not None:
            watch.cancel()
