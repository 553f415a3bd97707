"""Keep the C heap's freed memory in the process between calls (CPU groups, glibc only).

Every call allocates its message, receive and output buffers afresh (hundreds of KiB to MiB each);
PyTorch's CPU allocator is malloc, without a cache of its own. glibc starts by serving allocations
of 128 KiB and more with mmap and giving the top of its heap back to the kernel once 128 KiB of it
is free, so each call faults its buffers in again and the kernel zeroes every page: 350-800 minor
faults per call and rank at flux 512 + 256 text tokens on 4-8 local ranks. glibc raises both
thresholds by itself when the process frees a large mapped buffer (to its size and twice that, at
most 32 and 64 MiB), so whether a process pays depends on what it freed before. apply() sets them
to where that adjustment ends, once per process at a CPU group's first call, so a call costs the
same whatever the process did before (docs/architecture.md, "Allocator"). Free memory kept at the
top of the heap is bounded by TRIM_THRESHOLD, as glibc's own adjustment would bound it.

STREAMATTN_CPU_MALLOC=system leaves the allocator alone. Process-wide: it also serves whatever
else the process allocates (the bench applies it before timing anything, peers included).
"""
from __future__ import annotations

import ctypes
import platform

from .config import get

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest accepted value (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # where glibc's own dynamic adjustment stops

_applied = None  # the state of this process: None (not yet asked), else what apply() returned


def apply() -> str:
    """Raise the thresholds once per process unless STREAMATTN_CPU_MALLOC=system. Returns what the
    process runs with: "retain" (applied now or earlier), "system" (the setting, not glibc, or
    mallopt refused; an invalid setting is not applied and asked again next time). Never raises:
    it runs before the call's signature, which is where a bad value fails on every rank."""
    global _applied
    if _applied is None:
        try:
            wanted = get("STREAMATTN_CPU_MALLOC")
        except ValueError:  # left alone; the call's signature reports it on every rank (agreement)
            return "system"
        _applied = _raise_thresholds() if wanted == "retain" else "system"
    return _applied


def _raise_thresholds() -> str:
    """mallopt both thresholds: "retain", or "system" where that cannot be done."""
    if platform.libc_ver()[0] != "glibc":
        return "system"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "system"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mmap threshold first: setting either one turns off glibc's dynamic adjustment of both
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "retain" if ok else "system"


def state() -> str:
    """What apply() decided for this process, "unset" before it was asked."""
    return "unset" if _applied is None else _applied
