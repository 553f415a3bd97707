"""Shared fixtures. `rank_pool(P)` keeps ONE pool of P gloo ranks alive at a time and reuses it
across tests; tests that take a `P` parameter are reordered by P so each size spawns once."""
from __future__ import annotations

import pytest

from streamattn.testing import RankPool

_state = {"pool": None}


def _close():
    if _state["pool"] is not None:
        _state["pool"].close()
        _state["pool"] = None


@pytest.fixture(scope="session")
def rank_pool():
    """rank_pool(P) -> a live RankPool of P ranks (shared; do not close it)."""

    def get(world_size: int) -> RankPool:
        pool = _state["pool"]
        if pool is None or pool.world_size != world_size or not pool.alive():
            _close()
            _state["pool"] = RankPool(world_size)
        return _state["pool"]

    yield get
    _close()


def pytest_collection_modifyitems(session, config, items):
    def key(item):
        cs = getattr(item, "callspec", None)
        p = cs.params.get("P") if cs is not None else None
        # Tests without a P keep their place relative to each other and run first.
        return (0, 0) if p is None else (1, p)

    items.sort(key=key)


def pytest_sessionfinish(session, exitstatus):
    _close()
