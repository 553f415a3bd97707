"""Tasks for tests/test_inorder.py: algorithms over the in-order (NCCL-semantics) transport, and
the order in which a Torus posts and awaits its exchanges."""
from __future__ import annotations

import time

from .cases import check_attention


def legacy_torus(rank, world_size, **kw):
    """Negative control: Torus with the pre-fix posting order (home receives in one receive-only
    exchange ahead of the sends peers wait for). Returns {"type", "error", "seconds"}; on the
    in-order transport it must end in PeerTimeoutError, never in a result."""
    from ..algorithms import torus

    torus.use_paired_outputs(False)
    t0 = time.monotonic()
    try:
        res = check_attention(rank, world_size, algorithm="torus", **kw)
        return {"type": None, "error": None, "seconds": time.monotonic() - t0, "err": res["err"]}
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"type": type(exc).__name__, "error": str(exc)[:600], "seconds": time.monotonic() - t0}
    finally:
        torus.use_paired_outputs(True)


class _Recording:
    """A transport that notes when each torus exchange (tags TORUS_QKV + k) is posted and when
    its wait returns, and otherwise is the transport it wraps."""

    def __init__(self, transport, events):
        self._t, self._events = transport, events

    def __getattr__(self, name):
        return getattr(self._t, name)

    def exchange_parts(self, sends, recvs, tag, count=True):
        from .. import tags

        pending = self._t.exchange_parts(sends, recvs, tag, count)
        step = tag - tags.TORUS_QKV
        if not 0 < step < tags.HALF:
            return pending
        self._events.append(("post", step))
        events = self._events

        class _Noted:
            def wait(self):
                pending.wait()
                events.append(("arrived", step))

        return _Noted()


def torus_post_order(rank, world_size, *, one_at_a_time=True, **kw):
    """check_attention with algorithm="torus", recording the torus exchanges' posts and arrivals
    in order on this rank. Returns {"err", "events": [[kind, step], ...]}."""
    from .. import algorithms
    from ..algorithms import torus

    events = []
    original = algorithms.torus_attention

    def recorded(transport, *args, **kwargs):
        return original(_Recording(transport, events), *args, **kwargs)

    torus.use_one_exchange_at_a_time(one_at_a_time)
    algorithms.torus_attention = recorded
    try:
        res = check_attention(rank, world_size, algorithm="torus", **kw)
    finally:
        algorithms.torus_attention = original
        torus.use_one_exchange_at_a_time(True)
    return {"err": res["err"], "events": [list(e) for e in events]}
