"""The one-sided exchange protocol, shared by every symmetric-heap backend (shm, nvshmem).

Algorithms call Transport.exchange(sends, recvs, tag). For peers on this node, a message is cut into
chunks of `slot_bytes`; chunk n from s to r goes into slot (n-1) % depth of r's mailbox for s with a
*put*, followed by a *signal* setting r's ready[s] = n. The receiver copies the chunk out and
signals s's credit[r] = n, which frees the slot. There is no rendezvous: when the mailbox has room,
the data is in the peer's memory before exchange() returns, so the computation that follows overlaps
nothing but the receiver's copy-out. Peers on other nodes go through the two-sided fallback.

Both sides number chunks per ordered pair in the order the algorithm posts messages, which is the
same on every rank because all ranks run the same schedule.
"""
from __future__ import annotations

import time
from collections import deque

import torch

from ..tags import SHM_BOOTSTRAP
from ..topology import usable_cores
from .. import trace
from ..errors import PeerError, PeerTimeoutError
from .base import Pending
from .node_heap import NodeHeapTransport

DEPTH = 2
TINY_YIELD_S = 0.005


class _Msg:
    __slots__ = ("peer", "buf", "tag", "chunks", "next", "done")

    def __init__(self, peer, tensor, tag, slot_bytes):
        self.peer = peer  # index among the node members
        self.buf = tensor.reshape(-1).view(torch.uint8)
        self.tag = tag
        n = self.buf.numel()
        self.chunks = [(o, min(slot_bytes, n - o)) for o in range(0, n, slot_bytes)]
        self.next = 0
        self.done = not self.chunks

    def advance(self):
        self.next += 1
        self.done = self.next == len(self.chunks)


class _OneSidedPending(Pending):
    def __init__(self, transport, msgs, remote):
        self.t, self.msgs, self.remote = transport, msgs, remote
        self.start = time.monotonic()
        # Metadata-sized exchanges (the per-call signature) yield instead of sleeping for their
        # first TINY_YIELD_S: a backoff sleep would add up to 1 ms to every call.
        self.tiny = all(m.buf.numel() <= 4096 for m in msgs)
        self.span_kind = "wait"  # set by exchange() (trace.wait_kind)

    def wait(self):
        t = self.t
        deadline = self.start + t.timeout
        tracing = trace.enabled()
        spins, last_check, last_report = 0, time.monotonic(), time.monotonic()
        left = [m for m in self.msgs if not m.done]
        while left:
            t0 = trace.now() if tracing else 0.0
            if t._progress():
                spins = 0
                if tracing:
                    trace.add("copy", t0, trace.now())
                left = [m for m in left if not m.done]
                continue
            spins += 1
            now = time.monotonic()
            if now - last_check > 0.05:
                last_check = now
                for m in left:
                    if not t.heap.peer_alive(m.peer):
                        g = t.members[m.peer]
                        culprit, report = _reported_within(t.base, 0.25)
                        if culprit is not None and culprit != g:  # g exited after seeing culprit fail
                            raise PeerError(f"streamattn: abandoned an shm exchange (tag {m.tag}): "
                                            f"{report}", culprit)
                        t.base.report_failure(g, f"rank {t.rank} saw it die (shm)")
                        raise PeerError(f"streamattn: {t.describe_peer(g)} died (its process is gone) "
                                        f"during an shm exchange (tag {m.tag})", g)
                if now - last_report > 0.5:  # another rank may have seen the real failure
                    last_report = now
                    culprit, report = t.base.reported_failure()
                    if culprit is not None:
                        raise PeerError(f"streamattn: abandoned an shm exchange (tag {self.msgs[0].tag}): "
                                        f"{report}", culprit)
                if now > deadline:
                    m = left[0]
                    g = t.members[m.peer]
                    raise PeerTimeoutError(
                        f"streamattn: timed out after {t.timeout:.0f}s waiting for {t.describe_peer(g)} "
                        f"in an shm exchange (tag {m.tag}, chunk {m.next + 1}/{len(m.chunks)}); it may "
                        "be stuck or making a different call (STREAMATTN_TIMEOUT_S sets the limit)", g)
            _backoff(spins, t.oversubscribed, self.tiny and now - self.start < TINY_YIELD_S)
            if tracing:  # blocked on the first message that has not completed
                trace.add(self.span_kind, t0, trace.now(), t.members[left[0].peer], False)
        if self.remote is not None:
            self.remote.wait()


