"""The one-sided shm transport: protocol semantics, failures, cleanup, permissions."""
import os
import signal
import stat
import time

import pytest
import torch

from streamattn.testing import RankPool
from streamattn.transport import shm as shm_mod
from streamattn.transport.shm import ShmHeap, remove_stale_segments

pytestmark = pytest.mark.skipif(not shm_mod.supported()[0], reason=shm_mod.supported()[1])


def _segments():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(shm_mod.PREFIX))


@pytest.mark.parametrize("P", [3])
def test_ordering_and_signals_5000_rounds_two_groups(rank_pool, P):
    # 5000 rounds (every slot of every mailbox reused hundreds of times); the 10,000-call endurance
    # check is test_soak's. 10000 rounds took 6.5 s on an idle machine and 34 s on a slow VM stretch.
    res = rank_pool(P).run("streamattn.testing.cases:shm_rounds", rounds=5000, timeout=600)
    for r in res:
        assert r["checked"] == 5000 * 2 * (P - 1)
        assert r["chunks_sent"] > 5000 * 2 * (P - 1)  # multi-chunk messages were exercised
    assert _segments() == []


@pytest.mark.parametrize("node_of,slot_bytes,transport", [
    ([0, 0, 0], 1 << 20, "shm"),       # every message fits a slot: moved part by part
    ([0, 0, 0], 4096, "shm"),          # the larger ones staged through one buffer
    ([0, 0, 1, 1], 1 << 20, "shm"),    # the other node's through the two-sided base
    ([0, 0, 0], 4096, "torch"),        # gloo: every Parts staged
])
def test_parts_messages_land_in_strided_views(rank_pool, node_of, slot_bytes, transport):
    """exchange_parts moves a message given as strided views into strided views, element for
    element, direct or staged, and counts the bytes of the packed message. Negative control: the
    receiver's parts in another order make every message wrong."""
    P = len(node_of)
    res = rank_pool(P).run("streamattn.testing.cases:parts_rounds", node_of=node_of,
                           slot_bytes=slot_bytes, transport=transport, timeout=120)
    for rank, r in enumerate(res):
        assert r["wrong"] == [] and r["counted"] == r["expected_bytes"], (rank, r)
        remote = sum(1 for p in range(P) if node_of[p] != node_of[rank])
        staged = [P - 1 if transport == "torch" or n > slot_bytes else remote
                  for n in r["message_bytes"]]
        assert r["packed"] == sum(staged), (rank, r)  # direct: every message that can be
    assert any(n <= slot_bytes for n in res[0]["message_bytes"])
    control = rank_pool(P).run("streamattn.testing.cases:parts_rounds", node_of=node_of,
                               slot_bytes=slot_bytes, transport=transport, swap_control=True,
                               timeout=120)
    assert all(len(r["wrong"]) == 6 * (P - 1) for r in control), control


@pytest.mark.parametrize("node_of", [[0, 0, 1, 1], [0, 1, 1], [0, 1, 0, 1, 2, 2], [0] * 4 + [1] * 4])
def test_signature_rows_travel_between_node_leaders(rank_pool, node_of):
    """The per-call signature on several nodes: every rank gets every row, in rank order, in every
    call (both board slots), and only each node's lowest rank sends to other nodes, one message
    per other node and call (it was one per remote rank and call). Negative control: the last
    rank sends a wrong row, and every rank sees it in every call."""
    P, calls, nodes = len(node_of), 5, len(set(node_of))
    for skew in (None, P - 1):
        res = rank_pool(P).run("streamattn.testing.cases:signature_rows", node_of=node_of,
                               calls=calls, skew_rank=skew, timeout=120)
        for rank, r in enumerate(res):
            assert r["wrong"] == ([] if skew is None else [[c, skew] for c in range(calls)]), (rank, r)
            leader = rank == node_of.index(node_of[rank])
            assert r["remote_sends"] == (calls * (nodes - 1) if leader else 0), (rank, r)


@pytest.mark.parametrize("node_of,silent_rank", [([0, 0, 1], 2), ([0, 0, 1, 1], 2), ([0, 1, 1], 0)])
def test_signature_silent_rank_is_named_on_every_rank(node_of, silent_rank):
    """A rank silent in the signature, alone on its node or a leader: the leaders see it through
    gloo, and their members -- who wait on their leader, not on it -- name it too (the leader marks
    the failure on their heaps: after a gloo timeout its FailureMailbox report no longer arrives)."""
    from streamattn.transport.onesided import LEADER_GRACE_S

    timeout = 2.0
    with RankPool(len(node_of), env={"STREAMATTN_TIMEOUT_S": str(timeout)}, fork=True) as pool:
        res = pool.run("streamattn.testing.cases:signature_silent_rank", node_of=node_of,
                       silent_rank=silent_rank, timeout=120)
    for rank, r in enumerate(res):
        if rank == silent_rank:
            continue
        assert r["type"] in ("PeerError", "PeerTimeoutError") and r["peer"] == silent_rank, (rank, r)
        assert r["seconds"] < timeout + 2 * LEADER_GRACE_S + 2, (rank, r)


