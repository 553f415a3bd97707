"""Tasks for tests/test_inorder.py: algorithms over the in-order (NCCL-semantics) transport."""
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