def _reported_within(base, seconds):
    """A failure report from another rank, waiting up to `seconds` for one still in flight."""
    deadline = time.monotonic() + seconds
    while True:
        culprit, report = base.reported_failure()
        if culprit is not None or time.monotonic() > deadline:
            return culprit, report
        time.sleep(0.01)


def _backoff(spins: int, oversubscribed: bool, tiny: bool) -> None:
    """Between polls of the mailbox signals. When the node's ranks outnumber its cores, a spinning
    rank steals the core the peer it waits for needs, so it yields at once and then sleeps
    (50 us .. 1 ms); otherwise it spins briefly first (lowest latency on an idle core). A tiny
    (metadata-sized) exchange only yields: a sleep would add up to 1 ms to every call."""
    if tiny:
        if oversubscribed or spins > 50:
            time.sleep(0)
    elif oversubscribed:
        if spins > 2:
            time.sleep(min(1e-3, 5e-5 * (spins - 2)))
        else:
            time.sleep(0)
    elif spins > 200:
        time.sleep(min(1e-3, 1e-6 * (spins - 200)))
    elif spins > 50:
        time.sleep(0)


class OneSidedTransport(NodeHeapTransport):
    """exchange() over a symmetric heap among the ranks of this node; `base` (a TorchTransport on
    the same group) carries messages to other nodes and bootstraps the heap."""

    name = "onesided"

    def __init__(self, base, heap_factory, slot_bytes=None):
        super().__init__(base, heap_factory, DEPTH, 2, SHM_BOOTSTRAP, slot_bytes)  # ready, credit
        n = len(self.members)
        self.oversubscribed = n > usable_cores()
        self.sent = [0] * n
        self.recvd = [0] * n
        self.outq = [deque() for _ in range(n)]
        self.inq = [deque() for _ in range(n)]

    # -- the protocol ----------------------------------------------------------------------
    def exchange(self, sends, recvs, tag, count=True):
        remote, local_s, local_r = self.start_exchange(sends, recvs, tag, count)
        with trace.span("post"):
            msgs = []
            for p, t in local_s:
                m = _Msg(p, t.contiguous(), tag, self.slot_bytes)
                self.outq[p].append(m)
                msgs.append(m)
            for p, t in local_r:
                m = _Msg(p, t, tag, self.slot_bytes)
                self.inq[p].append(m)
                msgs.append(m)
            self._progress()  # puts whatever fits now: the data is in the peer's memory before compute
        pending = _OneSidedPending(self, msgs, remote)
        pending.span_kind = trace.wait_kind(tag)
        return pending

    def _progress(self) -> bool:
        """Advance every queued message as far as credits and signals allow. True if anything moved."""
        heap, n, me, S, D = self.heap, len(self.members), self.heap.rank, self.slot_bytes, DEPTH
        moved = False
        for p in range(n):
            q = self.outq[p]
            while q:
                m = q[0]
                k = self.sent[p] + 1
                if heap.read_signal(n + p) < k - D:  # the slot still holds an unread chunk
                    break
                off, length = m.chunks[m.next]
                heap.put(p, m.buf[off : off + length], (me * D + (k - 1) % D) * S)
                heap.signal(p, me, k)
                self.sent[p] = k
                m.advance()
                moved = True
                if m.done:
                    q.popleft()
            q = self.inq[p]
            while q:
                m = q[0]
                k = self.recvd[p] + 1
                if heap.read_signal(p) < k:
                    break
                off, length = m.chunks[m.next]
                m.buf[off : off + length].copy_(heap.local((p * D + (k - 1) % D) * S, length))
                heap.signal(p, n + me, k)
                self.recvd[p] = k
                m.advance()
                moved = True
                if m.done:
                    q.popleft()
        return moved
