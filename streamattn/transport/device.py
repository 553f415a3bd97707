"""Stream-ordered one-sided exchange: the protocol of the csrc/ device kernels, with no host polling.

    nvshmem-device  (GPU) every step is a csrc/ kernel queued on the current CUDA stream:
                    ring_step (wait for a free slot, put + signal), ring_wait (wait for the data),
                    the copy-out, ring_release (free the slot on the producer). exchange() only
                    queues work; compute queued after it waits on the GPU, never on the host.
    shm-device      (CPU) the same protocol code over the shm heap, each step executed at once by
                    the host (the host is the "stream"): how CI runs the protocol.

Per ordered pair s -> r, on r's heap: D slots of S bytes for s (data offset (s*D + slot)*S) and D
data counters (signal s*D + slot); on s's heap: D ack counters for r (signal n*D + r*D + slot).
Chunk `step` (0, 1, ... per pair, never reset) goes to slot step % D. Exactly the csrc/exchange.h
ring-step contract: the producer waits ack[slot] >= step - D + 1, puts, adds `nblocks` to
data[slot]; the consumer waits data[slot] >= (step // D + 1) * nblocks, copies out, then sets
ack[slot] = step + 1 on the producer.

Like NCCL, a stream that waits cannot do anything else, so an exchange is run in rounds: round c
puts chunk c of every send, then takes chunk c of every receive. Every peer in the exchange posts
the matching exchange, so round c completes everywhere (induction over rounds; the first D chunks
need no acknowledgement). An exchange its peers do not post in the same order blocks, as it would
on NCCL: tests/test_inorder.py checks the algorithms against exactly that rule. Peers on other
nodes use the two-sided fallback.

Waits: on the CPU every blocking step has a deadline naming the peer. On GPUs the wait happens on
the device; the host watches each exchange's completion event and raises PeerTimeoutError naming the
exchange's peers once one is overdue (checked on every wait() and at most MAX_INFLIGHT exchanges
ahead of the GPU).
"""
from __future__ import annotations

import time
import weakref
from collections import deque

import torch

from ..tags import DEVICE_BOOTSTRAP
from ..errors import PeerError, PeerTimeoutError
from .base import Pending
from .node_heap import NodeHeapTransport

DEPTH = 2
NBLOCKS = 4  # thread blocks per chunk put (ring_step grid), so data counters grow by 4 per use
MAX_INFLIGHT = 256


