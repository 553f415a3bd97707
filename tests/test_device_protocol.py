"""The stream-ordered protocol of the csrc/ device kernels (transport/device.py), run on CPU over
shm (STREAMATTN_TRANSPORT=shm-device: the same protocol code as nvshmem-device, each step executed
by the host): every algorithm exact against float64 with messages cut into many chunks (small
slots), the pre-fix Torus order blocking like NCCL, and the GPU watchdog naming the peer."""
import time

import pytest
import torch

from streamattn.errors import PeerTimeoutError

CASES = "streamattn.testing.cases:check_attention"


def env(spec, **extra):
    # 4 KiB slots: every message of these shapes spans several chunks, so rounds and acks matter
    return {"STREAMATTN_TOPOLOGY": spec, "STREAMATTN_TRANSPORT": "shm-device",
            "STREAMATTN_SHM_SLOT_MB": "0.004", "STREAMATTN_TIMEOUT_S": "60", **extra}


CONFIGS = [("torus", None, None), ("ulysses", None, None), ("ring", None, None), ("usp", 2, None),
           ("auto", None, None)]


@pytest.mark.parametrize("P,spec", [(4, "2x2"), (8, "2x4"), (8, "4x2")])
@pytest.mark.parametrize("algorithm,u,r", CONFIGS + [("torus", 2, 2)])
def test_every_algorithm_over_device_protocol(rank_pool, P, spec, algorithm, u, r):
    if (algorithm, u, r) == ("torus", 2, 2) and spec != "4x2":
        pytest.skip("ring factor case: 8 ranks, 2 per node")
    heads = 12 if r else 24
    lens = [40 + (i * 7) % 13 for i in range(P)]
    res = rank_pool(P, env(spec)).run(CASES, seq=sum(lens), lens=lens, heads=heads, head_dim=16,
                                      joint_len=5, algorithm=algorithm, ulysses_degree=u, ring_degree=r)
    assert max(x["err"] for x in res) <= 1e-5, res
    assert max(x["joint_err"] for x in res) <= 1e-5
    assert "transport=shm-device" in res[0]["plan"], res[0]["plan"]


@pytest.mark.parametrize("P", [4])
def test_device_protocol_causal_and_negative_control(rank_pool, P):
    pool = rank_pool(P, env("1x4", STREAMATTN_TIMEOUT_S="4"))
    for algo in ("ring", "torus", "ulysses"):
        res = pool.run(CASES, seq=203, heads=8, kv_heads=2, head_dim=16, causal=True, algorithm=algo,
                       ulysses_degree=1 if algo == "torus" else None)
        assert max(x["err"] for x in res) <= 1e-5, (algo, res)
    res = pool.run("streamattn.testing.nccl_order:legacy_torus", seq=203, heads=8, head_dim=16,
                   ulysses_degree=1, timeout=90)
    assert all(x["type"] in ("PeerTimeoutError", "PeerError") for x in res), res
    assert any(x["type"] == "PeerTimeoutError" and "rank" in x["error"] for x in res), res


def test_gpu_watchdog_names_the_peer(monkeypatch):
    """NvshmemDeviceOps returns CUDA events; an exchange whose event never completes must end in
    PeerTimeoutError naming its peers, on wait()."""
    from streamattn.transport import device

    class NeverOps:
        def __init__(self, t, heap):
            pass

        def put_chunk(self, *a):
            pass

        def take_chunk(self, *a):
            pass

        def record(self):
            return object()

        @staticmethod
        def done(token):
            return False

    t = device.StreamOrderedTransport.__new__(device.StreamOrderedTransport)
    t.timeout, t.slot_bytes, t.inflight = 0.2, 4096, __import__("collections").deque()
    t.local_index, t.members, t.ops = {0: 0, 1: 1}, [0, 1], NeverOps(None, None)
    t.steps_out, t.steps_in = [0, 0], [0, 0]
    t.counters = __import__("streamattn.transport.base", fromlist=["ByteCounters"]).ByteCounters()
    monkeypatch.setenv("STREAMATTN_TIMEOUT_S", "0.2")
    t.base = type("B", (), {"node_of": [0, 0], "describe_peer": lambda self, p: f"rank {p}"})()
    t.rank, t.size = 0, 2
    pend = t.exchange([(1, torch.ones(4))], [(1, torch.empty(4))], tag=7)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeoutError, match="rank 1"):
        pend.wait()
    assert time.monotonic() - t0 < 5
