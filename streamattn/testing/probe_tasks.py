"""RankPool task behind `streamattn probe --nproc N`: the ranks probe their group together."""
from __future__ import annotations


def probe_topology(rank, world_size, *, measure=True):
    """Collective `streamattn.topology.probe` over the pool's world group (no cache: a fresh
    measurement). Returns the Topology as JSON text; every rank returns the identical text."""
    from ..topology import probe

    return probe(measure=bool(measure), cache=False).to_json()
