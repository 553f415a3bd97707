"""Perf-regression checks over sweep records (used by tests/test_perf.py), and the exact payload bytes
each algorithm sends, derived from ALGORITHMS.md's volumes and what the code actually sends.

Per rank, P = M·G ranks, shard S_l = S/P tokens, H heads (H_kv = H), D head dim, b bytes/element,
no joint tokens; "peer" ranks of a Ulysses group / ring are group ranks:

* Ulysses over u members: one message per peer with that peer's q, k and v head slices
  (S_l · H/u · 3D elements), then one message per peer with its output slice (S_l · H/u · D).
  Per peer 4·S_l·H·D/u elements; summed over the u−1 peers that is ALGORITHMS.md's 4(u−1)/u · E/P.
* Ring over r members: r−1 steps, each one message of K and V stacked ([2, S_seg, h, D]) to the
  next member. Pure ring: S_seg = S_l, h = H → 2(P−1)·E/P per rank.
* USP u × r: Ulysses inside the group (as above, u peers), then a ring over the r groups whose
  blocks are the group's u·S_l tokens for H/u heads: (r−1) · 2 · u·S_l · H/u · D = 2(r−1)·E/P.
A message counts as inter-node when its peer is on another node (node = rank // G).
"""
from __future__ import annotations

from typing import Dict, List, Optional


def expected_bytes(algorithm: str, u: int, r: int, *, seq: int, heads: int, head_dim: int,
                   ranks_per_node: int, batch: int = 1, elem: int = 4,
                   groups: Optional[List[List[int]]] = None) -> List[Dict[str, int]]:
    """[{"intra", "inter", "messages"}] per rank for one call (non-causal, no joint tokens,
    S divisible by P). groups: the plan's Ulysses groups (default consecutive ranks)."""
    P = u * r
    if seq % P:
        raise ValueError("expected_bytes assumes equal shards")
    S_l, H, D, B = seq // P, heads, head_dim, batch
    node = lambda x: x // ranks_per_node
    groups = groups or [list(range(g * u, (g + 1) * u)) for g in range(r)]
    out = []
    for rank in range(P):
        acc = {"intra": 0, "inter": 0, "messages": 0}

        def send(peer, elements):
            acc["inter" if node(peer) != node(rank) else "intra"] += elements * elem
            acc["messages"] += 1

        grp = next(g for g in groups if rank in g)
        j = grp.index(rank)
        if u > 1:  # Ulysses scatter (q, k, v) and gather (out): one message per peer each
            for peer in grp:
                if peer != rank:
                    send(peer, B * S_l * (H // u) * 3 * D)
                    send(peer, B * S_l * (H // u) * D)
        if r > 1:  # ring over member j of every group
            ring = [g[j] for g in groups]
            me = ring.index(rank)
            nxt = ring[(me + 1) % r]
            for _ in range(r - 1):
                send(nxt, 2 * B * (u * S_l) * (H // u) * D)
        out.append(acc)
    return out


def doc_inter_elements_per_rank(algorithm: str, M: int, P: int, E: int, r: int = 1) -> float:
    """ALGORITHMS.md's inter-node volume per rank (elements), for cross-checking expected_bytes."""
    if algorithm == "ulysses":
        return 4 * (M - 1) / M * E / P
    if algorithm == "usp":
        return 2 * (r - 1) * E / P
    if algorithm == "ring":
        return 2 * (P - 1) * E / P  # of which only node-crossing hops are inter (see the table)
    raise ValueError(algorithm)


def _t(rec, stat) -> float:
    return rec["latency_s"][stat]


def perf_failures(records: List[dict], *, auto: str = "auto", within: float = 1.10,
                  min_speedup: float = 1.3, stat: str = "min") -> List[str]:
    """The perf-regression assertions, as a list of failures (empty = pass).

    records: one shape's sweep with an "auto" configuration (named `auto`), the fixed plans
    ("ulysses P", "ring P", "usp uxr") and nothing else timed that counts as fixed.
    1. auto within `within`x of the best fixed plan;
    2. auto at least `min_speedup`x faster than Ulysses over all P ranks (across nodes).
    stat: "min" (default) or "median" of the interleaved timed calls. On a shared CPU other
    processes only ever add time to a call, so the minimum is the robust estimate of what a
    configuration costs (timeit's rule); the median is reported alongside.
    """
    fails = []
    fixed = [r for r in records if r["kind"] == "streamattn" and r.get("latency_s")
             and r["cfg"].get("algorithm") in ("ulysses", "ring", "usp")]
    if not fixed:
        return ["no fixed plan was measured"]
    best = min(fixed, key=lambda r: _t(r, stat))
    t_auto = _t(next(r for r in records if r["config"] == auto), stat)
    ratio = t_auto / _t(best, stat)
    if ratio > within:
        fails.append(f"{auto} ({t_auto * 1e3:.0f} ms) is {ratio:.2f}x the best fixed plan "
                     f"{best['config']} ({_t(best, stat) * 1e3:.0f} ms), limit {within}x ({stat} of the calls)")
    uly = next((r for r in fixed if r["cfg"].get("algorithm") == "ulysses"), None)
    if uly is None:
        fails.append("Ulysses over all ranks was not measured")
    else:
        speedup = _t(uly, stat) / t_auto
        if speedup < min_speedup:
            fails.append(f"{auto} is only {speedup:.2f}x faster than {uly['config']} across nodes "
                         f"({t_auto * 1e3:.0f} vs {_t(uly, stat) * 1e3:.0f} ms), "
                         f"need {min_speedup}x ({stat} of the calls)")
    return fails
