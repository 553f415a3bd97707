"""Topology: model, emulation specs, probe and shipped machine files.

Units: bandwidth bytes/s per direction, latency seconds (one way), compute FLOP/s per rank.

    from streamattn.topology import parse_spec, load_machine, resolve_topology
    print(parse_spec("2x4:intra=20GB/s,inter=1Gbit/s"))   # matrix + legend
    load_machine("h100x8-2node").slowest_link(range(16))   # the InfiniBand link
    topo = resolve_topology(group)   # topology= / $STREAMATTN_TOPOLOGY / probe, same on all ranks
"""
from .hostinfo import kernel_hash, usable_cores
from .machines import list_machines, load_machine
from .model import Link, LinkKind, Topology
from .probe import probe, resolve_topology
from .spec import parse_spec

__all__ = [
    "Topology",
    "Link",
    "LinkKind",
    "parse_spec",
    "load_machine",
    "list_machines",
    "resolve_topology",
    "probe",
    "kernel_hash",
    "usable_cores",
]
