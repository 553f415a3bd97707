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

from .. import config, core_turns, trace
from ..tags import SHM_BOOTSTRAP
from ..topology import kernel_hash, usable_cores
from ..errors import PeerError, PeerTimeoutError
from .base import SMALL_WORDS, Parts, Pending
from .node_heap import NodeHeapTransport

DEPTH = 2
TINY_YIELD_S = 0.005
# The longest a blocked wait sleeps before its next look: the liveness, failure-report and deadline
# checks run between slices, and a wake-up that never comes costs at most this much.
WAKE_SLICE_S = 0.05
BOARD_BYTES = (SMALL_WORDS + 1) * 8  # one signature row on the board: its length, then its words
# The signature's waits are staggered so that a failure's report arrives before a wait ends: a
# leader waits for the other leaders this much longer than for its own node, and its members wait
# for it twice this much longer (all_gather_small).
LEADER_GRACE_S = 2.0


class _Msg:
    """One message to or from a node member: a contiguous tensor moved in chunks of at most a
    slot, or a Parts of at most one slot moved part by part (no packing copy)."""

    __slots__ = ("peer", "buf", "parts", "nbytes", "tag", "chunks", "next", "done")

    def __init__(self, peer, tensor, tag, slot_bytes):
        self.peer = peer  # index among the node members
        self.tag = tag
        if isinstance(tensor, Parts):
            self.parts, self.buf = tensor, None
            n = tensor.numel() * tensor.element_size()
        else:
            self.parts, self.buf = None, tensor.reshape(-1).view(torch.uint8)
            n = self.buf.numel()
        self.nbytes = n
        self.chunks = [(o, min(slot_bytes, n - o)) for o in range(0, n, slot_bytes)]
        self.next = 0
        self.done = not self.chunks

    def advance(self):
        self.next += 1
        self.done = self.next == len(self.chunks)

    def put(self, heap, peer, offset):
        """Put the next chunk into peer's slot at `offset`."""
        if self.parts is None:
            off, length = self.chunks[self.next]
            heap.put(peer, self.buf[off : off + length], offset)
            return
        e = self.parts.element_size()
        for t, n in zip(self.parts.tensors, self.parts.sizes):
            heap.put(peer, t, offset)
            offset += n * e

    def take(self, heap, offset):
        """Copy the next chunk out of this member's slot at `offset`."""
        if self.parts is None:
            off, length = self.chunks[self.next]
            self.buf[off : off + length].copy_(heap.local(offset, length))
            return
        e = self.parts.element_size()
        for t, n in zip(self.parts.tensors, self.parts.sizes):
            t.copy_(heap.local(offset, n * e).view(t.dtype).view(t.shape))
            offset += n * e


class _OneSidedPending(Pending):
    def __init__(self, transport, msgs, remote):
        self.t, self.msgs, self.remote = transport, msgs, remote
        self.start = time.monotonic()
        # Metadata-sized exchanges yield instead of sleeping for their first TINY_YIELD_S: a
        # backoff sleep would add up to 1 ms to every call.
        self.tiny = all(m.nbytes <= 4096 for m in msgs)
        self.span_kind = "wait"  # set by exchange() (trace.wait_kind)

    def wait(self):
        t = self.t
        left = [m for m in self.msgs if not m.done]

        def advance():
            nonlocal left
            if not t._progress():
                return False
            left = [m for m in left if not m.done]
            return True

        def blocked():
            if not left:
                return None
            m = left[0]
            return [x.peer for x in left], m.tag, f"chunk {m.next + 1}/{len(m.chunks)}"

        poll(t, advance, blocked, self.start, self.tiny, self.span_kind)
        if self.remote is not None:
            self.remote.wait()


