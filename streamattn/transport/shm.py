"""`shm`: a symmetric heap in POSIX shared memory for the CPU processes of one node.

Each member creates a segment in /dev/shm (mode 0600, an unguessable name), the members exchange the
names over the bootstrap transport, map each other's segments, and each creator unlinks its segment
as soon as every member has mapped it, so nothing stays in /dev/shm even after `kill -9` of any rank
(a rank killed inside the short create→unlink window leaves a segment whose name carries its pid;
the next heap created on the host removes it, if the file is the current user's and carries the
header its creator wrote: magic, pid, uid).

put is a memcpy into the peer's mapping; signal is an aligned 8-byte store into the peer's signal
slot after it; wake rings the peer's doorbell (doorbell.py) so a peer blocked waiting for a signal
need not poll. Both are plain stores, so the ordering "data before signal" relies on the CPU's
store ordering: x86-64 (TSO) keeps stores in program order. On weaker memory models (aarch64) this
backend refuses to start rather than risk a torn read.
"""
from __future__ import annotations

import mmap
import os
import platform
import re
import secrets
import stat
import struct

import numpy as np
import torch

from ..procs import pid_alive
from .doorbell import Doorbell
from .heap import Heap

PREFIX = "streamattn-"
SHM_DIR = "/dev/shm"
_HEADER = 64  # bytes at the start of a segment: segment_header(creator pid)
MAGIC = b"streamattn-shm\0\0"


def supported() -> tuple:
    """(ok, reason): whether this host can run the shm backend."""
    if not os.path.isdir(SHM_DIR):
        return False, f"{SHM_DIR} does not exist"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"the shm signal protocol relies on x86-64 store ordering, not {platform.machine()}"
    return True, ""


def segment_header(pid: int) -> bytes:
    """What a creator writes at the start of its segment: magic, version, pid, uid."""
    return struct.pack("<16sIQQ", MAGIC, 1, pid, os.geteuid()).ljust(_HEADER, b"\0")


def _is_ours(path: str, pid: int) -> bool:
    """A regular file owned by this user whose header says streamattn process `pid` made it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size < _HEADER:
            return False
        return os.pread(fd, _HEADER, 0) == segment_header(pid)
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_segments() -> list:
    """Unlink streamattn segments whose creating process is gone: only files owned by the current
    user that carry the header their creator wrote (a file that merely matches the name pattern is
    left alone). Returns the names removed."""
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-[0-9a-f]+", name)
        if not m or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(SHM_DIR, name)
        if _is_ours(path, int(m.group(1))):
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
    return removed


class ShmHeap(Heap):
    """Symmetric heap over /dev/shm for `size` members.

    all_gather_text(text, pid) -> ([text of each member], [pid of each member]), given by the
    transport: first the segment names, then (a barrier: every member has mapped every segment)
    whether each member reached every peer's doorbell. `barrier` is not needed here.
    """

    strided = True

    def __init__(self, rank, size, data_bytes, num_signals, all_gather_text, barrier):
        ok, reason = supported()
        if not ok:
            raise RuntimeError(f"streamattn shm transport unavailable: {reason}")
        remove_stale_segments()
        self.rank, self.size = rank, size
        self.data_bytes, self.num_signals = data_bytes, num_signals
        self._sig_bytes = num_signals * 8
        self._total = _HEADER + self._sig_bytes + data_bytes
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(12)}"
        try:
            self.bell = Doorbell(self.name)
        except OSError:  # no abstract Unix sockets here: peers are polled
            self.bell = None
        path = os.path.join(SHM_DIR, self.name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self._maps = [None] * size
        try:
            os.ftruncate(fd, self._total)
            os.pwrite(fd, segment_header(os.getpid()), 0)  # lets a later cleanup recognise it as ours
            self._maps[rank] = mmap.mmap(fd, self._total)
        finally:
            os.close(fd)
        try:
            names, pids = all_gather_text(self.name, os.getpid())
            self.pids = pids
            for peer, name in enumerate(names):
                if peer == rank:
                    continue
                if not re.fullmatch(re.escape(PREFIX) + r"\d+-[0-9a-f]+", name):
                    raise RuntimeError(f"rank {peer} sent a malformed shm segment name")
                pfd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
                try:
                    if os.fstat(pfd).st_size != self._total:
                        raise RuntimeError(f"rank {peer}'s shm segment has the wrong size "
                                           "(ranks built different heaps)")
                    self._maps[peer] = mmap.mmap(pfd, self._total)
                finally:
                    os.close(pfd)
            reached = self.bell is not None and self.bell.connect(names, rank)
            # a barrier (every member has mapped every segment) that also agrees on doorbells
            flags, _ = all_gather_text(f"mapped bells={int(reached)}", os.getpid())
            if self.bell is not None:
                self.bell.usable = all(f == "mapped bells=1" for f in flags)
        except BaseException:
            if self.bell is not None:
                self.bell.close()
            raise
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._sig = [np.frombuffer(m, dtype=np.int64, count=num_signals, offset=_HEADER) for m in self._maps]
        self._data = [torch.frombuffer(m, dtype=torch.uint8, count=data_bytes,
                                       offset=_HEADER + self._sig_bytes) for m in self._maps]

    def put(self, peer, src, dst_offset):
        """Any strides: the bytes land in src's row-major order (one copy, no packing first)."""
        n = src.numel() * src.element_size()
        dst = self._data[peer][dst_offset : dst_offset + n]
        if src.is_contiguous():
            dst.copy_(src.reshape(-1).view(torch.uint8))
        else:
            dst.view(src.dtype).view(src.shape).copy_(src)

    def signal(self, peer, slot, value):
        self._sig[peer][slot] = value

    def read_signal(self, slot):
        return int(self._sig[self.rank][slot])

    def local(self, offset, nbytes):
        return self._data[self.rank][offset : offset + nbytes]

    def wake(self, peer):
        if self.bell is not None and self.bell.usable:
            self.bell.ring(peer)

    def sleep_until_woken(self, timeout):
        return self.bell is not None and self.bell.wait(timeout)

    def peer_alive(self, peer):
        return pid_alive(self.pids[peer])

    def close(self):
        if self.bell is not None:
            self.bell.close()
        self._sig, self._data = [], []
        for m in self._maps:
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a tensor view is still alive; the mapping goes with it
                    pass
        self._maps = []
