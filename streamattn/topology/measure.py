"""A short bandwidth / latency test between two ranks over torch.distributed send/recv.

Protocol between group ranks ``a`` (initiator) and ``b``; every other rank does nothing:
- latency: ``reps`` ping-pongs of one int64 after one warm-up; latency = median round trip / 2.
- bandwidth: ``reps`` transfers of ``nbytes`` (uint8) from a to b, each acknowledged by b with one
  int64, after one warm-up; bandwidth = nbytes / (median time - 2 x latency), the subtraction
  clamped so it never removes more than half the time.
Every wait has a timeout. Results are bytes/s (per direction) and seconds (one way), known on
rank ``a`` only; `measure_pair` broadcasts them to every rank of the group.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import comm

DEFAULT_NBYTES = 8 << 20
DEFAULT_REPS = 5


@dataclass(frozen=True)
class Measurement:
    bandwidth_Bps: float  # bytes/s, one direction
    latency_s: float  # one-way, seconds
    method: str  # e.g. "gloo-sendrecv 8MiB x5 median; ping-pong 8B x5 median/2"

    @property
    def source(self) -> str:
        return "measured:" + self.method


def _human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def _send(t, peer, group, timeout_s, dev):
    comm.wait(dist.isend(t, dst=comm.global_rank(group, peer), group=group), timeout_s,
              f"send to rank {peer}", dev)


def _recv(t, peer, group, timeout_s, dev):
    comm.wait(dist.irecv(t, src=comm.global_rank(group, peer), group=group), timeout_s,
              f"recv from rank {peer}", dev)


def _run_pair(a: int, b: int, group, nbytes: int, reps: int, timeout_s: float):
    me = comm.rank(group)
    dev = comm.device(group)
    peer = b if me == a else a
    token = torch.zeros(1, dtype=torch.int64, device=dev)
    payload = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    rtts, times = [], []
    for i in range(reps + 1):  # ping-pong
        if me == a:
            t0 = time.perf_counter()
            _send(token, peer, group, timeout_s, dev)
            _recv(token, peer, group, timeout_s, dev)
            if i:
                rtts.append(time.perf_counter() - t0)
        else:
            _recv(token, peer, group, timeout_s, dev)
            _send(token, peer, group, timeout_s, dev)
    for i in range(reps + 1):  # bulk transfer + ack
        if me == a:
            t0 = time.perf_counter()
            _send(payload, peer, group, timeout_s, dev)
            _recv(token, peer, group, timeout_s, dev)
            if i:
                times.append(time.perf_counter() - t0)
        else:
            _recv(payload, peer, group, timeout_s, dev)
            _send(token, peer, group, timeout_s, dev)
    if me != a:
        return None
    lat = statistics.median(rtts) / 2
    t = statistics.median(times)
    bw = nbytes / max(t - 2 * lat, 0.5 * t)
    return bw, lat


def measure_pair(
    a: int,
    b: int,
    group=None,
    *,
    nbytes: int = DEFAULT_NBYTES,
    reps: int = DEFAULT_REPS,
    timeout_s: Optional[float] = None,
) -> Measurement:
    """Measure the link between group ranks ``a`` and ``b``; collective over ``group`` (every rank
    must call it with the same arguments) and every rank returns the same `Measurement`."""
    if a == b:
        raise ValueError("measure_pair needs two distinct ranks")
    if nbytes < 1 or reps < 1:
        raise ValueError("nbytes and reps must be >= 1")
    t = timeout_s or comm.default_timeout()
    me = comm.rank(group)
    res = None
    if me in (a, b):
        res = _run_pair(a, b, group, int(nbytes), int(reps), t)
    bw, lat = comm.broadcast_float64(res, 2, src=a, group=group, timeout_s=t)
    method = (
        f"{comm.backend(group)}-sendrecv {_human_bytes(int(nbytes))} x{reps} median; "
        f"ping-pong 8B x{reps} median/2; ranks {a}<->{b}"
    )
    return Measurement(bw, lat, method)