def poll(t, advance, blocked, start, tiny, span_kind, deadline=None, report_timeout=False):
    """Poll until blocked() is None. advance() moves what it can (True when anything moved);
    blocked() names what is still awaited: ([member indices of the peers, the first one waited
    on], tag, detail). Raises PeerError when one of those processes is gone or another rank
    reported a failure, and PeerTimeoutError naming the first peer after the transport's timeout
    (from `start`) or at `deadline` when given; report_timeout: report that peer to the other
    ranks first (FailureMailbox), for ranks blocked on this one that cannot see it."""
    if deadline is None:
        deadline = start + t.timeout
    tracing = trace.enabled()
    spins, last_check, last_report = 0, time.monotonic(), time.monotonic()
    while True:
        t0 = trace.now() if tracing else 0.0
        if advance():
            spins = 0
            if tracing:
                trace.add("copy", t0, trace.now())
            continue
        waiting = blocked()
        if waiting is None:
            return
        peers, tag, detail = waiting
        peer = peers[0]
        spins += 1
        now = time.monotonic()
        if now - last_check > 0.05:
            last_check = now
            dead = next((p for p in peers if not t.heap.peer_alive(p)), None)
            if dead is not None:
                g = t.members[dead]
                culprit, report = _reported_within(t.base, 0.25)
                if culprit is not None and culprit != g:  # g exited after seeing culprit fail
                    raise PeerError(f"streamattn: abandoned an shm exchange (tag {tag}): {report}",
                                    culprit)
                t.base.report_failure(g, f"rank {t.rank} saw it die (shm)")
                raise PeerError(f"streamattn: {t.describe_peer(g)} died (its process is gone) "
                                f"during an shm exchange (tag {tag})", g)
            if now - last_report > 0.5:  # another rank may have seen the real failure
                last_report = now
                culprit, report = t.base.reported_failure()
                if culprit is not None:
                    raise PeerError(f"streamattn: abandoned an shm exchange (tag {tag}): {report}",
                                    culprit)
            if now > deadline:
                g = t.members[peer]
                if report_timeout:
                    t.base.report_failure(g, f"rank {t.rank} timed out waiting for it (shm)")
                raise PeerTimeoutError(
                    f"streamattn: timed out after {now - start:.0f}s waiting for {t.describe_peer(g)} "
                    f"in an shm exchange (tag {tag}, {detail}); it may be stuck or making a "
                    "different call (STREAMATTN_TIMEOUT_S sets the limit)", g)
        _backoff(t.heap, spins, t.oversubscribed, tiny and now - start < TINY_YIELD_S)
        if tracing:  # blocked on that peer
            trace.add(span_kind, t0, trace.now(), t.members[peer], False)


def _reported_within(base, seconds):
    """A failure report from another rank, waiting up to `seconds` for one still in flight."""
    deadline = time.monotonic() + seconds
    while True:
        culprit, report = base.reported_failure()
        if culprit is not None or time.monotonic() > deadline:
            return culprit, report
        time.sleep(0.01)


def _backoff(heap, spins: int, oversubscribed: bool, tiny: bool) -> None:
    """Between polls of the mailbox signals. When the node's ranks outnumber its cores, a polling
    rank takes the core the peer it waits for needs: after one yield it blocks until a peer wakes
    it (heap.sleep_until_woken: the shm doorbells) or, without wake-ups, sleeps (50 us .. 1 ms).
    Otherwise it spins briefly first (lowest latency on an idle core), then yields, then blocks or
    sleeps. A tiny (metadata-sized) exchange never sleeps on its own (a sleep would add up to 1 ms
    to every call), so it yields where it cannot block."""
    if oversubscribed:
        if spins > 1 and heap.sleep_until_woken(WAKE_SLICE_S):
            return
        if tiny or spins <= 2:
            time.sleep(0)
        else:
            time.sleep(min(1e-3, 5e-5 * (spins - 2)))
    elif spins > 200:
        if not heap.sleep_until_woken(WAKE_SLICE_S):
            if tiny:
                time.sleep(0)
            else:
                time.sleep(min(1e-3, 1e-6 * (spins - 200)))
    elif spins > 50:
        time.sleep(0)


def ranks_sharing_cores(base, node_ranks: int) -> int:
    """How many ranks of the group run on this rank's machine: the node's ranks, or more when
    several nodes share one kernel (an emulated cluster's nodes share its cores, and a waiting
    rank there takes a core from a peer on any of them). All-gathers the kernels' boot-id hashes
    over the whole group (every rank builds this transport in the same call)."""
    mine = kernel_hash()
    if not mine or base.size == 1:
        return node_ranks
    vec = torch.tensor([mine], dtype=torch.int64, device=base.device)
    rows = base.all_gather(vec, list(range(base.size)), SHM_BOOTSTRAP, count=False)
    return max(node_ranks, sum(1 for r in rows if int(r.cpu()[0]) == mine))


