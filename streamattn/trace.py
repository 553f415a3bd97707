"""Where the time of one call goes: a tiny per-process span recorder.

Transports and algorithms mark span boundaries with one-line hooks::

    with trace.span("pack"):                     # local packing / copies / transposes
        ...
    trace.add("wait", t0, t1, peer=3, inter=True)  # explicit span (waits measured by the caller)
    trace.event("post", peer=3, nbytes=n, inter=True)  # an instant: a message posted

When no recorder is active (the default) every hook is a global lookup and a return: `span`
returns one shared no-op context manager, `add`/`event` return at once (measured overhead: see
`hook_cost_s`; the bench reports it per call). `recording()` activates a `Recorder` for the calls
made inside it; `streamattn.bench` turns it on for a few extra calls per configuration, never for
the timed ones.

Span kinds (a span of one kind never contains another span, so kinds add up per rank):
  kernel   local attention kernel (kernels.attention_with_lse)
  merge    LSE merges (merge.update_out_and_lse / merge_all)
  pack     packing, concatenation, transposes, casts around messages
  post     posting messages (torch: handing them to gloo; shm: the puts, i.e. memcpy into the peer)
  copy     one-sided copy-out of arrived chunks inside a wait (shm)
  wait     blocked on a peer (`peer`, `inter` say which one, and whether it is on another node)
Everything else of a call is "other" (Python, allocation, the output layout): the rank's total
minus the sum of its spans.
Times are `time.perf_counter()` seconds; the recorder stores them relative to its start.
"""
from __future__ import annotations

import contextlib
import time
from typing import List, Optional

from .tags import AGREEMENT

KINDS = ("kernel", "merge", "pack", "post", "copy", "agree", "wait")


def wait_kind(tag: int) -> str:
    """The span kind of a wait on a message with `tag`: "agree" for the exchanges that agree on
    what a call does (tags.AGREEMENT), "wait" for the call's data (whichever transport carries it)."""
    return "agree" if tag in AGREEMENT else "wait"

_rec: "Optional[Recorder]" = None
now = time.perf_counter


class _Null:
    __slots__ = ()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL = _Null()


class _Span:
    __slots__ = ("rec", "kind", "peer", "inter", "nbytes", "t0")

    def __init__(self, rec, kind, peer, inter, nbytes):
        self.rec, self.kind, self.peer, self.inter, self.nbytes = rec, kind, peer, inter, nbytes

    def __enter__(self):
        self.t0 = now()
        return self

    def __exit__(self, *exc):
        self.rec.add(self.kind, self.t0, now(), self.peer, self.inter, self.nbytes)
        return False


class Recorder:
    """Spans [kind, t0, t1, peer, inter, nbytes] and events [kind, t, peer, inter, nbytes] of the
    calls made while it is active (times relative to `start`)."""

    def __init__(self):
        self.start = now()
        self.spans: List[list] = []
        self.events: List[list] = []
        self.hooks = 0  # hook calls recorded (the disabled cost of a call is about hooks x hook_cost_s)

    def add(self, kind, t0, t1, peer=None, inter=None, nbytes=0):
        s = self.spans
        t0, t1 = t0 - self.start, t1 - self.start
        # contiguous spans of the same kind and peer (a spinning wait) fold into one
        if s and s[-1][0] == kind and s[-1][3] == peer and t0 - s[-1][2] < 2e-5:
            s[-1][2] = t1
            s[-1][5] += nbytes
            return
        self.hooks += 1
        s.append([kind, t0, t1, peer, inter, nbytes])

    def event(self, kind, t, peer=None, inter=None, nbytes=0):
        self.hooks += 1
        self.events.append([kind, t - self.start, peer, inter, nbytes])

    def as_dict(self) -> dict:
        return {"spans": self.spans, "events": self.events}


def enabled() -> bool:
    return _rec is not None


def span(kind: str, peer=None, inter=None, nbytes: int = 0):
    """Context manager timing a span of `kind` (a no-op unless a recorder is active)."""
    rec = _rec
    if rec is None:
        return _NULL
    return _Span(rec, kind, peer, inter, nbytes)


def add(kind: str, t0: float, t1: float, peer=None, inter=None, nbytes: int = 0) -> None:
    rec = _rec
    if rec is not None:
        rec.add(kind, t0, t1, peer, inter, nbytes)


def event(kind: str, peer=None, inter=None, nbytes: int = 0) -> None:
    rec = _rec
    if rec is not None:
        rec.event(kind, now(), peer, inter, nbytes)


@contextlib.contextmanager
def recording():
    """Activate a fresh Recorder for this process while inside; yields it."""
    global _rec
    prev, rec = _rec, Recorder()
    _rec = rec
    try:
        yield rec
    finally:
        _rec = prev


def summarize(spans: List[list], total_s: float) -> dict:
    """Seconds per kind for one rank's call, waits split by peer and link class:
    {"kernel", "merge", "pack", "post", "copy", "wait_intra", "wait_inter", "other", "total",
     "wait_by_peer": {peer: seconds}}; "other" = total minus every span."""
    out = {k: 0.0 for k in KINDS if k != "wait"}
    out.update(wait_intra=0.0, wait_inter=0.0)
    by_peer: dict = {}
    for kind, t0, t1, peer, inter, _ in spans:
        d = max(0.0, t1 - t0)
        if kind == "wait":
            out["wait_inter" if inter else "wait_intra"] += d
            if peer is not None:
                by_peer[str(peer)] = by_peer.get(str(peer), 0.0) + d
        else:
            out[kind] = out.get(kind, 0.0) + d
    out["other"] = max(0.0, total_s - sum(out.values()))
    out["total"] = total_s
    out["wait_by_peer"] = by_peer
    return out


def hook_cost_s(n: int = 200000) -> float:
    """Seconds one disabled hook costs (a `with span(...)` block), measured here."""
    if _rec is not None:
        raise RuntimeError("hook_cost_s measures the disabled hooks; a recorder is active")
    t0 = now()
    for _ in range(n):
        with span("pack"):
            pass
    return (now() - t0) / n
