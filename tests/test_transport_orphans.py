"""An exchange dropped before its wait() (an abandoned StaleKV state, a call that raised with other
exchanges posted) must not break the connection it was posted on: the transport keeps its works
alive until they complete (TorchTransport.adopt)."""
import pytest


@pytest.mark.parametrize("via", ["raw", "raw-shm", "stale"])
@pytest.mark.parametrize("P", [2, 3])
def test_dropped_exchange_leaves_the_pairs_working(rank_pool, P, via):
    res = rank_pool(P).run("streamattn.testing.robustness_cases:dropped_exchange", via=via,
                           timeout=120)
    for rank, r in enumerate(res):
        assert r["bad"] == 0, f"rank {rank}: {r['bad']} wrong payloads after the dropped exchange"
        assert r["err"] < 1e-5, f"rank {rank}: error {r['err']:.2e} after the dropped exchange"
        assert r["in_flight"] == 0, f"rank {rank}: {r['in_flight']} adopted works never completed"
