"""Plans: which algorithm and degrees run a call. A plan is data: print it, compare it, save it.

The planner, `streamattn.planner.make_plan(problem, topology)`, validates a forced choice or costs
every candidate on the topology for "auto"; it returns a `Plan` with `predicted_s`, `reason` and
every `Candidate` it considered (`Plan.explain()` prints them).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

ALGORITHMS = ("auto", "ulysses", "ring", "usp", "torus")


@dataclass(frozen=True)
class Step:
    """One step of a costed candidate: a blocking exchange, a blocking compute, or an overlapped
    step (ring: send of the next block while computing this one, costing max(compute, comm)).

    compute_s / comm_s: the slowest rank's compute and the step's communication time;
    time_s: what the step adds to the call; bottleneck: the resource that set comm_s;
    bytes_by_kind: the largest bytes one rank sends in this step, per link kind."""

    name: str
    time_s: float
    compute_s: float = 0.0
    comm_s: float = 0.0
    overlapped: bool = False
    bottleneck: str = ""
    bytes_by_kind: Tuple[Tuple[str, int], ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bytes_by_kind"] = [list(kv) for kv in self.bytes_by_kind]
        return d

    @classmethod
    def from_dict(cls, d) -> "Step":
        d = dict(d)
        d["bytes_by_kind"] = tuple((str(k), int(v)) for k, v in d.get("bytes_by_kind", ()))
        return cls(**d)


@dataclass(frozen=True)
class Candidate:
    """One (algorithm, ulysses_degree, ring_degree, placement) the planner considered.

    groups: Ulysses groups as in `Plan.groups` (explicit); placement: "consecutive" (rank g*u + j is
    member j of group g) or "per-node" (groups gathered from each node's ranks, for interleaved
    rank->node maps). dropped: why it cannot run ("" when it was costed).
    predicted_s = sum of step times; compute_s: compute on the critical path; comm_s: communication
    time summed over steps; exposed_comm_s = predicted_s - compute_s (what overlap did not hide).
    bytes_by_kind: bytes the busiest rank sends over the whole call, per link kind."""

    algorithm: str
    ulysses_degree: int
    ring_degree: int
    groups: tuple = ()
    placement: str = "consecutive"
    dropped: str = ""
    predicted_s: Optional[float] = None
    compute_s: float = 0.0
    comm_s: float = 0.0
    bottleneck: str = ""
    bytes_by_kind: Tuple[Tuple[str, int], ...] = ()
    steps: Tuple[Step, ...] = ()
    # Ulysses: pipelined over this many head groups (ulysses.py _pipelined); ring / USP: every ring
    # step's block in this many token runs (ring.ring_core)
    chunks: int = 1
    joint_fold: bool = False  # the joint tokens folded into the sequence (schedule.folded_problem)
    joint_all: bool = False  # every ring member attends all joint queries (ring.ring_core)

    @property
    def valid(self) -> bool:
        return not self.dropped

    @property
    def exposed_comm_s(self) -> float:
        return 0.0 if self.predicted_s is None else max(0.0, self.predicted_s - self.compute_s)

    @property
    def label(self) -> str:
        return f"{self.algorithm} u={self.ulysses_degree} x r={self.ring_degree} [{self.placement}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = [list(g) for g in self.groups]
        d["bytes_by_kind"] = [list(kv) for kv in self.bytes_by_kind]
        d["steps"] = [s.to_dict() for s in self.steps]
        return d

    @classmethod
    def from_dict(cls, d) -> "Candidate":
        d = dict(d)
        d["groups"] = tuple(tuple(int(x) for x in g) for g in d.get("groups", ()))
        d["bytes_by_kind"] = tuple((str(k), int(v)) for k, v in d.get("bytes_by_kind", ()))
        d["steps"] = tuple(Step.from_dict(s) for s in d.get("steps", ()))
        return cls(**d)


@dataclass(frozen=True)
class Plan:
    """How one call runs.

    algorithm: "local" | "ulysses" | "ring" | "usp" | "torus";
    ulysses_degree * torus_degree * ring_degree == world size (torus_degree is 1 except for torus:
    Ulysses inside groups of u ranks, the torus all-to-all across torus_degree groups, and a ring
    factor across the ring_degree teams of torus_degree groups).
    groups: the Ulysses groups as tuples of group ranks; ring j is made of member j of every group,
    in group order. Empty means consecutive groups: rank g*u + j is member j of group g. Causal
    calls need consecutive groups (each group's tokens must be contiguous positions).
    predicted_s: the cost model's time for the call (None when not costed).
    candidates: the `Candidate`s the planner considered, for explain() (serialised only with
    to_json(candidates=True)).
    context: what the plan was made for (problem, topology, compute rate), for explain().
    """

    algorithm: str
    ulysses_degree: int
    ring_degree: int
    groups: tuple = ()
    transport: str = "torch"
    predicted_s: Optional[float] = None
    reason: str = ""
    candidates: tuple = field(default=(), compare=False, repr=False)
    context: str = field(default="", compare=False, repr=False)
    torus_degree: int = 1
    # Ulysses: head groups whose all-to-alls pipeline with their attention; ring / USP: token runs
    # each ring step's block travels in, each forwarded and attended as it arrives
    chunks: int = 1
    # the joint (text) tokens join the sharded sequence, their output rows all-gathered afterwards
    # (algorithms/joint_fold.py); the backward, schedule-independent, needs only its final LSEs
    joint_fold: bool = False
    # USP / ring with joint tokens: every ring member attends all T joint queries (no all-gather of
    # joint rows over the ring after it; ring.ring_core); in training too, like joint_fold
    joint_all: bool = False
    # ((name, value), ...): the agreed STREAMATTN_* settings the call ran with (kernel, Triton,
    # slot size, topology, ...; config.py, agreed=True), set by the api; empty for make_plan's plans
    settings: tuple = field(default=(), compare=False)
    # made for ranks that outnumber their machine's cores (make_plan's overlap < 1, CPU groups):
    # where the default STREAMATTN_AUTOTUNE measures the top candidates (autotune.reps)
    cores_shared: bool = field(default=False, compare=False)

    def to_dict(self, candidates: bool = False) -> dict:
        d = {
            "algorithm": self.algorithm,
            "ulysses_degree": self.ulysses_degree,
            "ring_degree": self.ring_degree,
            "torus_degree": self.torus_degree,
            "chunks": self.chunks,
            "joint_fold": self.joint_fold,
            "joint_all": self.joint_all,
            "groups": [list(g) for g in self.groups],
            "transport": self.transport,
            "predicted_s": self.predicted_s,
            "reason": self.reason,
        }
        if self.cores_shared:
            d["cores_shared"] = True
        if self.settings:
            d["settings"] = dict(self.settings)
        if candidates:
            d["candidates"] = [c.to_dict() for c in self.candidates]
            d["context"] = self.context
        return d

    def to_json(self, candidates: bool = False) -> str:
        """JSON of the plan (sorted keys). candidates=True also writes every candidate and the
        context, so `from_json` restores a plan whose explain() still works."""
        return json.dumps(self.to_dict(candidates), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["groups"] = tuple(tuple(g) for g in d.get("groups", ()))
        d["candidates"] = tuple(Candidate.from_dict(c) for c in d.get("candidates", ()))
        d["settings"] = tuple(sorted(d.get("settings", {}).items()))
        return cls(**d)

    def chosen(self) -> Optional["Candidate"]:
        """The candidate this plan was made from (its steps are what the cost model predicted),
        or None when the plan did not come from the cost model."""
        return next((c for c in self.candidates if self.runs(c)), None)

    def runs(self, c: "Candidate") -> bool:
        """Whether this plan runs candidate `c` (a valid one of the same split, groups, chunks and
        joint handling)."""
        return c.valid and run_key(c) == run_key(self)

    def explain(self) -> str:
        """Every candidate with its predicted time (or why it was dropped), the winner's steps, and
        why the winner won. Also `print(plan.explain())`."""
        return explain_plan(self)

    def ulysses_groups(self) -> tuple:
        if self.groups:
            return self.groups
        u = self.ulysses_degree
        return tuple(tuple(g * u + j for j in range(u))
                     for g in range(self.ring_degree * self.torus_degree))

    def ulysses_group(self, rank: int) -> list:
        """The Ulysses group (list of group ranks, member order) that `rank` belongs to."""
        return next(list(g) for g in self.ulysses_groups() if rank in g)

    def ring_group(self, rank: int) -> list:
        """The ring (list of group ranks, ring order) that `rank` belongs to."""
        groups = self.ulysses_groups()
        j = self.ulysses_group(rank).index(rank)
        return [g[j] for g in groups]

    def __str__(self) -> str:
        extra = f", predicted {self.predicted_s * 1e3:.3g} ms" if self.predicted_s is not None else ""
        torus = f" x torus={self.torus_degree}" if self.torus_degree > 1 else ""
        split = f" in {self.chunks} {chunk_unit(self.algorithm)}" if self.chunks > 1 else ""
        torus += split if self.algorithm == "ulysses" else ""
        ring = "" if self.algorithm == "ulysses" else split
        fold = joint_suffix(self)
        return (f"Plan({self.algorithm}, ulysses={self.ulysses_degree}{torus} x ring={self.ring_degree}{ring}{fold}, "
                f"transport={self.transport}{extra}{', ' + self.reason if self.reason else ''})")


def torus_plan(problem, topology, ulysses_degree=None, ring_degree=None) -> Plan:
    """A forced Torus plan: Ulysses over u ranks (default: the ranks of a node), the torus across
    t groups, a ring factor r (default 1) across teams of t groups; u * t * r == world size and
    u * t must divide the heads. Raises ValueError naming what would be valid."""
    P, H = problem.world_size, problem.heads
    u = ulysses_degree or (topology.ranks_per_node if topology is not None else None)
    if not u or P % u:
        raise ValueError(f"streamattn: torus needs ulysses_degree (the ranks of a node) dividing the "
                         f"group size {P}; got {u}")
    r = ring_degree or 1
    if P % (u * r):
        raise ValueError(f"streamattn: torus: ulysses_degree={u} x ring_degree={r} does not divide "
                         f"the group size {P}")
    t = P // (u * r)
    if H % (u * t):
        valid = [rr for rr in divisors(P // u) if H % (P // rr) == 0]
        raise ValueError(f"streamattn: torus: {H} heads are not divisible by ulysses_degree x "
                         f"torus_degree = {u} x {t}; valid ring degrees for this split: "
                         f"{', '.join(map(str, valid)) or 'none'}")
    return Plan("torus", u, r, torus_degree=t, reason="requested")


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_ulysses_degrees(world: int, heads: int) -> list:
    """Ulysses degrees u with u | world (rings of equal size) and u | heads."""
    return [u for u in divisors(world) if heads % u == 0]


# ------------------------------------------------------------------------ explain() formatting
def torus_degree(c: Candidate) -> int:
    """t of a torus candidate (its groups are all P/u Ulysses groups, r teams of t); 1 otherwise."""
    return len(c.groups) // c.ring_degree if c.algorithm == "torus" else 1


def run_key(x) -> tuple:
    """What a Plan or Candidate runs -- split, groups, token runs / chunks, joint handling -- and
    nothing of why (equal Plans also share their reason and prediction)."""
    t = x.torus_degree if isinstance(x, Plan) else torus_degree(x)
    return (x.algorithm, x.ulysses_degree, t, x.ring_degree, tuple(x.groups), x.chunks,
            x.joint_all, x.joint_fold)


def chunk_unit(algorithm: str) -> str:
    """What a plan's chunks count: Ulysses' head groups, a ring's token runs per step."""
    return "chunks" if algorithm == "ulysses" else "runs per ring step"


def joint_suffix(p) -> str:
    """How a Plan or Candidate handles the joint tokens, when not the default, for its label."""
    return ((", joint folded" if p.joint_fold else "")
            + (", all joint queries on every ring member" if p.joint_all else ""))


def label(c: Candidate) -> str:
    fold = joint_suffix(c)
    if c.chunks > 1:
        return f"{c.label} in {c.chunks} {chunk_unit(c.algorithm)}{fold}"
    if c.algorithm == "torus":
        return (f"torus u={c.ulysses_degree} x t={torus_degree(c)} x r={c.ring_degree} "
                f"[{c.placement}]{fold}")
    return c.label + fold


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.4g} ms"


