"""Endurance: 10,000 calls keep every rank's memory flat (no cache, buffer or handle leak)."""
import pytest


@pytest.mark.parametrize("P", [2])
def test_soak_10000_calls_memory_flat(rank_pool, P):
    res = rank_pool(P).run("streamattn.testing.cases:soak", calls=10000, timeout=600)
    for r in res:
        growth = r["rss_end"] - r["rss_warm"]
        assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {r['calls']} calls"


CYCLE_REQUESTS = [
    {"algorithm": "ulysses"},
    {"algorithm": "ulysses", "settings": {"STREAMATTN_ULYSSES_CHUNKS": 2}},
    {"algorithm": "ring"},
    {"algorithm": "ring", "settings": {"STREAMATTN_RING_CHUNKS": 2}},
    {"algorithm": "ring", "causal": True},
    {"algorithm": "usp", "ulysses_degree": 2},
    {"algorithm": "usp", "ulysses_degree": 2, "joint_len": 5},
    {"algorithm": "torus"},
    {"algorithm": "torus", "joint_len": 3},
    {"algorithm": "auto"},
    {"algorithm": "ring", "joint_len": 4, "backward": True},
    {"algorithm": "usp", "ulysses_degree": 2, "backward": True},
    {"algorithm": "ring", "joint_len": 4, "backward": True,
     "settings": {"STREAMATTN_JOINT_ALL": "always"}},
    {"algorithm": "usp", "ulysses_degree": 2, "joint_len": 3, "backward": True,
     "settings": {"STREAMATTN_JOINT_FOLD": "always"}},
    {"stale": True},
    {"stale": True, "joint_len": 3},
]


def test_calls_leave_no_cyclic_garbage(rank_pool):
    """A call must free what it allocated when it returns: anything it leaves in a reference
    cycle (a class defined per call, a closure that references itself) holds its message
    buffers until a full garbage collection, tens of calls later at large shapes, and every
    call then faults fresh pages in. Emulated 2 nodes x 2 ranks: shm inside, gloo across."""
    pool = rank_pool(4, env={"STREAMATTN_TOPOLOGY": "2x2"})
    res = pool.run("streamattn.testing.cases:cyclic_garbage", requests=CYCLE_REQUESTS)
    for r in res:
        left = {str(CYCLE_REQUESTS[int(i)]): g for i, g in r.items() if g}
        assert not left, f"calls left cyclic garbage: {left}"
    assert len(res[0]) == len(CYCLE_REQUESTS)
