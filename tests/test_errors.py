"""Bad input and failing peers: a clear error on every rank, quickly; never a hang."""
import os
import time

import pytest
import torch

import streamattn
from streamattn.testing import RankPool

BAD = "streamattn.testing.cases:bad_input"


@pytest.mark.parametrize("P", [3])
@pytest.mark.parametrize("kind", ["heads", "dtype", "layout", "ndim", "head_dim"])
def test_one_bad_rank_every_rank_raises(rank_pool, P, kind):
    res = rank_pool(P).run(BAD, bad_rank=1, kind=kind)
    assert all(r["type"] == "ValueError" for r in res), res
    assert len({r["error"] for r in res}) == 1, "every rank must raise the same message"
    assert "rank 1" in res[0]["error"]
    assert max(r["seconds"] for r in res) < 30


@pytest.mark.parametrize("P", [4])
def test_heads_not_divisible_names_valid_degrees(rank_pool, P):
    res = rank_pool(P).run_raw("streamattn.testing.cases:check_attention", seq=20, heads=6,
                               algorithm="ulysses")
    assert all(not r["ok"] and r["type"] == "ValueError" for r in res), res
    assert "valid degrees" in res[0]["error"] and "1, 2" in res[0]["error"]
    res = rank_pool(P).run_raw("streamattn.testing.cases:check_attention", seq=20, heads=6,
                               algorithm="usp", ulysses_degree=3)
    assert all(not r["ok"] and "does not divide the group size 4" in r["error"] for r in res), res
    # auto finds a valid plan instead of failing
    res = rank_pool(P).run("streamattn.testing.cases:check_attention", seq=20, heads=6)
    assert res[0]["ulysses_degree"] in (1, 2) and max(r["err"] for r in res) < 1e-5, res[0]


@pytest.mark.parametrize("P", [3])
def test_second_call_does_no_metadata_exchange(rank_pool, P):
    res = rank_pool(P).run("streamattn.testing.cases:count_metadata_exchanges", calls=5)
    assert all(r["first"] >= 1 and r["later"] == 0 for r in res), res


def _no_leftover(pool_pids):
    for pid in pool_pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is reaped by close(); anything else is a leak
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().split()[2] == "Z", f"process {pid} left behind"


@pytest.mark.parametrize("transport", ["torch", "shm"])
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_rank_dies_mid_call(algorithm, transport):
    pool = RankPool(3, env={"STREAMATTN_TIMEOUT_S": "8", "STREAMATTN_TRANSPORT": transport}, fork=True)
    pids = [p.pid for p in pool.procs]
    try:
        t0 = time.monotonic()
        res = pool.run_raw("streamattn.testing.cases:die_mid_call", dying_rank=2,
                           algorithm=algorithm, timeout=60)
        assert time.monotonic() - t0 < 30
        assert res[2] is None and pool.procs[2].wait(timeout=10) == 17
        raised = 0
        for r in res[:2]:
            got = r["result"]
            if got["type"] is None:  # all its data had landed (one-sided): exact, not wrong
                assert got["err"] < 1e-5, got
                continue
            raised += 1
            assert got["type"] in ("PeerError", "PeerTimeoutError"), got
            assert "rank 2" in got["error"] and got["peer"] == 2, got
        assert raised >= 1
    finally:
        pool.close()
    _no_leftover(pids)


def test_silent_peer_times_out_naming_it():
    pool = RankPool(2, env={"STREAMATTN_TIMEOUT_S": "3"}, fork=True)
    try:
        res = pool.run_raw("streamattn.testing.cases:silent_peer", silent_rank=1, timeout=60)
        got = res[0]["result"]
        assert got["type"] == "PeerTimeoutError" and "rank 1" in got["error"], got
        assert 2.5 < got["seconds"] < 15, got
    finally:
        pool.close()


@pytest.mark.parametrize("exits", [False, True])
def test_warm_shm_call_names_the_rank_missing_from_the_signature_board(exits):
    """After a first call the per-call signature goes through the shm board: a rank that does not
    come (silent, or its process gone) is named by every other rank, after the timeout or at once."""
    pool = RankPool(3, env={"STREAMATTN_TIMEOUT_S": "3", "STREAMATTN_TRANSPORT": "shm"}, fork=True)
    try:
        res = pool.run_raw("streamattn.testing.cases:silent_peer", silent_rank=2, warm=True,
                           exits=exits, timeout=60)
        for got in (res[0]["result"], res[1]["result"]):
            if exits:
                assert got["type"] == "PeerError" and "rank 2" in got["error"], got
                assert got["seconds"] < 2.5, got
            else:
                assert got["type"] == "PeerTimeoutError" and "rank 2" in got["error"], got
                assert "signature board" in got["error"] and 2.5 < got["seconds"] < 15, got
    finally:
        pool.close()


@pytest.mark.parametrize("silent_rank", [2, 3])
@pytest.mark.parametrize("exits", [False, True])
def test_warm_shm_call_on_two_nodes_names_the_missing_rank_on_every_rank(silent_rank, exits):
    """On two nodes the signature's other-node rows travel between the nodes' leaders (ranks 0
    and 2 of a 2 x 2 node map): a missing leader (2) or member (3) is named by every other rank,
    also by those that waited on a leader instead of on it, within the staggered timeouts."""
    from streamattn.transport.onesided import LEADER_GRACE_S

    timeout = 3.0
    pool = RankPool(4, env={"STREAMATTN_TIMEOUT_S": str(timeout), "STREAMATTN_TRANSPORT": "shm",
                            "STREAMATTN_TOPOLOGY": "2x2"}, fork=True)
    try:
        res = pool.run_raw("streamattn.testing.cases:silent_peer", silent_rank=silent_rank,
                           warm=True, exits=exits, timeout=60)
        for rank, r in enumerate(res):
            if rank == silent_rank:
                continue
            got = r["result"]
            assert got["type"] in ("PeerError", "PeerTimeoutError"), (rank, got)
            assert got["peer"] == silent_rank and f"rank {silent_rank}" in got["error"], (rank, got)
            assert got["seconds"] < timeout + 2 * LEADER_GRACE_S + 2, (rank, got)
    finally:
        pool.close()


def test_local_errors_single_process():
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match="layout"):
        streamattn.attention(q, q, q, layout="sbhd")
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        streamattn.attention(q, q[:, :, :3], q[:, :, :3])
    with pytest.raises(ValueError, match="4-D"):
        streamattn.attention(q[0], q, q)
    with pytest.raises(ValueError, match="dtype"):
        streamattn.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="causal=True with joint"):
        streamattn.attention(q, q, q, causal=True, joint_q=q, joint_k=q, joint_v=q)
    with pytest.raises(ValueError, match="given together"):
        streamattn.attention(q, q, q, joint_q=q)
    with pytest.raises(ValueError, match="STREAMATTN_TIMEOUT_S"):
        os.environ["STREAMATTN_TIMEOUT_S"] = "soon"
        try:
            from streamattn.config import timeout_s

            timeout_s()
        finally:
            del os.environ["STREAMATTN_TIMEOUT_S"]
