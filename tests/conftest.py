"""Shared fixtures. `rank_pool(P)` keeps ONE pool of P gloo ranks alive at a time and reuses it
across tests; tests that take a `P` parameter are reordered by P so each size spawns once."""
from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when it is first imported, and diffusers (imported while collecting
# the integration tests) imports triton: set it before anything, so the kernels run in the
# interpreter on this GPU-less machine whatever the collection order.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import tempfile

import pytest

from streamattn.testing import RankPool

# Kernel calibrations and probed topologies of this session stay in a directory of its own (the
# workers inherit it), never read from or written to the developer's ~/.cache/streamattn.
_CACHE = None
if "STREAMATTN_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["STREAMATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="streamattn-tests-")

_state = {"pool": None}


def _close():
    if _state["pool"] is not None:
        _state["pool"].close()
        _state["pool"] = None


@pytest.fixture(scope="session")
def rank_pool():
    """rank_pool(P, env=None) -> a live RankPool of P ranks with extra environment `env` (shared
    across tests with the same P and env; do not close it)."""

    def get(world_size: int, env=None) -> RankPool:
        key = (world_size, tuple(sorted((env or {}).items())))
        pool = _state["pool"]
        if pool is None or _state.get("key") != key or not pool.alive():
            _close()
            _state["pool"] = RankPool(world_size, env=env)
            _state["key"] = key
        return _state["pool"]

    yield get
    _close()


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
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
