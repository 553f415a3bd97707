"""Emulation specs: ``"MxG"`` or ``"MxG:key=value,..."`` -> a `Topology` of M nodes x G ranks.

Ranks are assigned to nodes consecutively: ranks ``[n*G, (n+1)*G)`` are node ``n``. This is how the
CPU tests and the emulated cluster (one network namespace per node, shaped uplinks) declare nodes.

Keys (case-insensitive, each at most once):
  ``intra=<bandwidth>``    link between ranks of one node    (default 10 GB/s, see below)
  ``inter=<bandwidth>``    link between nodes                 (default 1 Gbit/s)
  ``intra_lat=<time>``     one-way latency inside a node      (default 1 us)
  ``inter_lat=<time>``     one-way latency between nodes      (default 50 us)
  ``intra_kind=<kind>``    a `LinkKind` value, e.g. ``nvlink`` (default ``shm``)
  ``inter_kind=<kind>``    e.g. ``infiniband`` (default ``ethernet``)

Bandwidths are stored as bytes/s per direction; units as in `units.py` (``20GB/s``, ``1Gbit/s``,
``200mbit``; ``Gb/s`` and ``*bps`` are rejected as ambiguous). Times: ``s ms us µs ns``.

Defaults for an emulated CPU node (all labelled ``source="declared"``, never measured):
  intra = SHM, 10 GB/s, 1 us  -- an order-of-magnitude figure for a shared-memory copy between two
          processes of one host; the probe replaces it with a measured number where it runs.
  inter = ETHERNET, 1 Gbit/s (125e6 B/s), 50 us, ``shared_by=G`` -- the emulated cluster shapes one
          uplink per node, which all G ranks of the node share.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

from .model import Link, LinkKind, Topology
from .units import parse_bandwidth, parse_time

__all__ = ["DEFAULT_INTER", "DEFAULT_INTRA", "is_spec", "parse_bandwidth", "parse_shape", "parse_spec",
           "parse_time"]

DEFAULT_INTRA = Link(LinkKind.SHM, 10e9, 1e-6, source="declared")
DEFAULT_INTER = Link(LinkKind.ETHERNET, 125e6, 50e-6, source="declared")

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def is_spec(text: str) -> bool:
    """True if ``text`` looks like an emulation spec (starts with ``MxG``)."""
    if not isinstance(text, str):
        return False
    return bool(_SHAPE.match(text.split(":", 1)[0]))


def _parse_kind(text: str, key: str) -> LinkKind:
    try:
        return LinkKind(text.strip().lower())
    except ValueError:
        raise ValueError(
            f"bad {key}={text!r}: known link kinds are {[k.value for k in LinkKind]}"
        ) from None


def parse_shape(text: str) -> Tuple[int, int]:
    """``"2x4"`` -> (2, 4)."""
    m = _SHAPE.match(text)
    if not m:
        raise ValueError(f"bad emulation shape {text!r}: expected NODESxRANKS_PER_NODE, e.g. 2x4")
    nodes, per = int(m.group(1)), int(m.group(2))
    if nodes < 1 or per < 1:
        raise ValueError(f"bad emulation shape {text!r}: both numbers must be >= 1")
    return nodes, per


def parse_spec(spec: str) -> Topology:
    """Parse an emulation spec (see the module docstring) into a `Topology`.

    Raises ValueError naming the malformed part.
    """
    if not isinstance(spec, str):
        raise ValueError(f"emulation spec must be a string, got {type(spec).__name__}")
    shape_part, sep, opts = spec.strip().partition(":")
    nodes, per = parse_shape(shape_part)
    values: Dict[str, str] = {}
    if sep:
        if not opts.strip():
            raise ValueError(f"empty option list after ':' in spec {spec!r}")
        for item in opts.split(","):
            if "=" not in item:
                raise ValueError(f"bad option {item.strip()!r} in spec {spec!r}: expected key=value")
            k, v = (s.strip() for s in item.split("=", 1))
            k = k.lower()
            if k not in ("intra", "inter", "intra_lat", "inter_lat", "intra_kind", "inter_kind"):
                raise ValueError(
                    f"unknown option {k!r} in spec {spec!r}; known: intra, inter, intra_lat, "
                    "inter_lat, intra_kind, inter_kind"
                )
            if k in values:
                raise ValueError(f"option {k!r} given twice in spec {spec!r}")
            if not v:
                raise ValueError(f"option {k!r} has no value in spec {spec!r}")
            values[k] = v

    def build(prefix: str, default: Link, shared_by: int) -> Link:
        given = [k for k in values if k.startswith(prefix + "_") or k == prefix]
        kind = _parse_kind(values[prefix + "_kind"], prefix + "_kind") if prefix + "_kind" in values else default.kind
        bw = parse_bandwidth(values[prefix]) if prefix in values else default.bandwidth_Bps
        lat = parse_time(values[prefix + "_lat"]) if prefix + "_lat" in values else default.latency_s
        source = "declared:spec" if given else "declared"
        return Link(kind, bw, lat, source=source, shared_by=shared_by)

    intra = build("intra", DEFAULT_INTRA, 1)
    inter = build("inter", DEFAULT_INTER, per)
    node = tuple(r // per for r in range(nodes * per))
    return Topology(
        world_size=nodes * per,
        node=node,
        intra=intra,
        inter=inter,
        name=spec.strip(),
        provenance=f"spec:{spec.strip()}",
        device="emulated",
        notes="emulation spec; link numbers are declared, not measured",
    )