class HostOps:
    """The protocol's steps over a Heap, executed by the host at once (CPU: shm)."""

    def __init__(self, transport, heap):
        # a proxy: the transport owns these ops, and a cycle would keep its group alive past
        # destroy_process_group (see torch_dist.FailureMailbox)
        self.t, self.heap = weakref.proxy(transport), heap
        self.n, self.me = heap.size, heap.rank

    def _spin(self, cond, peer, what):
        t = self.t
        deadline = time.monotonic() + t.timeout
        spins = 0
        while not cond():
            spins += 1
            if spins > 200:
                time.sleep(min(1e-3, 1e-6 * (spins - 200)))
            if spins % 256 == 0:
                g = t.members[peer]
                if not self.heap.peer_alive(peer):
                    t.base.report_failure(g, f"rank {t.rank} saw it die (device protocol)")
                    raise PeerError(f"streamattn: {t.describe_peer(g)} died (its process is gone) "
                                    f"while this rank waited for {what}", g)
                if time.monotonic() > deadline:
                    raise PeerTimeoutError(
                        f"streamattn: timed out after {t.timeout:.0f}s waiting for {what} from "
                        f"{t.describe_peer(g)} (stream-ordered exchange: the peer may be stuck, "
                        "dead, or posting its exchanges in another order; STREAMATTN_TIMEOUT_S "
                        "sets the limit)", g)

    def put_chunk(self, p, src, step):
        D, S, n, me, heap = DEPTH, self.t.slot_bytes, self.n, self.me, self.heap
        slot = step % D
        if step >= D:
            self._spin(lambda: heap.read_signal(n * D + p * D + slot) >= step - D + 1, p,
                       f"a free slot (chunk {step + 1})")
        heap.put(p, src, (me * D + slot) * S)
        heap.signal(p, me * D + slot, (step // D + 1) * NBLOCKS)

    def take_chunk(self, p, dst, step):
        D, S, n, me, heap = DEPTH, self.t.slot_bytes, self.n, self.me, self.heap
        slot = step % D
        self._spin(lambda: heap.read_signal(p * D + slot) >= (step // D + 1) * NBLOCKS, p,
                   f"chunk {step + 1}")
        dst.copy_(heap.local((p * D + slot) * S, dst.numel()))
        heap.signal(p, n * D + me * D + slot, step + 1)

    def record(self):
        return None  # everything already happened

    @staticmethod
    def done(token) -> bool:
        return True


def _stream_handle(device) -> int:
    """cudaStream_t of torch's current stream (a hook: the CPU tests of NvshmemDeviceOps fake it)."""
    return torch.cuda.current_stream(device).cuda_stream


def _record_event(device):
    """A CUDA event recorded on the current stream (hook, as _stream_handle)."""
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


class NvshmemDeviceOps:
    """The protocol's steps as csrc/ kernels on the current CUDA stream (GPU; see csrc/exchange.h)."""

    def __init__(self, transport, heap):
        self.t, self.heap = weakref.proxy(transport), heap  # a proxy: as HostOps
        self.n, self.me = heap.size, heap.rank
        self.ext = heap.extension()
        D, S, n = DEPTH, transport.slot_bytes, self.n
        self.data_sig = heap.signal_tensor[: n * D]
        self.ack_sig = heap.signal_tensor[n * D : 2 * n * D]
        self.my_box = heap.data_tensor[self.me * D * S : (self.me + 1) * D * S]  # symmetric view

    def _stream(self):
        return _stream_handle(self.heap.device)

    def put_chunk(self, p, src, step):
        D, me = DEPTH, self.me
        self.ext.ring_step(src, self.my_box, self.t.slot_bytes, D, self.data_sig[me * D : (me + 1) * D],
                           self.ack_sig[p * D : (p + 1) * D], step, self.heap.pes[p], NBLOCKS,
                           self._stream())

    def take_chunk(self, p, dst, step):
        D, S, me = DEPTH, self.t.slot_bytes, self.me
        s = self._stream()
        self.ext.ring_wait(self.data_sig[p * D : (p + 1) * D], step, D, NBLOCKS, s)
        dst.copy_(self.heap.local((p * D + step % D) * S, dst.numel()))
        self.ext.ring_release(self.ack_sig[me * D : (me + 1) * D], step, D, self.heap.pes[p], s)

    def record(self):
        return _record_event(self.heap.device)

    @staticmethod
    def done(token) -> bool:
        return token is None or token.query()


class _DevicePending(Pending):
    def __init__(self, t, entry, remote):
        self.t, self.entry, self.remote = t, entry, remote

    def wait(self):
        self.t.watch(until=self.entry)
        if self.remote is not None:
            self.remote.wait()


class StreamOrderedTransport(NodeHeapTransport):
    """exchange() with the device protocol among this node's ranks; `base` (two-sided, same
    group) carries other nodes' messages and bootstraps the heap. ops_cls: HostOps or
    NvshmemDeviceOps; heap_factory: ShmHeap or NvshmemHeap."""

    def __init__(self, base, heap_factory, ops_cls, slot_bytes=None):
        # per member: DEPTH data counters on the receiver, DEPTH ack counters on the producer
        super().__init__(base, heap_factory, DEPTH, 2 * DEPTH, DEVICE_BOOTSTRAP, slot_bytes)
        n = len(self.members)
        self.ops = ops_cls(self, self.heap)
        self.steps_out = [0] * n  # chunks sent to / received from each member, never reset
        self.steps_in = [0] * n
        self.inflight = deque()  # (token, posted time, peers, tag)

    def exchange(self, sends, recvs, tag, count=True):
        remote, local_s, local_r = self.start_exchange(sends, recvs, tag, count)
        S = self.slot_bytes
        outs = [(p, t.contiguous().reshape(-1).view(torch.uint8)) for p, t in local_s]
        ins = [(p, t.reshape(-1).view(torch.uint8)) for p, t in local_r]
        rounds = max([-(-b.numel() // S) for _, b in outs + ins] or [0])
        for c in range(rounds):  # round c: chunk c of every send, then chunk c of every receive
            for p, b in outs:
                if c * S < b.numel():
                    self.ops.put_chunk(p, b[c * S : (c + 1) * S], self.steps_out[p])
                    self.steps_out[p] += 1
            for p, b in ins:
                if c * S < b.numel():
                    self.ops.take_chunk(p, b[c * S : (c + 1) * S], self.steps_in[p])
                    self.steps_in[p] += 1
        entry = None
        if outs or ins:
            peers = sorted({self.members[p] for p, _ in outs + ins})
            entry = (self.ops.record(), time.monotonic(), peers, tag)
            self.inflight.append(entry)
            if len(self.inflight) > MAX_INFLIGHT:
                self.watch(until=self.inflight[0])
        return _DevicePending(self, entry, remote)

    def watch(self, until=None):
        """Retire completed exchanges; block (up to the timeout) on those up to `until`; raise
        PeerTimeoutError naming the peers of an exchange that is overdue."""
        while self.inflight:
            token, posted, peers, tag = self.inflight[0]
            if self.ops.done(token):
                self.inflight.popleft()
                continue
            if time.monotonic() - posted > self.timeout:
                who = ", ".join(self.describe_peer(p) for p in peers)
                raise PeerTimeoutError(
                    f"streamattn: a stream-ordered exchange (tag {tag}) with {who} has not completed "
                    f"on the device after {self.timeout:.0f}s: a peer is stuck, dead, or posting "
                    "its exchanges in another order (STREAMATTN_TIMEOUT_S sets the limit)", peers[0])
            if until is None or not any(e is until for e in self.inflight):
                return
            time.sleep(1e-4)
