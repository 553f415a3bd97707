"""Two-sided transport over torch.distributed: gloo on CPU, NCCL on GPU.

Every exchange is point-to-point (also the all-to-alls), so every wait knows which peer it waits
on: a dead or silent peer is reported by rank, within STREAMATTN_TIMEOUT_S. No sub-groups are
created, so a user's group never has to be entered collectively by ranks outside it.
"""
from __future__ import annotations

import datetime
import time
import weakref

import torch
import torch.distributed as dist

from ..tags import FAIL
from .. import trace
from ..config import wait_timeout_s
from ..errors import PeerError, PeerTimeoutError
from .base import ByteCounters, Pending, Transport


def _peer_error(transport, peer, kind, tag, exc):
    text = str(exc)
    who = transport.describe_peer(peer)
    if "Timed out" in text or "timeout" in text.lower():
        culprit, report = transport.reported_failure()
        cause = f"; {report}" if report else ""
        return PeerTimeoutError(
            f"streamattn: timed out after {transport.timeout:.0f}s waiting to {kind} (tag {tag}) "
            f"{'to' if kind == 'send' else 'from'} {who}{cause}. A rank may have died, be stuck, "
            "or be making a different call (STREAMATTN_TIMEOUT_S sets the limit)",
            peer if culprit is None else culprit,
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    culprit, report = transport.reported_failure()
    if culprit is not None and culprit != peer:
        # `peer` closed its connection because it gave up on the rank that failed first.
        return PeerError(f"streamattn: {kind} (tag {tag}) with {who} failed: {report}", culprit)
    if "closed by peer" in first or "Connection reset" in first:
        first = f"{who} closed its connection (it probably died): {first}"
    transport.report_failure(peer, f"rank {transport.rank} saw {who} fail during {kind}")
    return PeerError(f"streamattn: {kind} (tag {tag}) with {who} failed: {first}", peer)


class _TorchPending(Pending):
    def __init__(self, transport, works, tag):
        self.transport = transport
        self.works = works  # [(peer, "send"|"recv", work)]
        self.tag = tag
        self.start = time.monotonic()
        self.span_kind = "wait"  # set by exchange() (trace.wait_kind)
        self.waited = 0  # works whose wait() returned (each must be waited once: a second waitRecv
                         # blocks for a message that never comes)
        self.failed = False  # the wait of works[waited] raised: that work is dead (gloo rethrows)

    def __del__(self):
        # Dropped without a completed wait() (an abandoned StaleKV state, a call that raised with
        # other exchanges posted): the works must outlive this handle until their messages have
        # moved. A gloo receive whose work is freed while posted stays registered on the pair and
        # swallows the peer's message, and the pair then loses the next ones on that connection
        # (tests/test_transport_orphans.py); CI once hung in the metadata exchange after a test
        # dropped a StaleKV with its K/V exchange in flight.
        if self.waited < len(self.works):
            try:
                self.hand_over()
            except Exception:  # interpreter shutdown: the transport is already torn down
                pass

    def hand_over(self, keep_all: bool = False) -> None:
        """Give the works not yet waited to the transport: the one whose wait failed (it cannot be
        waited again: gloo rethrows; its buffer must still outlive it) and, with keep_all, the rest
        are kept until close(); the rest are otherwise adopted (the next call waits for them)."""
        rest, self.waited = self.works[self.waited:], len(self.works)
        if rest and (self.failed or keep_all):
            n = len(rest) if keep_all else 1
            self.transport.keep(rest[:n])
            rest = rest[n:]
        if rest:
            self.transport.adopt(rest, self.tag)

    def wait(self, grace_s: float = 0.0) -> None:
        """grace_s: wait that much longer than the transport's timeout (a node leader outwaiting
        the other leaders' waits on their own nodes, OneSidedTransport.all_gather_small)."""
        limit = self.transport.timeout + grace_s
        deadline = self.start + limit
        tracing = trace.enabled()
        for peer, kind, work in self.works[self.waited:]:
            remaining = max(deadline - time.monotonic(), 0.001)
            t0 = trace.now() if tracing else 0.0
            try:
                ok = work.wait(datetime.timedelta(seconds=remaining))
            except Exception as exc:  # gloo/NCCL report timeouts and closed pairs as RuntimeError
                self.failed = True
                raise _peer_error(self.transport, peer, kind, self.tag, exc) from exc
            if tracing:  # the time blocked on this peer (sequential waits: who we waited for)
                node_of = self.transport.node_of
                trace.add(self.span_kind, t0, trace.now(), peer,
                          node_of[peer] != node_of[self.transport.rank])
            if ok is False:
                self.failed = True
                raise PeerTimeoutError(
                    f"streamattn: timed out after {limit:.0f}s waiting to {kind} (tag {self.tag}) "
                    f"with {self.transport.describe_peer(peer)}",
                    peer,
                )
            self.waited += 1


class FailureMailbox:
    """Failure reports between the ranks of a group, over the group itself (no rendezvous store:
    the store's host may be the rank that exits first, and reading a dead store prints C++
    traces). Each rank keeps one receive posted per peer on TAG_FAIL; a rank that sees peer X
    fail sends [MAGIC, X's group rank] to every other peer before raising and lets the sends
    drain (at most DRAIN_S). A report travels on the same connection as the data, ahead of the
    sender's close, so a rank that then sees the reporter close reads the report first."""

    TAG_FAIL, MAGIC, DRAIN_S = FAIL, 0x4641494C, 0.5

    def __init__(self, transport):
        # A proxy, not the transport: a cycle transport <-> mailbox would keep the process group
        # alive after destroy_process_group() until a cyclic GC, which at interpreter exit runs
        # the group's destructor while its gloo worker threads need the GIL (SIGABRT at exit).
        self.t = weakref.proxy(transport)
        self.works, self.bufs, self.sent = {}, {}, False

    def open(self) -> None:
        """Post the receives (once per group; two-sided CPU backends only)."""
        if self.works or self.t.backend != "gloo":
            return
        for p in range(self.t.size):
            if p != self.t.rank:
                self.bufs[p] = torch.zeros(2, dtype=torch.int64)
                try:
                    self.works[p] = self.t.group.recv([self.bufs[p]], p, self.TAG_FAIL)
                except Exception:  # that pair is already closed
                    pass

    def send(self, culprit: int, text: str) -> None:
        if self.sent or self.t.backend != "gloo":
            return
        self.sent = True
        msg = torch.tensor([self.MAGIC, culprit], dtype=torch.int64)
        works = []
        for p in range(self.t.size):
            if p not in (self.t.rank, culprit):
                try:
                    works.append(self.t.group.send([msg], p, self.TAG_FAIL))
                except Exception:
                    pass
        deadline = time.monotonic() + self.DRAIN_S
        for w in works:
            try:
                w.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
            except Exception:
                pass

    def read(self):
        # gloo marks a receive complete only inside wait(), so the buffer itself is looked at:
        # the report is 16 bytes written at once; it counts once two reads agree.
        for p, buf in self.bufs.items():
            first = buf.tolist()
            if first[0] != self.MAGIC or buf.tolist() != first:
                continue
            culprit = first[1]
            if 0 <= culprit < self.t.size:
                return culprit, (f"{self.t.describe_peer(culprit)} failed first (reported by "
                                 f"{self.t.describe_peer(p)})")
        return None, ""

    def close(self) -> None:
        self.works, self.bufs = {}, {}


class _CollectivePending(Pending):
    """One all_to_all_single over the whole group. A wait that times out (or fails) names the
    ranks that never entered this collective, read from their arrival marks in the store."""

    def __init__(self, transport, work, tag, stamp):
        self.transport, self.work, self.tag, self.stamp = transport, work, tag, stamp
        self.start = time.monotonic()

    def wait(self) -> None:
        t = self.transport
        t0 = trace.now() if trace.enabled() else 0.0
        remaining = max(self.start + t.timeout - time.monotonic(), 0.001)
        try:
            ok = self.work.wait(datetime.timedelta(seconds=remaining))
        except Exception as exc:
            raise t.collective_error(self.tag, self.stamp, exc) from exc
        if ok is False:
            raise t.collective_error(self.tag, self.stamp, None)
        if trace.enabled():
            trace.add("wait", t0, trace.now(), None, len(set(t.node_of)) > 1)


class TorchTransport(Transport):
    """Transport over a torch.distributed ProcessGroup (group-local ranks)."""

    def __init__(self, group=None, node_of=None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group)).lower()
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.size)] if (
            self.group is not dist.group.WORLD
        ) else list(range(self.size))
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.node_of = list(node_of) if node_of is not None else [0] * self.size
        self.topology = None  # set by the api on the first call (streamattn.topology.Topology)
        self.counters = ByteCounters()
        self.timeout = wait_timeout_s()
        self.calls = 0  # calls made on this group
        self.mailbox = FailureMailbox(self)
        self.in_flight = []  # (works, tag) of pendings dropped before their wait() completed (adopt)
        self.kept = []  # works whose wait failed: never waited again, kept until close (keep)

    def begin_call(self) -> None:
        self.calls += 1
        if self.in_flight:
            self.finish_adopted()
        self.mailbox.open()

    def adopt(self, works, tag) -> None:
        """Keep the works [(peer, kind, work)] of a Pending dropped before its wait() completed
        alive until the next call waits for them (finish_adopted): they hold the message tensors
        and gloo's buffers, which the peer may still be writing into."""
        self.in_flight.append((list(works), tag))

    def keep(self, works) -> None:
        """Keep works whose wait failed alive until close(): gloo rethrows on a second wait, and a
        receive stays posted. (A gloo timeout also fails every connection of the group -- the
        wait signals the exception to the whole context -- so the group is of no further use.)"""
        self.kept.extend(works)

    def finish_adopted(self) -> None:
        """Wait for the adopted works. They cannot be polled: a gloo send/recv work reports
        completion only from wait(), and a wait that times out marks it failed. Their peers posted
        the other halves when they posted the same exchange, before anything later in the
        schedule, so by the next call they have normally arrived and this returns at once. If one
        fails (its peer gone or the group failed), it and every adopted work not yet waited are
        kept instead and the call goes on: it meets the failure itself and raises naming the
        peer."""
        adopted, self.in_flight = self.in_flight, []
        for i, (works, tag) in enumerate(adopted):
            pending = _TorchPending(self, works, tag)
            try:
                pending.wait()
            except PeerError:
                pending.hand_over(keep_all=True)
                for later, _ in adopted[i + 1:]:
                    self.keep(later)
                return

    def report_failure(self, peer: int, text: str) -> None:
        """Tell the other ranks which peer failed (FailureMailbox), before this rank raises, so
        that ranks left waiting on it name the real culprit even after this process exits."""
        self.mailbox.send(peer, text)

    def reported_failure(self):
        """(group rank of the peer another rank saw fail, text), or (None, "")."""
        return self.mailbox.read()

    def close(self) -> None:
        self.mailbox.close()
        self.in_flight, self.kept = [], []

    # -- the collective all-to-all (STREAMATTN_ALLTOALL=collective) ---------------------------
    def all_to_all(self, send, send_splits, recv, recv_splits, tag, count=True) -> Pending:
        """The whole group's all-to-all as ONE gloo all_to_all_single: send is 1-D, its first
        send_splits[0] elements go to rank 0, the next send_splits[1] to rank 1, ...; recv
        likewise (own parts included)."""
        self.timeout = wait_timeout_s()
        e = send.element_size()
        if count:
            for p, n in enumerate(send_splits):
                if p != self.rank and n:
                    cls = "inter" if self.node_of[p] != self.node_of[self.rank] else "intra"
                    setattr(self.counters, cls, getattr(self.counters, cls) + n * e)
                    self.counters.messages += 1
                    trace.event("post", p, cls == "inter", n * e)
        stamp = f"{self.calls}:{tag}"
        with trace.span("post"):
            work = dist.all_to_all_single(recv, send, list(recv_splits), list(send_splits),
                                          group=self.group, async_op=True)
        return _CollectivePending(self, work, tag, stamp)

    def collective_error(self, tag, stamp, exc):
        """PeerTimeoutError (or PeerError) for a collective all-to-all that did not complete. One
        collective cannot tell which rank is missing; a failure another rank reported
        (FailureMailbox) names it, else the error says how to find it (STREAMATTN_ALLTOALL=p2p
        names the peer of every wait)."""
        culprit, report = self.reported_failure()
        who = report or "a rank that never joined it (one collective cannot tell which: " \
            "STREAMATTN_ALLTOALL=p2p names the peer)"
        if exc is not None and "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            return PeerError(f"streamattn: all-to-all (tag {tag}, call {stamp}) failed: "
                             f"{str(exc).splitlines()[0]} ({who})", culprit)
        return PeerTimeoutError(
            f"streamattn: timed out after {self.timeout:.0f}s in a collective all-to-all (tag {tag}, "
            f"call {stamp}) waiting for {who}. A rank may have died, be stuck, or be making a "
            "different call (STREAMATTN_TIMEOUT_S sets the limit)", culprit)

    def describe_peer(self, peer: int) -> str:
        g = self.global_ranks[peer]
        return f"rank {peer}" if g == peer else f"rank {peer} (global rank {g})"

    def exchange(self, sends, recvs, tag: int, count: bool = True) -> Pending:
        self.timeout = wait_timeout_s()
        if count:
            for peer, t in sends:
                self._count(peer, t)
        if self.backend == "nccl":
            return self._exchange_batched(sends, recvs, tag)
        with trace.span("post"):
            pending = self._post(sends, recvs, tag, count)
        pending.span_kind = trace.wait_kind(tag)
        return pending

    def _post(self, sends, recvs, tag, count):
        if count and trace.enabled():
            for peer, t in sends:
                trace.event("post", peer, self.node_of[peer] != self.node_of[self.rank],
                            t.numel() * t.element_size())
        works = []
        # Receives first. gloo's send waits for the receiver's recv-ready notice, which leaves on
        # the same connection as that rank's own sends to us (FIFO, behind any bulk data queued
        # before it); posted before this exchange's sends, the notice cannot queue behind them.
        # (Runs of a ring of two each post their own exchange: the notice of run i then follows
        # run i-1's data, which keeps the two directions in step; posting every run's receive
        # first measured the same on an emulated 2 x 1 / 2 x 2 at 200 Mbit/s, also with one rank
        # 30 ms late, so the runs keep one exchange each.)
        for kind, items, post in (("recv", recvs, self.group.recv), ("send", sends, self.group.send)):
            for peer, t in items:
                try:
                    works.append((peer, kind, post([t], peer, tag)))
                except Exception as exc:  # the pair is already closed: that peer is gone
                    raise _peer_error(self, peer, kind, tag, exc) from exc
        return _TorchPending(self, works, tag)

    def _exchange_batched(self, sends, recvs, tag):
        # NCCL needs matching send/recv pairs issued inside one group call, or it can deadlock.
        ops, who = [], []
        for peer, t in recvs:
            ops.append(dist.P2POp(dist.irecv, t, self.global_ranks[peer], self.group, tag))
            who.append((peer, "recv"))
        for peer, t in sends:
            ops.append(dist.P2POp(dist.isend, t, self.global_ranks[peer], self.group, tag))
            who.append((peer, "send"))
        if not ops:
            return _TorchPending(self, [], tag)
        works = dist.batch_isend_irecv(ops)
        if len(works) == len(who):
            return _TorchPending(self, [(p, k, w) for (p, k), w in zip(who, works)], tag)
        # Coalesced into one work: errors can only be attributed to the whole batch.
        return _TorchPending(self, [(who[0][0], "exchange", w) for w in works], tag)
