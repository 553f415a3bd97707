"""The Transport interface every algorithm is written against.

Algorithms only ever say "send these tensors to these peers, receive those from those, then wait".
The two-sided torch.distributed backend and the one-sided backends (shm, nvshmem) implement the
same calls, so an algorithm is written once. Peers are ranks *of the transport's group*.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class ByteCounters:
    """Bytes this rank sent, split by link class (same node or across nodes)."""

    intra: int = 0
    inter: int = 0
    messages: int = 0

    def reset(self) -> None:
        self.intra = self.inter = self.messages = 0

    def as_dict(self) -> dict:
        return {"intra": self.intra, "inter": self.inter, "messages": self.messages}


SMALL_WORDS = 63  # all_gather_small's largest vector (int64 entries)


class Pending(ABC):
    """Handle of posted sends/receives. wait() raises PeerError/PeerTimeoutError naming the peer."""

    @abstractmethod
    def wait(self) -> None: ...


class AllPending(Pending):
    """Several pendings as one: wait() waits on each in order. (A module-level class: one defined
    inside a function is a new class object per call, held in a reference cycle with its methods,
    and the messages its closure holds then live until the cyclic garbage collector runs.)"""

    def __init__(self, pendings):
        self.pendings = list(pendings)

    def wait(self) -> None:
        for p in self.pendings:
            p.wait()


class Parts:
    """One message made of several tensors laid end to end, each in its own row-major order: a
    gather list when sent, a scatter list when received. The parts are views of any strides
    (e.g. one head slice of a [B, S, H, D] shard, or the rows of a member in a bigger buffer),
    all of one dtype and device; the bytes on the wire are those of
    torch.cat([t.reshape(-1) for t in tensors]). Transport.exchange_parts moves them; a
    transport that can copy straight between the parts and its buffers (the shm heap) saves the
    packing copy on each side."""

    __slots__ = ("tensors", "dtype", "device", "sizes")

    def __init__(self, tensors):
        tensors = list(tensors)
        first = tensors[0]
        self.tensors = [t for t in tensors if t.numel()]
        if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
            raise ValueError("Parts: every part must have the same dtype and device")
        self.dtype, self.device = first.dtype, first.device
        self.sizes = [t.numel() for t in self.tensors]

    def numel(self) -> int:
        return sum(self.sizes)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def pack(self) -> torch.Tensor:
        """The message as one contiguous 1-D tensor (each part copied once)."""
        flat = torch.empty(self.numel(), dtype=self.dtype, device=self.device)
        self.unpack_into(flat)
        return flat

    def unpack_into(self, flat: torch.Tensor) -> None:
        """Copy the parts into `flat` (1-D, numel() elements of the parts' dtype), end to end."""
        off = 0
        for t, n in zip(self.tensors, self.sizes):
            flat[off:off + n].view(t.shape).copy_(t)
            off += n

    def fill_from(self, flat: torch.Tensor) -> None:
        """Copy `flat` (1-D, numel() elements of the parts' dtype) into the parts, end to end."""
        off = 0
        for t, n in zip(self.tensors, self.sizes):
            t.copy_(flat[off:off + n].view(t.shape))
            off += n


class _Unstaging(Pending):
    """A Pending whose staged receives are copied into their Parts once it completes."""

    def __init__(self, inner, staged, keep):
        self.inner, self.staged, self.keep = inner, staged, keep

    def wait(self) -> None:
        self.inner.wait()
        for parts, buf in self.staged:
            parts.fill_from(buf)
        self.staged = self.keep = []


class Transport(ABC):
    """Point-to-point exchange within one group.

    rank, size: this rank and the group size. device: where message tensors must live.
    node_of: node index of every group rank (classifies bytes as intra/inter).
    """

    rank: int
    size: int
    device: torch.device
    node_of: list
    counters: ByteCounters

    @abstractmethod
    def exchange(self, sends, recvs, tag: int, count: bool = True) -> Pending:
        """Post sends [(peer, tensor)] and receives [(peer, tensor)] without blocking.

        Tensors must be contiguous and stay alive and unmodified until wait() returns. At most one
        send and one receive per (peer, tag) may be outstanding. count=False keeps the bytes out of
        the counters (metadata, not payload).
        """

    def exchange_parts(self, sends, recvs, tag: int, count: bool = True) -> Pending:
        """exchange() where a message may also be a Parts (sends: gathered from its tensors;
        receives: scattered into them by the time wait() returns). Here every Parts is staged
        through one contiguous buffer; a transport that moves parts directly overrides this."""
        return self.staged_exchange(sends, recvs, tag, count, direct=lambda peer, parts: False)

    def staged_exchange(self, sends, recvs, tag, count, direct):
        """exchange() with each Parts message packed into (sends) or received through (recvs) a
        contiguous buffer, except those for which direct(peer, parts) is true: exchange() takes
        those as they are."""
        s, r, staged, packed = [], [], [], False
        for p, x in sends:
            if isinstance(x, Parts) and not direct(p, x):
                x, packed = x.pack(), True
            s.append((p, x))
        for p, x in recvs:
            if isinstance(x, Parts) and not direct(p, x):
                buf = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
                staged.append((x, buf))
                x = buf
            r.append((p, x))
        pending = self.exchange(s, r, tag, count)
        # the packed sends live until the wait (as CastTransport keeps its cast ones)
        return _Unstaging(pending, staged, s) if staged or packed else pending

    @abstractmethod
    def describe_peer(self, peer: int) -> str:
        """How error messages name a peer, e.g. 'rank 2 (global rank 6)'."""

    def _count(self, peer: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.node_of[peer] == self.node_of[self.rank]:
            self.counters.intra += nbytes
        else:
            self.counters.inter += nbytes
        self.counters.messages += 1

    def all_gather(self, tensor: torch.Tensor, members, tag: int, count: bool = True) -> list:
        """Every member's `tensor` (same shape and dtype on each), in member order; this rank must
        be one of `members` (group ranks)."""
        out, pending = self.all_gather_post(tensor, members, tag, count)
        pending.wait()
        return out

    def all_gather_post(self, tensor: torch.Tensor, members, tag: int, count: bool = True):
        """all_gather without blocking: (the list all_gather returns, filled once the Pending's
        wait() returns; the Pending). `tensor` must stay alive and unmodified until then."""
        tensor = tensor.contiguous()
        out, sends, recvs = [], [], []
        for p in members:
            if p == self.rank:
                out.append(tensor)
                continue
            out.append(torch.empty_like(tensor))
            sends.append((p, tensor))
            recvs.append((p, out[-1]))
        return out, self.exchange(sends, recvs, tag, count=count)

    def all_gather_rows(self, tensor: torch.Tensor, lens, tag: int) -> torch.Tensor:
        """Variable-length all-gather along dim 1 over the whole group: this rank's tensor is
        [B, lens[rank], ...]; returns [B, sum(lens), ...], rank p's rows at sum(lens[:p]), on every
        rank. Ranks with no rows send nothing."""
        tensor = tensor.contiguous()
        me, shape = self.rank, tensor.shape
        parts = [tensor if p == me else tensor.new_empty(shape[0], n, *shape[2:])
                 for p, n in enumerate(lens)]
        sends = [(p, tensor) for p in range(self.size) if p != me and lens[me]]
        recvs = [(p, parts[p]) for p in range(self.size) if p != me and lens[p]]
        self.exchange(sends, recvs, tag).wait()
        return torch.cat(parts, 1)

    def all_gather_small(self, vec: torch.Tensor, tag: int) -> list:
        """all_gather_vector for the per-call signature: every rank's int64 vector (the same
        length everywhere, at most SMALL_WORDS entries), on the CPU, in rank order. The one-sided
        transports read their node's rows from a board in the heap instead of exchanging P-1
        messages."""
        return self.all_gather_vector(vec, tag)

    def all_gather_vector(self, vec: torch.Tensor, tag: int) -> list:
        """Every rank's copy of a small 1-D tensor (metadata: not counted as payload), on the CPU."""
        return [t.cpu() for t in self.all_gather(vec.to(self.device), range(self.size), tag, count=False)]
