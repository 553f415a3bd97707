"""Shared fixtures. `rank_pool(P)` keeps ONE pool of P gloo ranks alive at a time and reuses it
across tests; tests that take a `P` parameter are reordered by P so each size spawns once."""
from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and diffusers (imported while collecting
# the integration tests) imports triton: set it before anything, so the kernels run in the
# interpreter on this GPU-less machine whatever the collection order.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import collections
import shutil
import tempfile
import time

import pytest

from streamattn.testing import RankPool
from streamattn.testing.pool import close_zygote

# Kernel calibrations and probed topologies of this session stay in a directory of its own (the
# workers inherit it), never read from or written to the developer's ~/.cache/streamattn.
_CACHE = None
if "STREAMATTN_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["STREAMATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="streamattn-tests-")

# Live pools by (P, env), least recently used first. Ranks are forked from a zygote that imported
# torch once (streamattn.testing.zygote: a 4-rank pool starts in ~0.1 s; started as processes,
# each rank spent ~2 s of CPU importing torch, 194 s of waiting over a suite run), and the tests
# of one P use several environments in turn, so a few idle pools stay alive (an idle rank blocks
# on its pipe: no CPU) instead of being respawned each time the environment changes back.
MAX_LIVE_RANKS = 20
_pools: "collections.OrderedDict" = collections.OrderedDict()
_stats = {"spawned": 0, "seconds": 0.0, "again": 0}
_seen = set()


def _close(key=None):
    # grace=0: the idle ranks are killed rather than asked to exit (an orderly exit costs each
    # rank ~0.35 s of CPU tearing down gloo and torch, ~1 min over a suite run on 2 cores); their
    # shm segments are already unlinked and their sockets die with them.
    for k in ([key] if key is not None else list(_pools)):
        pool = _pools.pop(k, None)
        if pool is not None:
            pool.close(grace=0)


@pytest.fixture(scope="session")
def rank_pool():
    """rank_pool(P, env=None) -> a live RankPool of P ranks with extra environment `env` (shared
    across tests with the same P and env; do not close it)."""

    def get(world_size: int, env=None) -> RankPool:
        key = (world_size, tuple(sorted((env or {}).items())))
        pool = _pools.get(key)
        if pool is not None and pool.alive():
            _pools.move_to_end(key)
            return pool
        _close(key)
        while _pools and sum(k[0] for k in _pools) + world_size > MAX_LIVE_RANKS:
            _close(next(iter(_pools)))
        t0 = time.monotonic()
        _pools[key] = RankPool(world_size, env=env, fork=True)  # forked from a pre-imported zygote
        _stats["spawned"] += 1
        _stats["again"] += key in _seen  # spawned before, then evicted (or died)
        _seen.add(key)
        _stats["seconds"] += time.monotonic() - t0
        return _pools[key]

    yield get
    _close()


def pytest_terminal_summary(terminalreporter):
    if _stats["spawned"]:
        terminalreporter.write_line(f"rank pools spawned: {_stats['spawned']}, {_stats['again']} of them "
                                    f"again after an eviction ({_stats['seconds']:.0f} s waiting for them)")


def pytest_collection_modifyitems(session, config, items):
    def key(item):
        cs = getattr(item, "callspec", None)
        p = cs.params.get("P") if cs is not None else None
        spec = str(cs.params.get("spec", "")) if cs is not None else ""
        # Tests without a P keep their place relative to each other and run first; tests sharing
        # (P, topology spec) run together so each pool spawns once.
        return (0, 0, "") if p is None else (1, p, spec)

    items.sort(key=key)


def pytest_sessionfinish(session, exitstatus):
    _close()
    close_zygote()
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
