"""Measure-and-pick (STREAMATTN_AUTOTUNE=N): the first calls of a shape run the planner's top
candidates, N calls each in turn, and every later call runs the fastest one. By default (-1) only
where the ranks outnumber their machine's cores (`reps`).

Why: the cost model ranks candidates from calibrated kernel times and link rates, but on a CPU the
ranks share cores with the TCP stack and each other, and its predictions there were 0.42-1.16x of
the measured times in the emulated acceptance matrix (docs/matrix-2026-12-03-cpu-terms.md; 0.23-0.94x
before the measured sync cost and core share); two plans predicted 10% apart can measure 40% apart
the other way. A DiT
calls the same shapes thousands of times (every layer, every step), so a few measured calls cost
little and replace the guess with a measurement.

Rules (the same on every rank, so every rank runs the same candidate on the same call):
  * only for the planner's free choice (algorithm="auto", no degrees, not zigzag) of the eager,
    inference call; a forced plan or a call that needs gradients runs its plan as before;
  * the trials are the costed candidates predicted within WITHIN x of the best, the best first,
    then its plain twin (trial_plans), at most MAX_TRIALS; fewer than two: nothing to tune;
  * call i of the shape runs trial i mod n until every trial ran N + 1 times; the first round is
    not timed (a plan's first call builds its buffers and transports); each rank times its own
    calls; after the last trial call the ranks exchange their per-trial medians (tag AUTOTUNE),
    a trial's time is its slowest rank's, and the smallest wins (ties: the earlier trial, i.e.
    the better prediction) -- but a variant over its raced plain twin only when VARIANT_MARGIN
    faster. The winner's Plan says so in its reason.
Every trial is an exact plan, so every call returns the exact result; only its speed varies.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Dict, List, Sequence, Tuple

from .plan import Candidate, Plan, joint_suffix, label, run_key, torus_degree

MAX_TRIALS = 3
WITHIN = 1.5
SHARED_CORES_REPS = 3  # STREAMATTN_AUTOTUNE=-1 (the default) where the ranks outnumber the cores
# A variant (token runs, every joint query on every ring member, folded) wins over its plain twin
# only when its trials ran this much faster: three calls per trial scatter by about as much on
# shared cores (one plan measured 522, 538 and 551 ms in three rows of one bench run), and the
# variant's extra kernel calls, merges and messages cost CPU that co-located work pays for. Without
# it, matrix 55 kept USP 2x2 in 2 runs, 4% faster in its trials and 5% slower afterwards.
VARIANT_MARGIN = 0.05


def reps(setting: int, cores_shared: bool) -> int:
    """Timed calls per trial for STREAMATTN_AUTOTUNE=`setting` on a plan made for ranks that do
    (`cores_shared`) or do not outnumber their machine's cores: -1 (the default) measures only
    where they do -- SHARED_CORES_REPS there, 0 elsewhere.

    Why by default there: on shared cores a call is bound by all its ranks' CPU, of which the
    model counts the kernels and bytes but not the rest (per call and rank 2-4 CPU-ms of Python,
    dispatch, copies and waits on the emulated clusters, 2x2 and 2x4 at 1 Gbit/s), and the plans
    it ranks 15-20% apart there measure as far apart the other way: a ring in token runs or with
    every joint query on every member was picked over the plain USP that ran 5-33% faster in the
    same run (docs/matrix-2026-12-06-stop44.md). With cores enough (GPUs, one rank per core) the
    prediction stands."""
    if setting >= 0:
        return setting
    return SHARED_CORES_REPS if cores_shared else 0


def trial_plans(plan: Plan, limit: int = MAX_TRIALS, within: float = WITHIN) -> List[Plan]:
    """The plans to measure: `plan` (the planner's pick) first; then, when the pick is a variant
    (token runs, every joint query on every ring member, joint tokens folded), its plain twin --
    the same split, one message per step -- if predicted within `within` x of the best; then the
    next cheapest costed candidates within that window, `limit` in all.

    Why the twin: the variants are what the model is least sure of on shared cores (they add
    kernel calls, merges and messages whose CPU it does not count), and the next cheapest
    candidates are mostly more variants of the same split: on the emulated 1 Gbit/s clusters the
    three best predictions were all variants and the plain USP, measured fastest in the same run
    (18.0 ms against 23.6), was never raced."""
    chosen = plan.chosen()
    if chosen is None or chosen.predicted_s is None:
        return [plan]
    fits = [c for c in plan.candidates if c.valid and not plan.runs(c)
            and c.predicted_s <= chosen.predicted_s * within]
    plain = plain_twin(plan)
    twin = next((c for c in fits if plain.runs(c)), None)  # None when the pick is plain itself
    others = ([twin] if twin is not None else []) + sorted(
        (c for c in fits if c is not twin), key=lambda c: c.predicted_s)
    return [plan] + [plan_of(plan, c) for c in others[: max(0, limit - 1)]]


def plan_of(plan: Plan, c: Candidate) -> Plan:
    """`plan` (its transport, settings, candidates, context) running candidate `c` instead."""
    return dataclasses.replace(plan, algorithm=c.algorithm, ulysses_degree=c.ulysses_degree,
                               ring_degree=c.ring_degree, groups=c.groups,
                               predicted_s=c.predicted_s, torus_degree=torus_degree(c),
                               chunks=c.chunks, joint_fold=c.joint_fold, joint_all=c.joint_all,
                               reason=f"autotune trial: {label(c)}")


class Tuning:
    """The trial calls of one (group, call shape): which plan call i runs, and what it took."""

    def __init__(self, plans: Sequence[Plan], reps: int):
        self.plans, self.reps, self.calls = list(plans), reps, 0
        self.times: List[List[float]] = [[] for _ in self.plans]

    def plan(self) -> Plan:
        return self.plans[self.calls % len(self.plans)]

    def record(self, seconds: float) -> None:
        if self.calls >= len(self.plans):  # the first round is each plan's cold call: not timed
            self.times[self.calls % len(self.plans)].append(seconds)
        self.calls += 1

    @property
    def done(self) -> bool:
        return self.calls >= len(self.plans) * (self.reps + 1)

    def medians(self) -> List[float]:
        return [statistics.median(t) for t in self.times]


def pick(plans: Sequence[Plan], medians_by_rank: Sequence[Sequence[float]]) -> Plan:
    """The winner: per trial the slowest rank's median, the smallest of those (first on ties) --
    unless that is a variant whose plain twin also ran and was not VARIANT_MARGIN slower: then
    the twin. The measurements are in its reason."""
    slowest = [max(row[i] for row in medians_by_rank) for i in range(len(plans))]
    best = min(range(len(plans)), key=lambda i: (slowest[i], i))
    plain = run_key(plain_twin(plans[best]))  # the pick's own key when it is plain: no twin then
    twin = next((j for j, p in enumerate(plans) if j != best and run_key(p) == plain), None)
    kept = ""
    if twin is not None and slowest[best] > slowest[twin] * (1.0 - VARIANT_MARGIN):
        kept = (f"; {_short(plans[twin])} kept: {_short(plans[best])} was not "
                f"{VARIANT_MARGIN:.0%} faster")
        best = twin
    shown = ", ".join(f"{_short(p)} {t * 1e3:.1f} ms" for p, t in zip(plans, slowest))
    base = plans[0].reason
    why = (f"autotune: fastest of {len(plans)} measured trials (slowest rank, median): {shown}; "
           f"the prediction picked {_short(plans[0])}{kept}")
    return dataclasses.replace(plans[best], reason=f"{why}. Planner: {base}")


def plain_twin(plan: Plan) -> Plan:
    """`plan`'s split in one message per step: no token runs, joint queries split over the ring,
    joint tokens not folded (itself when it is plain)."""
    return dataclasses.replace(plan, chunks=1, joint_all=False, joint_fold=False)


def _short(p: Plan) -> str:
    if p.algorithm == "torus":
        return f"torus {p.ulysses_degree}x{p.torus_degree}x{p.ring_degree}"
    if p.algorithm == "ulysses" and p.chunks > 1:
        return f"ulysses {p.ulysses_degree} in {p.chunks} chunks"
    runs = f" in {p.chunks} runs" if p.chunks > 1 else ""
    return f"{p.algorithm} {p.ulysses_degree}x{p.ring_degree}{runs}{joint_suffix(p)}"


class Tunings:
    """Tunings in progress, by (group token, call key)."""

    def __init__(self):
        self.active: Dict[Tuple[int, object], Tuning] = {}

    def get(self, token: int, key) -> "Tuning | None":
        return self.active.get((token, key))

    def start(self, token: int, key, plans: Sequence[Plan], reps: int) -> Tuning:
        t = self.active[(token, key)] = Tuning(plans, reps)
        return t

    def finish(self, token: int, key) -> None:
        self.active.pop((token, key), None)

    def drop(self, token: int) -> None:
        """Forget a released group's tunings."""
        for k in [k for k in self.active if k[0] == token]:
            del self.active[k]