def test_silent_peer_times_out_naming_it():
    with RankPool(2, env={"STREAMATTN_TIMEOUT_S": "2"}, fork=True) as pool:
        res = pool.run("streamattn.testing.cases:shm_silent_peer", silent_rank=1, timeout=60)
    assert res[0]["type"] == "PeerTimeoutError" and res[0]["peer"] == 1, res[0]
    assert "rank 1" in res[0]["error"] and 1.5 < res[0]["seconds"] < 10


def test_kill_9_leaves_no_segment_and_peers_notice():
    before = _segments()
    pool = RankPool(3, env={"STREAMATTN_TIMEOUT_S": "20"}, fork=True)
    try:
        pool.submit("streamattn.testing.cases:shm_hold", seconds=6)
        time.sleep(3)
        assert _segments() == before  # unlinked as soon as every rank had mapped them
        os.kill(pool.procs[1].pid, signal.SIGKILL)
        pool.collect(timeout=30)
    finally:
        pool.close()
    assert _segments() == before


def test_segment_mode_0600_and_unlinked():
    seen = {}

    def gather(name, pid):
        if "name" not in seen:  # the names; the second gather agrees on doorbells
            st = os.stat(os.path.join("/dev/shm", name))
            seen["mode"] = stat.S_IMODE(st.st_mode)
            seen["name"] = name
        return [name], [pid]

    heap = ShmHeap(0, 1, 4096, 2, gather, lambda: None)
    try:
        assert seen["mode"] == 0o600
        assert len(seen["name"]) > 30  # unguessable: 96 random bits
        assert not os.path.exists(os.path.join("/dev/shm", seen["name"]))
        heap.put(0, torch.arange(4, dtype=torch.int32), 8)
        heap.signal(0, 1, 42)
        assert heap.read_signal(1) == 42
        assert heap.local(8, 16).view(torch.int32).tolist() == [0, 1, 2, 3]
    finally:
        heap.close()


def test_stale_segments_of_dead_creators_are_removed():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    name = f"{shm_mod.PREFIX}{p.pid}-deadbeef"
    fd = os.open(os.path.join("/dev/shm", name), os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, shm_mod.segment_header(p.pid))  # what its creator writes (tests/test_shm_cleanup.py)
    os.close(fd)
    assert name in remove_stale_segments()
    assert name not in _segments()


@pytest.mark.parametrize("bells", [True, False])
def test_oversubscribed_wait_blocks_until_woken(rank_pool, bells):
    """On an oversubscribed node a waiting rank blocks on its doorbell until the sender rings it:
    a 300 ms wait takes a handful of looks and returns within milliseconds of the send. Negative
    control: the same wait with the doorbells switched off polls with sleeps (hundreds of looks),
    so the count is what separates the two."""
    res = rank_pool(3).run("streamattn.testing.cases:shm_blocked_wait", delay=0.3, bells=bells)
    assert all(r["usable"] for r in res), res  # every member reached every peer's doorbell
    sent = res[0]["sent"]
    print(f"\nbells={bells}: " + "; ".join(f"{r['looks']} looks, {r['cpu'] * 1e3:.2f} ms CPU, woke "
                                           f"{(r['done'] - sent) * 1e3:.2f} ms after the send" for r in res[1:]))
    for r in res[1:]:
        assert r["ok"], r
        if bells:
            assert r["looks"] < 20 and r["done"] - sent < 0.025, r
        else:
            assert r["looks"] > 100, r


def test_doorbell_rings_and_an_unreachable_peer_is_reported():
    from streamattn.transport.doorbell import Doorbell

    a, b = Doorbell("streamattn-test-a-%d" % os.getpid()), Doorbell("streamattn-test-b-%d" % os.getpid())
    try:
        names = [f"streamattn-test-a-{os.getpid()}", f"streamattn-test-b-{os.getpid()}"]
        assert a.connect(names, 0) and b.connect(names, 1)
        a.usable = b.usable = True
        t0 = time.monotonic()
        assert b.wait(0.2) and time.monotonic() - t0 < 0.1  # a's probe is pending: no blocking
        t0 = time.monotonic()
        assert b.wait(0.1) and time.monotonic() - t0 >= 0.09  # nothing rang: the slice passes
        a.ring(1)
        t0 = time.monotonic()
        assert b.wait(1.0) and time.monotonic() - t0 < 0.5
        # a peer nobody bound (another network namespace): the probe fails, so no doorbells
        assert not a.connect(names + [f"streamattn-test-gone-{os.getpid()}"], 0)
        b.usable = False
        assert not b.wait(0.5)  # unusable: returns at once, the caller sleeps on its own
    finally:
        a.close()
        b.close()
