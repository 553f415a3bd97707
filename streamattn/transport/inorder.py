"""`inorder`: NCCL's point-to-point semantics, emulated over gloo so CPU tests catch NCCL deadlocks.

On NCCL every `exchange` is one `batch_isend_irecv`, i.e. one NCCL group, and a rank's groups run
one after another on one CUDA stream:
  * a group starts only when the previous group of the same rank has completed;
  * a group completes only when every send and receive in it has completed;
  * a send completes only once the peer's matching receive is active (rendezvous: large messages
    always work this way, and code must not rely on small ones being buffered);
  * messages are matched by posting order per (sender, receiver) pair: the n-th send from a to b
    meets the n-th receive on b from a. Tags do not exist on NCCL.
gloo is far more forgiving (sends are buffered, tags match out of order), so code that deadlocks on
NCCL passes on gloo. This transport runs each rank's exchanges strictly in that order on a
background thread (the "stream"): a send waits for a clear-to-send token from the receiver's
matching receive, which travels only once the receiver's group has started. A posting order that
would hang on NCCL therefore hangs here and ends in PeerTimeoutError naming the peer; a posting
order that NCCL would mis-match (the peer's n-th receive has another tag or size) raises PeerError.

Select it with STREAMATTN_TRANSPORT=inorder (tests; never chosen by auto).
"""
from __future__ import annotations

import datetime
import threading
import time
from collections import deque

import torch

from ..tags import INORDER_BASE
from ..config import timeout_s
from ..errors import PeerError, PeerTimeoutError
from .base import ByteCounters, Pending, Transport

GLOO_TAG_BASE = INORDER_BASE  # above every algorithm tag: the emulation's own tag space
_POLL_S = 0.05


class _Group:
    """One exchange call: sends/recvs [(peer, tensor, user tag, pair sequence number)]."""

    def __init__(self, index, sends, recvs, tag):
        self.index, self.sends, self.recvs, self.tag = index, sends, recvs, tag
        self.done = threading.Event()
        self.error = None
        self.waiting_on = None  # (peer, what) the stream is blocked on, for timeout messages
        self.posted = time.monotonic()


class _InOrderPending(Pending):
    def __init__(self, transport, group):
        self.t, self.g = transport, group

    def wait(self) -> None:
        t, g = self.t, self.g
        deadline = g.posted + t.timeout
        while not g.done.wait(_POLL_S):
            if time.monotonic() > deadline:
                peer, what = g.waiting_on or (None, "an earlier exchange on this rank's stream")
                who = t.describe_peer(peer) if peer is not None else "a peer"
                exc = PeerTimeoutError(
                    f"streamattn: timed out after {t.timeout:.0f}s in an in-order (NCCL-semantics) "
                    f"exchange (tag {g.tag}, group {g.index} of this rank): still waiting for {who} "
                    f"({what}). Under NCCL this posting order hangs: every exchange must be matched "
                    "by the same exchange on its peers, in the same order (STREAMATTN_TIMEOUT_S "
                    "sets the limit)", peer if peer is not None else -1)
                t.fail(exc)
                raise exc
        if g.error is not None:
            raise g.error


