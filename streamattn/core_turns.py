"""Taking turns on shared cores: when a machine runs more computing ranks than it has cores, a
rank about to run an attention kernel first gives its core to a peer waiting for one.

Why: on shared cores a rank woken to move messages (post the next ring run, put its Ulysses parts,
answer the per-call signature) waits for a core until a computing rank's kernel ends or the
scheduler's next tick (4 ms at HZ=250), and everything behind that message waits with it: traced on
an emulated 2 x 2 cluster (4 ranks, 2 cores, 1 Gbit/s), a rank woken at 4.5 ms ran at 8.5 ms while
the other node's two ranks computed, and its node's first bytes left 6 ms into the call. Yielding
before each kernel (sched_yield: the kernel puts this rank behind the runnable peers, or returns at
once when there are none) lets those short turns run first; the kernels' total CPU is unchanged.
Measured side by side (flux 1024 + 256, USP 2x2, back-to-back calls): 39.1 -> 36.9 and 39.7 ->
37.6 ms per call; 2 x 4 at 200 Mbit/s, flux 512: 88.6 -> 85.3 and 88.2 -> 85.0 ms.

The one-sided transport turns this on for the process when it finds the ranks sharing this
machine's cores outnumber them (OneSidedTransport.oversubscribed) and STREAMATTN_CORE_TURNS=1
(the default); GPU kernels never yield (their launches do not hold a core).
"""
from __future__ import annotations

import os

_shared = False


def share(flag: bool) -> None:
    """Whether this process's CPU kernels yield first (set by the transport; sticky per process:
    once any group found the cores oversubscribed, they stay so for every group)."""
    global _shared
    _shared = _shared or bool(flag)


def shared() -> bool:
    return _shared


def before_kernel(device_type: str) -> None:
    """Call right before a CPU attention kernel (forward or backward)."""
    if _shared and device_type == "cpu":
        os.sched_yield()
