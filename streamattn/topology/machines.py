"""Shipped topologies of well-known machines (``streamattn/topology/machines/*.json``).

The numbers are declared vendor-spec figures (or labelled assumptions), not measurements; each
file's ``notes`` says where they come from. Bandwidths are bytes/s per direction.
"""
from __future__ import annotations

import os
from typing import List

from .model import Topology

_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "machines")


def _files():
    try:
        from importlib import resources

        root = resources.files(__package__).joinpath("machines")
        return {
            p.name[: -len(".json")]: p
            for p in root.iterdir()
            if p.name.endswith(".json") and p.is_file()
        }
    except Exception:  # pragma: no cover - very old importlib / unusual loaders
        return {
            f[: -len(".json")]: os.path.join(_DIR, f)
            for f in os.listdir(_DIR)
            if f.endswith(".json")
        }


def list_machines() -> List[str]:
    """Names of the shipped machine topologies, sorted."""
    return sorted(_files())


def load_machine(name: str) -> Topology:
    """Load a shipped machine topology by name (``"h100x8-2node"``; a ``.json`` suffix is allowed).

    Raises ValueError listing the known names if ``name`` is unknown.
    """
    key = name[: -len(".json")] if name.endswith(".json") else name
    files = _files()
    if key not in files:
        raise ValueError(f"unknown machine {name!r}; known: {', '.join(sorted(files))}")
    p = files[key]
    text = p.read_text(encoding="utf-8") if hasattr(p, "read_text") else open(p).read()
    return Topology.from_json(text)