class OneSidedTransport(NodeHeapTransport):
    """exchange() over a symmetric heap among the ranks of this node; `base` (a TorchTransport on
    the same group) carries messages to other nodes and bootstraps the heap."""

    name = "onesided"

    def __init__(self, base, heap_factory, slot_bytes=None):
        mine = base.node_of[base.rank]
        n = sum(1 for r in range(base.size) if base.node_of[r] == mine)
        nodes = {}
        for r in range(base.size):
            nodes.setdefault(base.node_of[r], []).append(r)
        # every other node: (its leader, its ranks), the leader being its lowest rank
        self.other_nodes = [(ranks[0], ranks) for node, ranks in nodes.items() if node != mine]
        remote = 2 * base.size * BOARD_BYTES if self.other_nodes else 0
        # signals: ready and credit per member, then the board's one per member and the remote one;
        # the board (2 slots x members) and the other nodes' rows (2 slots x group ranks) after
        # the mailboxes
        super().__init__(base, heap_factory, DEPTH, 2, SHM_BOOTSTRAP, slot_bytes,
                         extra_bytes=2 * n * BOARD_BYTES + remote, extra_signals=n + 3)
        self.remote_offset = self.extra_offset + 2 * n * BOARD_BYTES
        # set by the leader on each member: the call whose other-node rows are on its board; the
        # call in which the leader failed, and the rank it names (after a gloo timeout its
        # FailureMailbox report may no longer reach anyone: gloo closes the pairs)
        self.remote_signal = self.extra_signal0 + n
        self.failed_call_signal, self.culprit_signal = self.remote_signal + 1, self.remote_signal + 2
        self.board_calls = 0
        self.oversubscribed = ranks_sharing_cores(base, n) > usable_cores()
        core_turns.share(self.oversubscribed and config.core_turns())
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
                m = _Msg(p, t if isinstance(t, Parts) else t.contiguous(), tag, self.slot_bytes)
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

    def exchange_parts(self, sends, recvs, tag, count=True):
        """Parts to and from this node's members move straight between their tensors and the
        slots when the heap copies any strides and the message fits one slot; the rest is staged
        (Transport.exchange_parts)."""
        if not self.heap.strided:
            return super().exchange_parts(sends, recvs, tag, count)
        local, limit = self.local_index, self.slot_bytes
        return self.staged_exchange(
            sends, recvs, tag, count,
            direct=lambda peer, x: peer in local and x.numel() * x.element_size() <= limit)

    def all_gather_small(self, vec, tag):
        """Every rank's int64 vector (Transport.all_gather_small), in rank order.

        This node's rows go through a board in the heap: in call n each member puts its row
        [length, *vec] into slot (n % 2, itself) of every other member's board and sets that
        member's board signal for itself to n, then reads the others' rows from its own board once
        their signals reach n. Two slots suffice: a member can only be one call ahead (call n + 1
        needs every row of call n + 1, written after their writers read the rows of call n).

        Other nodes' rows travel between the nodes' leaders (each node's lowest rank): a leader
        sends its node's rows to every other leader in one message, then puts the rows it received
        on its members' boards (slot n % 2 of the remote region) and sets their remote signal to n.
        One message per pair of nodes instead of one per pair of ranks: on an emulated 2 x 4
        cluster the 32 small gloo messages (each a rendezvous of three) took ~4 ms and ~6 ms of CPU
        of every 30 ms call. The waits are staggered (LEADER_GRACE_S) and a leader reports a failure
        it sees (FailureMailbox) before raising, so every rank names the same rank."""
        if vec.dtype != torch.int64 or vec.numel() > SMALL_WORDS or self.device.type != "cpu":
            return super().all_gather_small(vec, tag)
        vec = vec.reshape(-1).contiguous()
        words = vec.numel() + 1  # a row: its length, then the vector
        self.board_calls += 1
        call, heap, n, me = self.board_calls, self.heap, len(self.members), self.heap.rank
        start, kind = time.monotonic(), trace.wait_kind(tag)
        board = lambda member: self.extra_offset + ((call % 2) * n + member) * BOARD_BYTES  # noqa: E731
        row = torch.cat([torch.tensor([vec.numel()], dtype=torch.int64), vec])
        for p in range(n):
            if p != me:
                heap.put(p, row.view(torch.uint8), board(me))
                heap.signal(p, self.extra_signal0 + me, call)
                heap.wake(p)
        self._await_signals([p for p in range(n) if p != me], lambda p: self.extra_signal0 + p,
                            call, tag, f"signature board, call {call}", start, kind,
                            report_timeout=bool(self.other_nodes))
        rows = [None] * self.size
        for p, g in enumerate(self.members):
            rows[g] = row if p == me else heap.local(board(p), words * 8).view(torch.int64).clone()
        if self.other_nodes:
            region = self.remote_offset + (call % 2) * self.size * BOARD_BYTES
            if me == 0:
                got = self._trade_rows_with_leaders(torch.stack([rows[g] for g in self.members]),
                                                    tag, call)
                for p in range(1, n):
                    heap.put(p, got.view(torch.uint8), region)
                    heap.signal(p, self.remote_signal, call)
                    heap.wake(p)
            else:
                # counted from here: the leader has entered (its row is on the board) and starts
                # trading at the latest now
                self._await_signals([0], lambda p: self.remote_signal, call, tag,
                                    f"other nodes' signatures from this node's leader, call {call}",
                                    start, kind, failed=self._leader_failure(call, tag),
                                    deadline=time.monotonic() + self.timeout + 2 * LEADER_GRACE_S)
                got = heap.local(region, self.size * words * 8).view(torch.int64).view(self.size, words).clone()
            for _, ranks in self.other_nodes:
                for g in ranks:
                    rows[g] = got[g]
        out = []
        for g, r in enumerate(rows):
            if int(r[0]) != vec.numel():
                raise ValueError(f"streamattn: {self.describe_peer(g)} sent a signature of {int(r[0])} "
                                 f"words, this rank {vec.numel()} (different streamattn versions on the ranks?)")
            out.append(vec.clone() if g == self.rank else r[1:])
        return out

    def _await_signals(self, members, signal_of, call, tag, detail, start, kind, failed=None, **wait):
        """Poll until signal_of(p) of this member's heap reaches `call` for every p in `members`;
        failed(): called between looks, raises when the awaited rank gave up."""
        heap, left = self.heap, list(members)

        def advance():
            nonlocal left
            if failed is not None:
                failed()
            still = [p for p in left if heap.read_signal(signal_of(p)) < call]
            moved, left = len(still) < len(left), still
            return moved

        poll(self, advance, lambda: (left, tag, detail) if left else None, start, True, kind, **wait)

    def _leader_failure(self, call, tag):
        """failed() for a member waiting on its leader in call `call`: raises PeerError naming the
        rank the leader named, once the leader has marked the call failed on this member's heap."""
        heap = self.heap

        def failed():
            if heap.read_signal(self.failed_call_signal) == call:
                g = heap.read_signal(self.culprit_signal)
                raise PeerError(f"streamattn: abandoned the call's signature (tag {tag}): "
                                f"{self.describe_peer(g)} failed first (this node's leader, "
                                f"{self.describe_peer(self.members[0])}, could not reach it or "
                                "was failed by it)", g)
        return failed

    def _trade_rows_with_leaders(self, mine, tag, call):
        """(This node's leader) send the node's rows, `mine` [members, words], to every other node's
        leader; returns [group size, words], the other nodes' rows at their ranks (this node's rows
        0): what the members' boards receive. A failure here is marked on every member's heap (the
        rank it names) and reported (FailureMailbox) before it is raised: this node's members wait
        on this rank, not on the rank that failed."""
        got = torch.zeros(self.size, mine.shape[1], dtype=torch.int64)
        bufs = [torch.empty(len(ranks), mine.shape[1], dtype=torch.int64) for _, ranks in self.other_nodes]
        try:
            pending = self.base.exchange([(lead, mine) for lead, _ in self.other_nodes],
                                         [(lead, b) for (lead, _), b in zip(self.other_nodes, bufs)],
                                         tag, count=False)
            pending.wait(grace_s=LEADER_GRACE_S)  # outwaits the other leaders' waits on their nodes
        except PeerError as exc:
            for p in range(1, len(self.members)):
                self.heap.signal(p, self.culprit_signal, exc.peer)
                self.heap.signal(p, self.failed_call_signal, call)
                self.heap.wake(p)
            self.base.report_failure(exc.peer, f"rank {self.rank}: {str(exc)[:200]}")
            raise
        for (_, ranks), b in zip(self.other_nodes, bufs):
            got[ranks] = b
        return got

    def _progress(self) -> bool:
        """Advance every queued message as far as credits and signals allow. True if anything moved."""
        heap, n, me, S, D = self.heap, len(self.members), self.heap.rank, self.slot_bytes, DEPTH
        moved, woken = False, set()
        for p in range(n):
            q = self.outq[p]
            while q:
                m = q[0]
                k = self.sent[p] + 1
                if heap.read_signal(n + p) < k - D:  # the slot still holds an unread chunk
                    break
                m.put(heap, p, (me * D + (k - 1) % D) * S)
                heap.signal(p, me, k)
                woken.add(p)
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
                m.take(heap, (p * D + (k - 1) % D) * S)
                heap.signal(p, n + me, k)
                woken.add(p)
                self.recvd[p] = k
                m.advance()
                moved = True
                if m.done:
                    q.popleft()
        for p in woken:  # after the signals: a peer woken early would find nothing new
            heap.wake(p)
        return moved