def _bytes(kinds) -> str:
    return ", ".join(f"{k} {n / 1e6:.4g} MB" for k, n in kinds) or "none"


def explain_plan(plan: Plan) -> str:
    """The text of Plan.explain(): context, every candidate with its cost, the chosen steps."""
    lines = []
    if plan.context:
        lines.append(plan.context)
    lines.append(f"Chosen: {plan}")
    if not plan.candidates:
        lines.append("(no candidates recorded: this plan did not come from the cost model)")
        return "\n".join(lines)
    lines.append("")
    lines.append("Candidates (time = sum of steps; blocking steps add, ring steps cost max(local, comm),")
    lines.append("  torus blocks wait for their exchange only if it is still in flight;")
    lines.append("  local = attention FLOPs / rate + memory-bound copies and LSE merges / memory bandwidth):")
    hdr = (f"  {'':2}{'algorithm':<8} {'u':>3} {'t':>3} {'r':>3} {'placement':<12} {'predicted':>11} "
           f"{'local':>11} {'exposed comm':>12}  bytes sent by the busiest rank / bottleneck")
    lines.append(hdr)
    ranked = sorted((c for c in plan.candidates if c.valid), key=lambda c: c.predicted_s)
    win = plan.chosen()
    for c in plan.candidates:
        mark = "* " if c is win else "  "
        head = (f"  {mark}{c.algorithm:<8} {c.ulysses_degree:>3} {torus_degree(c):>3} "
                f"{c.ring_degree:>3} {_placement(c):<12}")
        if not c.valid:
            lines.append(f"{head} dropped: {c.dropped}")
            continue
        rank = ranked.index(c) + 1
        lines.append(f"{head} {_ms(c.predicted_s):>11} {_ms(c.compute_s):>11} "
                     f"{_ms(c.exposed_comm_s):>12}  #{rank}; {_bytes(c.bytes_by_kind)}")
        if c.bottleneck:
            lines.append(f"  {'':2}{'':<8} {'':>3} {'':>3} {'':>3} {'':<12} {'':>11} {'':>11} {'':>12}  "
                         f"slowest exchange: {c.bottleneck}")
    if win is not None:
        lines.append("")
        lines.append(f"Steps of the chosen plan ({label(win)}):")
        shown = 0
        steps = list(win.steps)
        for i, s in enumerate(steps):
            # ring steps with identical costs are folded into one line
            if i > 0 and shown and _same(steps[i - 1], s):
                continue
            same = 1
            while i + same < len(steps) and _same(s, steps[i + same]):
                same += 1
            if s.overlapped and s.name.startswith("torus"):
                how = (f"local {_ms(s.compute_s)} + wait {_ms(s.time_s - s.compute_s)} "
                       f"(transfer {_ms(s.comm_s)}, overlapped)")
            elif s.overlapped:
                how = f"max(local {_ms(s.compute_s)}, comm {_ms(s.comm_s)})"
            else:
                how = f"local {_ms(s.compute_s)} + comm {_ms(s.comm_s)}"
            times = f" x{same}" if same > 1 else ""
            extra = f"  [{s.bottleneck}]" if s.bottleneck else ""
            lines.append(f"  {s.name}{times}: {_ms(s.time_s)} = {how}{extra}")
            shown += 1
        lines.append("")
        lines.append(f"Why: {plan.reason}.")
        dropped = [c for c in plan.candidates if not c.valid]
        if dropped:
            lines.append(f"{len(dropped)} candidate(s) dropped (reasons above).")
    return "\n".join(lines)


def joint_tags(joint_fold: bool, joint_all: bool) -> str:
    """The short form of joint_suffix, for tables: " +fold", " +jall"."""
    return (" +fold" if joint_fold else "") + (" +jall" if joint_all else "")


def _placement(c) -> str:
    unit = "ch" if c.algorithm == "ulysses" else "runs"
    return (c.placement + (f" x{c.chunks}{unit}" if c.chunks > 1 else "")
            + joint_tags(c.joint_fold, c.joint_all))


def _same(a, b) -> bool:
    return (a.overlapped == b.overlapped and a.name.split(" ")[:2] == b.name.split(" ")[:2]
            and "compute only" not in a.name + b.name
            and math.isclose(a.time_s, b.time_s, rel_tol=1e-9)
            and math.isclose(a.comm_s, b.comm_s, rel_tol=1e-9))
