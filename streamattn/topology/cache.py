"""On-disk cache of probed topologies.

Location: ``$STREAMATTN_CACHE_DIR`` or ``~/.cache/streamattn/`` (directory created 0700), one file
``topology-<key>.json`` per key, written atomically (temp file in the same directory, fsync,
``os.replace``) with mode 0600. Read only from a directory and file owned by the current user and
not writable by others (never through a symlink), with every number finite. The key hashes the sorted host identities, the group size, the
backend, the device kind and, on an emulated cluster, its shaped links; the file also stores the per-rank host list, and a hit whose rank ->
host map differs from the current one is treated as a miss. JSON only, never pickle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
from typing import Optional, Sequence

from ..files import write_private
from .. import config
from .model import FORMAT, Topology

CACHE_ENV = "STREAMATTN_CACHE_DIR"


def cache_dir() -> str:
    return config.cache_dir()


def cache_key(hosts: Sequence[int], world_size: int, backend: str, device_kind: str,
              links: str = "") -> str:
    """links: the emulated cluster's shaped links (config.emulated_links), "" on real links: the
    same emulated hosts at another rate are another topology."""
    fields = {"format": FORMAT, "hosts": sorted(int(h) for h in hosts), "world_size": int(world_size),
              "backend": backend, "device": device_kind}
    if links:
        fields["links"] = links
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_path(key: str) -> str:
    return os.path.join(cache_dir(), f"topology-{key}.json")


class UnsafeCache(OSError):
    """The cache file or directory may have been written by someone else."""


def _check_dir(d: str) -> None:
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCache(f"the cache directory {d} is a symlink")
    if st.st_uid != os.geteuid():
        raise UnsafeCache(f"the cache directory {d} is owned by uid {st.st_uid}, not by you")
    if st.st_mode & 0o022:
        raise UnsafeCache(f"the cache directory {d} is writable by others "
                          f"(mode {stat.S_IMODE(st.st_mode):o})")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"non-finite number {text}")
    return x


def _reject(name: str):
    raise ValueError(f"non-finite number {name}")


def load(key: str, hosts: Sequence[int]) -> Optional[Topology]:
    """The cached topology for ``key`` if present, valid and for the same rank -> host map.

    Treated as a miss (None): a missing file, malformed JSON, non-finite or non-positive numbers,
    another key or host list. Refused with a warning (also None): a symlink, a file not owned by
    the current user or writable by others, a cache directory writable by others. A miss is
    re-probed and the file rewritten."""
    path = cache_path(key)
    try:
        _check_dir(os.path.dirname(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except UnsafeCache as e:
        warnings.warn(f"streamattn: ignoring the topology cache: {e}")
        return None
    except OSError as e:  # O_NOFOLLOW on a symlink: ELOOP
        warnings.warn(f"streamattn: ignoring the topology cache file {path}: {e}")
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            warnings.warn(f"streamattn: ignoring the topology cache file {path}: owned by uid "
                          f"{st.st_uid} with mode {stat.S_IMODE(st.st_mode):o} (must be yours, "
                          "not writable by others)")
            return None
        with os.fdopen(fd, "r", encoding="utf-8") as f:
            fd = None
            d = json.load(f, parse_float=_finite, parse_constant=_reject)
        if d.get("key") != key or [int(h) for h in d.get("hosts", [])] != [int(h) for h in hosts]:
            return None
        topo = Topology.from_dict(d["topology"])
        if topo.peak_flops is not None and not topo.peak_flops > 0:
            return None
        topo.to_json()  # everything it holds must serialise (finite) for the broadcast
        return topo
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        if fd is not None:
            os.close(fd)


def store(key: str, hosts: Sequence[int], topo: Topology) -> str:
    """Write atomically with mode 0600; returns the path."""
    d = cache_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    _check_dir(d)  # never write where others can (UnsafeCache is an OSError for the caller)
    path = cache_path(key)
    data = json.dumps(
        {"key": key, "hosts": [int(h) for h in hosts], "topology": topo.to_dict()},
        indent=1,
        allow_nan=False,
    )
    return write_private(path, data + "\n", ".topology-")
