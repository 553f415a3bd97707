"""The symmetric-heap interface the one-sided protocol runs on (shm on CPU, NVSHMEM on GPU).

Each of the n members (ranks of one node) owns a heap of the same layout:
    signals: int64 slots, written by peers (release) and polled by the owner (acquire)
    data:    bytes that peers put into
Offsets and slot indices are identical on every member ("symmetric"), so a peer can address
another's heap without asking it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod


class Heap(ABC):
    """rank/size: this member's index among the heap members and their number."""

    rank: int
    size: int
    data_bytes: int
    num_signals: int
    # put() takes a tensor of any strides and local() views copy into any (a CPU heap): the
    # protocol then moves Parts messages without packing them first.
    strided = False

    @abstractmethod
    def put(self, peer: int, src, dst_offset: int) -> None:
        """Copy the bytes of contiguous tensor `src` into peer's data at dst_offset (non-blocking
        on GPUs; ordered before a later signal() to the same peer)."""

    @abstractmethod
    def signal(self, peer: int, slot: int, value: int) -> None:
        """Set peer's signal `slot` to value, after every earlier put to that peer is visible."""

    @abstractmethod
    def read_signal(self, slot: int) -> int:
        """This member's own signal `slot` (acquire)."""

    @abstractmethod
    def local(self, offset: int, nbytes: int):
        """A uint8 tensor view of this member's own data [offset, offset + nbytes)."""

    @abstractmethod
    def peer_alive(self, peer: int) -> bool:
        """False once the peer is known to be gone (lets waits fail fast)."""

    def quiet(self) -> None:
        """Complete every outstanding put of this member (a no-op where puts are synchronous)."""

    def wake(self, peer: int) -> None:
        """Tell peer that signals of its changed, after signal() (a no-op where peers poll)."""

    def sleep_until_woken(self, timeout: float) -> bool:
        """Block until a peer's wake() or `timeout` seconds; False at once where this heap has no
        wake-ups (the caller then sleeps on its own)."""
        return False

    @abstractmethod
    def close(self) -> None: ...
