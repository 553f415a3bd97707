"""An opt-in reduced-precision wire: a Transport that sends float32 payloads as bfloat16.

`streamattn.attention(..., comm_dtype=torch.bfloat16)` wraps the group's transport in `CastTransport`:
every float32 send is cast to bfloat16 before it is posted (half the bytes on every link) and every
float32 receive lands in a bfloat16 buffer that is widened into the caller's buffer when the wait
returns. Compute and accumulation stay float32, so the error is that of rounding q, k, v and the
partial outputs to bfloat16 once per hop (about 1e-2 relative; `streamattn bench --comm-dtype
bfloat16` reports it against float64). Exact stays the default.

Not cast: metadata (count=False), tensors that are not float32, and the tags named in `exact_tags`
(the (out, lse) partials of the joint tokens: a log-sum-exp rounded to bfloat16 would weight whole
partial outputs wrongly).
"""
from __future__ import annotations

import weakref

import torch

from ..validate import COMM_DTYPES
from .base import Pending, Transport

WIRE_DTYPES = COMM_DTYPES[1:]


def check_comm_dtype(comm_dtype, dtype) -> None:
    """Raise ValueError unless `comm_dtype` (None or a torch.dtype) can carry `dtype` data."""
    if comm_dtype is None:
        return
    if comm_dtype not in WIRE_DTYPES:
        raise ValueError(f"comm_dtype={comm_dtype!r}: supported wire formats are "
                         f"{', '.join(str(d) for d in WIRE_DTYPES)} (or None: exact)")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"comm_dtype={comm_dtype} needs float32 or bfloat16 inputs, got {dtype}")


class _CastPending(Pending):
    def __init__(self, inner, widen, keep):
        self.inner, self.widen = inner, widen
        self.keep = keep  # the cast send tensors must live until the wait

    def wait(self) -> None:
        self.inner.wait()
        for dst, src in self.widen:
            dst.copy_(src)
        self.widen = self.keep = []


class CastTransport(Transport):
    """`real` with float32 payloads travelling as `wire` (bfloat16)."""

    def __init__(self, real, wire=torch.bfloat16, exact_tags=()):
        # a proxy: the api caches this wrapper on `real`, and a cycle would keep the group alive
        # past destroy_process_group (see torch_dist.FailureMailbox)
        self.real, self.wire, self.exact_tags = weakref.proxy(real), wire, frozenset(exact_tags)
        self.rank, self.size, self.device = real.rank, real.size, real.device
        self.node_of = real.node_of
        self.counters = real.counters  # the wire bytes are what the real transport counts

    def exchange(self, sends, recvs, tag, count=True):
        if not count or tag in self.exact_tags:
            return self.real.exchange(sends, recvs, tag, count)
        cs = [(p, t.to(self.wire) if t.dtype == torch.float32 else t) for p, t in sends]
        cr, widen = [], []
        for p, t in recvs:
            if t.dtype == torch.float32:
                buf = torch.empty(t.shape, dtype=self.wire, device=t.device)
                cr.append((p, buf))
                widen.append((t, buf))
            else:
                cr.append((p, t))
        return _CastPending(self.real.exchange(cs, cr, tag, count), widen, cs)

    def describe_peer(self, peer):
        return self.real.describe_peer(peer)

    def begin_call(self):
        self.real.begin_call()
