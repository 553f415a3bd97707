"""On-disk cache of probed topologies.

Location: ``$STREAMATTN_CACHE_DIR`` or ``~/.cache/streamattn/`` (directory created 0700), one file
``topology-<key>.json`` per key, written atomically (temp file in the same directory, fsync,
``os.replace``) with mode 0600. The key hashes the sorted host identities, the group size, the
backend and the device kind; the file also stores the per-rank host list, and a hit whose rank ->
host map differs from the current one is treated as a miss. JSON only, never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Optional, Sequence

from .. import config
from .model import FORMAT, Topology

CACHE_ENV = "STREAMATTN_CACHE_DIR"


def cache_dir() -> str:
    return config.cache_dir()


def cache_key(hosts: Sequence[int], world_size: int, backend: str, device_kind: str) -> str:
    text = json.dumps(
        {
            "format": FORMAT,
            "hosts": sorted(int(h) for h in hosts),
            "world_size": int(world_size),
            "backend": backend,
            "device": device_kind,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(key: str) -> str:
    return os.path.join(cache_dir(), f"topology-{key}.json")


def load(key: str, hosts: Sequence[int]) -> Optional[Topology]:
    """The cached topology for ``key`` if present, valid and for the same rank -> host map."""
    path = cache_path(key)
    try:
        with open(path, "r", encoding="utf-8") as f:
            d = json.load(f)
        if d.get("key") != key or [int(h) for h in d.get("hosts", [])] != [int(h) for h in hosts]:
            return None
        return Topology.from_dict(d["topology"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: str, hosts: Sequence[int], topo: Topology) -> str:
    """Write atomically with mode 0600; returns the path."""
    d = cache_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = cache_path(key)
    data = json.dumps(
        {"key": key, "hosts": [int(h) for h in hosts], "topology": topo.to_dict()},
        indent=1,
        allow_nan=False,
    )
    fd, tmp = tempfile.mkstemp(prefix=".topology-", suffix=".tmp", dir=d)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
