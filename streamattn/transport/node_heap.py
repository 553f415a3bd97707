"""What the two symmetric-heap transports share (`onesided.py`: host-polled; `device.py`:
stream-ordered): the node's members, the heap bootstrapped over the two-sided `base` transport,
and the split of an exchange into peers on this node (the heap) and peers on other nodes (`base`).

Each subclass states only its protocol: how chunks move through the heap's slots and how a wait
ends. Byte counts are taken here, once, for both halves of an exchange; `base` then runs with
count=False so nothing is counted twice.
"""
from __future__ import annotations

import torch

from .. import trace
from ..config import shm_slot_bytes, wait_timeout_s
from .base import ByteCounters, Parts, Transport


class NodeHeapTransport(Transport):
    """Transport over a symmetric heap among the ranks of this node, `base` for the rest.

    heap_factory(index, members, data_bytes, signal_slots, all_gather_text, barrier) builds the
    heap (ShmHeap or NvshmemHeap); `data_bytes` is members x depth x slot_bytes (+ extra_bytes at
    extra_offset), `signal_slots` members x signals_per_member (+ extra_signals from extra_signal0).
    """

    def __init__(self, base, heap_factory, depth: int, signals_per_member: int, bootstrap_tag: int,
                 slot_bytes=None, extra_bytes: int = 0, extra_signals: int = 0):
        self.base = base
        self.rank, self.size, self.device = base.rank, base.size, base.device
        self.counters = ByteCounters()
        self.timeout = wait_timeout_s()
        self.bootstrap_tag = bootstrap_tag
        mine = base.node_of[self.rank]
        self.members = [r for r in range(self.size) if base.node_of[r] == mine]
        self.local_index = {g: i for i, g in enumerate(self.members)}
        n = len(self.members)
        if slot_bytes is None:
            slot_bytes = shm_slot_bytes()
        self.slot_bytes = max(4096, slot_bytes - slot_bytes % 64)  # whole cache lines
        # extra_bytes / extra_signals: a subclass's own region after the mailboxes / signals
        self.extra_offset, self.extra_signal0 = n * depth * self.slot_bytes, n * signals_per_member
        self.heap = heap_factory(self.local_index[self.rank], n, self.extra_offset + extra_bytes,
                                 self.extra_signal0 + extra_signals, self.all_gather_text, self.barrier)

    @property
    def node_of(self):
        return self.base.node_of

    # -- bootstrap over the two-sided transport (node members only) -------------------------
    def all_gather_text(self, text: str, pid: int):
        """([text of each member], [pid of each member]) in member order."""
        data = list(text.encode())
        data += [0] * (max(96, len(data)) - len(data))  # members send equal lengths
        vec = torch.tensor([pid] + data, dtype=torch.int64, device=self.base.device)  # NCCL: GPU
        out = [v.cpu() for v in self.base.all_gather(vec, self.members, self.bootstrap_tag, count=False)]
        return [bytes(int(x) for x in v[1:] if int(x)).decode() for v in out], [int(v[0]) for v in out]

    def barrier(self):
        self.all_gather_text("barrier", 0)

    def describe_peer(self, peer):
        return self.base.describe_peer(peer)

    def begin_call(self):
        self.base.begin_call()

    # -- one exchange: count, then split by node ----------------------------------------------
    def start_exchange(self, sends, recvs, tag, count):
        """Count the bytes, post the other nodes' part on `base`; returns (its Pending or None,
        this node's sends, this node's receives) with peers as member indices."""
        self.timeout = wait_timeout_s()
        local = self.local_index
        if count:
            for p, t in sends:
                self._count(p, t)
                if trace.enabled():
                    trace.event("post", p, self.node_of[p] != self.node_of[self.rank],
                                t.numel() * t.element_size())
        remote_s = [(p, t) for p, t in sends if p not in local]
        remote_r = [(p, t) for p, t in recvs if p not in local]
        remote = self.base.exchange(remote_s, remote_r, tag, count=False) if (remote_s or remote_r) else None
        local_s = [(local[p], t) for p, t in sends if p in local and t.numel()]
        local_r = []
        for p, t in recvs:
            if p in local and t.numel():
                if not isinstance(t, Parts) and not t.is_contiguous():
                    raise ValueError("receive buffers must be contiguous")
                local_r.append((local[p], t))
        return remote, local_s, local_r

    def close(self):
        self.heap.close()
