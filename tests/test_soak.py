"""Endurance: 10,000 calls keep every rank's memory flat (no cache, buffer or handle leak)."""
import pytest


@pytest.mark.parametrize("P", [2])
def test_soak_10000_calls_memory_flat(rank_pool, P):
    res = rank_pool(P).run("streamattn.testing.cases:soak", calls=10000, timeout=600)
    for r in res:
        growth = r["rss_end"] - r["rss_warm"]
        assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over {r['calls']} calls"
