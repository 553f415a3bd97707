"""Doorbells: how a rank blocked on a shared-memory signal is woken instead of polling it.

On a node whose ranks outnumber its cores, a waiting rank that polls its signals (even with
sleeps in between) takes CPU from the very peer it waits for: measured on 2 cores with 4 ranks,
the polling loop cost 4-9 ms of CPU per rank and call, about as much as all of yunchang's
non-kernel work. So each member of an shm heap owns a doorbell, a Unix datagram socket in the
abstract namespace (it disappears with its process: nothing to clean up after a crash), and a
peer rings it after every signal it sets; a waiting member blocks in poll() until a ring
arrives or a time slice passes (its liveness and deadline checks run between slices).

A ring carries no data. It only says "look at your signals again", so a lost, stale or foreign
ring (any process in the network namespace that reads the socket's random name from
/proc/net/unix can send one) costs one extra look and never a wrong result. Rings are
non-blocking: when the receiver's queue is full it has rings pending already.

Whether the bells reach every member is settled when the heap is built: each member probes every
peer's address once (a peer in another network namespace sharing /dev/shm is unreachable, and a
send to it fails at once), and the heap uses doorbells only if every member reached every peer;
otherwise every member keeps polling with sleeps, as before.
"""
from __future__ import annotations

import select
import socket


class Doorbell:
    """This member's doorbell, named `name` (unique per heap member); peers are rung by name."""

    def __init__(self, name: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                   | socket.SOCK_NONBLOCK)
        try:
            self._sock.bind(address(name))
        except OSError:
            self._sock.close()
            raise
        self._poll = select.poll()  # not select.select: a process may hold fds above FD_SETSIZE
        self._poll.register(self._sock.fileno(), select.POLLIN)
        self.peers: list = []  # peer member -> its address (None: this member)
        self.usable = False  # set by the heap once every member reached every peer

    def connect(self, names: list, me: int) -> bool:
        """The members' doorbell names in member order; probes each peer once. Returns whether
        every peer's doorbell is reachable from here (a full queue counts: it exists)."""
        self.peers = [None if i == me else address(n) for i, n in enumerate(names)]
        ok = True
        for a in self.peers:
            if a is None:
                continue
            try:
                self._sock.sendto(b"\1", a)
            except BlockingIOError:
                pass
            except OSError:
                ok = False
        return ok

    def ring(self, peer: int) -> None:
        try:
            self._sock.sendto(b"\1", self.peers[peer])
        except OSError:  # its queue is full (it has rings pending) or it is gone (the waits see it)
            pass

    def wait(self, timeout: float) -> bool:
        """Block until a ring arrives or `timeout` seconds pass; consume every pending ring.
        False when this doorbell is not usable (the caller sleeps instead)."""
        if not self.usable:
            return False
        if self._poll.poll(max(0, int(timeout * 1000))):
            self.drain()
        return True

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self._sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1

    def close(self) -> None:
        self._sock.close()
        self.usable = False


def address(name: str) -> bytes:
    """The abstract-namespace address of doorbell `name` (Linux: a leading NUL byte)."""
    return b"\0" + name.encode("ascii") + b".bell"