class InOrderTransport(Transport):
    """exchange() with NCCL ordering over the gloo group of `base` (a TorchTransport)."""

    name = "inorder"

    def __init__(self, base):
        self.base = base
        self.rank, self.size, self.device = base.rank, base.size, base.device
        self.counters = ByteCounters()
        self.timeout = timeout_s()
        self._sent = [0] * self.size  # messages posted to each peer (pair sequence numbers)
        self._recvd = [0] * self.size
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._groups = 0
        self._broken = None  # the first failure: like NCCL, the stream is unusable after it
        self._closed = False
        self._thread = threading.Thread(target=self._stream, name="streamattn-inorder", daemon=True)
        self._thread.start()

    def close(self):
        """Stop the stream thread once its queue is empty (it holds this transport, and so the
        group, for as long as it runs)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)

    @property
    def node_of(self):
        return self.base.node_of

    def describe_peer(self, peer):
        return self.base.describe_peer(peer)

    def begin_call(self):
        self.base.begin_call()

    def fail(self, exc):
        if self._broken is None:
            self._broken = exc
            if getattr(exc, "peer", -1) is not None and getattr(exc, "peer", -1) >= 0:
                self.base.report_failure(exc.peer, f"rank {self.rank}: {str(exc)[:200]}")

    def exchange(self, sends, recvs, tag, count=True):
        self.timeout = timeout_s()
        if self._broken is not None:
            raise PeerError(f"streamattn: the in-order stream of rank {self.rank} failed earlier "
                            f"({self._broken}); like NCCL it cannot continue", getattr(self._broken, "peer", -1))
        if count:
            for p, t in sends:
                self._count(p, t)
        s, r = [], []
        for p, t in sends:
            self._sent[p] += 1
            s.append((p, t.contiguous(), tag, self._sent[p]))
        for p, t in recvs:
            if not t.is_contiguous():
                raise ValueError("receive buffers must be contiguous")
            self._recvd[p] += 1
            r.append((p, t, tag, self._recvd[p]))
        with self._cv:
            self._groups += 1
            g = _Group(self._groups, s, r, tag)
            self._queue.append(g)
            self._cv.notify()
        return _InOrderPending(self, g)

    # -- the stream ---------------------------------------------------------------------------
    def _stream(self):
        while True:
            with self._cv:
                while not self._queue:
                    if self._closed:
                        return
                    self._cv.wait()
                g = self._queue[0]
            try:
                if self._broken is not None:
                    raise self._broken
                self._run(g)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting host thread
                g.error = exc if isinstance(exc, PeerError) else PeerError(
                    f"streamattn: in-order exchange (tag {g.tag}) failed: {exc}", -1)
                self.fail(g.error)
            with self._cv:
                self._queue.popleft()
            g.done.set()

    def _wait(self, g, work, peer, what):
        """Block the stream on one operation. The host side times out on its own (naming the peer);
        this wait only has to end eventually so the thread does not outlive a failed run for long."""
        g.waiting_on = (peer, what)
        if self._broken is not None:
            raise self._broken
        try:
            work.wait(datetime.timedelta(seconds=self.timeout + 5))
        except RuntimeError as exc:
            text = str(exc)
            raise PeerError(f"streamattn: in-order exchange with {self.describe_peer(peer)} "
                            f"failed ({what}): {text.splitlines()[0] if text else exc}", peer) from exc

    def _run(self, g):
        pg = self.base.group
        works = []
        # The group starts: every receive becomes active and tells its sender (clear-to-send).
        for p, t, tag, seq in g.recvs:
            works.append((pg.recv([t.view(-1)], p, GLOO_TAG_BASE + 2 * seq), p,
                          f"its message #{seq} to this rank (tag {tag})"))
            cts = torch.tensor([tag, t.numel() * t.element_size()], dtype=torch.int64)
            works.append((pg.send([cts], p, GLOO_TAG_BASE + 2 * seq + 1), p, "clear-to-send"))
        tokens = []
        for p, t, tag, seq in g.sends:
            buf = torch.empty(2, dtype=torch.int64)
            tokens.append((pg.recv([buf], p, GLOO_TAG_BASE + 2 * seq + 1), buf, p, t, tag, seq))
        # A send moves only once the peer's matching receive is active.
        for work, buf, p, t, tag, seq in tokens:
            self._wait(g, work, p, f"its receive #{seq} from this rank (tag {tag}) to be posted")
            want_tag, want_bytes = (int(x) for x in buf)
            nbytes = t.numel() * t.element_size()
            if (want_tag, want_bytes) != (tag, nbytes):
                raise PeerError(
                    f"streamattn: posting order differs between this rank and {self.describe_peer(p)}: "
                    f"this rank's message #{seq} to it is tag {tag}, {nbytes} bytes, but its receive "
                    f"#{seq} from this rank is tag {want_tag}, {want_bytes} bytes (NCCL matches by "
                    "order and would deliver the wrong data)", p)
            works.append((pg.send([t.view(-1)], p, GLOO_TAG_BASE + 2 * seq), p,
                          f"its receive #{seq} (tag {tag}) to complete"))
        for work, p, what in works:
            self._wait(g, work, p, what)
