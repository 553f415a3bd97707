"""Plans: which algorithm and degrees run a call. A plan is data: print it, compare it, save it.

`choose_plan` validates a forced choice (algorithm / degrees) or picks one for "auto". The "auto"
rule here is the simple one (largest Ulysses degree that divides the heads and fits in a node, ring
across); the topology-aware cost model replaces it (see issue 4).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

ALGORITHMS = ("auto", "ulysses", "ring", "usp")


@dataclass(frozen=True)
class Plan:
    """How one call runs.

    algorithm: "local" | "ulysses" | "ring" | "usp"; ulysses_degree * ring_degree == world size.
    groups: the Ulysses groups as tuples of group ranks; ring j is made of member j of every group,
    in group order. Empty means consecutive groups: rank g*u + j is member j of group g. Causal
    calls need consecutive groups (each group's tokens must be contiguous positions).
    predicted_s: the cost model's time for the call (None when not costed).
    candidates: what the planner considered, for explain() (not serialised).
    """

    algorithm: str
    ulysses_degree: int
    ring_degree: int
    groups: tuple = ()
    transport: str = "torch"
    predicted_s: Optional[float] = None
    reason: str = ""
    candidates: tuple = field(default=(), compare=False, repr=False)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("candidates")
        d["groups"] = [list(g) for g in self.groups]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        d["groups"] = tuple(tuple(g) for g in d.get("groups", ()))
        return cls(**d)

    def ulysses_groups(self) -> tuple:
        if self.groups:
            return self.groups
        u = self.ulysses_degree
        return tuple(tuple(g * u + j for j in range(u)) for g in range(self.ring_degree))

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
        return (f"Plan({self.algorithm}, ulysses={self.ulysses_degree} x ring={self.ring_degree}, "
                f"transport={self.transport}{extra}{', ' + self.reason if self.reason else ''})")


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_ulysses_degrees(world: int, heads: int) -> list:
    """Ulysses degrees u with u | world (rings of equal size) and u | heads."""
    return [u for u in _divisors(world) if heads % u == 0]


def _make(u: int, world: int, reason: str) -> Plan:
    r = world // u
    if world == 1:
        return Plan("local", 1, 1, reason=reason)
    algo = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
    return Plan(algo, u, r, reason=reason)


def choose_plan(problem, node_of, algorithm="auto", ulysses_degree=None, ring_degree=None) -> Plan:
    """Validate a forced plan or pick one. Raises ValueError naming what would be valid.

    node_of[r]: node of group rank r (for "auto": keep Ulysses inside a node)."""
    world, H = problem.world_size, problem.heads
    valid = valid_ulysses_degrees(world, H)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"streamattn: algorithm={algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
    if world == 1:
        return Plan("local", 1, 1, reason="group of size 1")
    if ulysses_degree is not None and ring_degree is not None and ulysses_degree * ring_degree != world:
        raise ValueError(f"streamattn: ulysses_degree={ulysses_degree} x ring_degree={ring_degree} "
                         f"!= group size {world}")
    u = ulysses_degree
    if u is None and ring_degree is not None:
        if ring_degree < 1 or world % ring_degree:
            raise ValueError(f"streamattn: ring_degree={ring_degree} does not divide the group size "
                             f"{world}; valid ring degrees: {', '.join(map(str, _divisors(world)))}")
        u = world // ring_degree
    if algorithm == "ulysses":
        if u not in (None, world):
            raise ValueError(f"streamattn: algorithm='ulysses' uses ulysses_degree={world} (the group "
                             f"size), got {u}; use algorithm='usp' for a hybrid")
        u = world
    elif algorithm == "ring":
        if u not in (None, 1):
            raise ValueError(f"streamattn: algorithm='ring' uses ulysses_degree=1, got {u}; use "
                             "algorithm='usp' for a hybrid")
        u = 1
    elif algorithm == "usp" and u is None:
        algorithm = "auto"  # usp without degrees: let the rule pick the factorization
    if u is not None:
        if u < 1 or world % u:
            raise ValueError(f"streamattn: ulysses_degree={u} does not divide the group size {world}; "
                             f"valid degrees for {H} heads: {', '.join(map(str, valid))}")
        if H % u:
            raise ValueError(f"streamattn: {H} query heads cannot be split over ulysses_degree={u}; "
                             f"valid degrees for {H} heads on {world} ranks: "
                             f"{', '.join(map(str, valid))}")
        return _make(u, world, reason="requested")
    return auto_plan(problem, node_of)


def auto_plan(problem, node_of) -> Plan:
    """Simple rule: the largest valid Ulysses degree whose groups stay inside one node."""
    world = problem.world_size
    best = 1
    for u in valid_ulysses_degrees(world, problem.heads):
        groups_intra = all(len({node_of[g * u + j] for j in range(u)}) == 1 for g in range(world // u))
        if groups_intra:
            best = max(best, u)
    return _make(best, world, reason="auto: largest Ulysses degree inside a node that divides the heads")
