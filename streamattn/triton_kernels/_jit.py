"""Lazy ``triton.jit``: kernels are decorated at first launch, not at import.

Triton decides between compiling for a GPU and the CPU interpreter when ``triton.jit`` runs (it reads
``TRITON_INTERPRET`` then). Importing this package before a test sets ``TRITON_INTERPRET=1`` would
otherwise freeze the wrong mode, so each kernel is wrapped here and jitted per mode on first use.
Triton itself is imported only inside these helpers: ``import streamattn.triton_kernels`` works
without triton installed; ``available()`` says whether launching can work.
"""
from __future__ import annotations

import os
import functools


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def available() -> bool:
    """True when the Triton kernels can be launched here.

    Triton must be importable and either a CUDA device is visible or ``TRITON_INTERPRET=1`` is set
    (then the kernels run on CPU tensors through Triton's interpreter: correct, but slow).
    """
    if not triton_importable():
        return False
    if interpreting():
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def enabled_for(tensor) -> bool:
    """The one rule for the merge and packing kernels: Triton on CUDA when it can launch there, or
    when STREAMATTN_TRITON=1 forces it (needs TRITON_INTERPRET=1 for CPU tensors); else torch.
    STREAMATTN_TRITON=0 turns Triton off everywhere."""
    from .. import config  # the settings registry (the core layer; no other package import)

    flag = config.triton()
    if flag == "0" or (flag != "1" and tensor.device.type != "cuda"):
        return False
    return available()


class LazyKernel:
    """``kernel[grid](...)`` like a ``triton.jit`` function, jitted at first use for the current mode."""

    def __init__(self, fn):
        self.fn = fn
        self._by_mode = {}
        functools.update_wrapper(self, fn)

    def jitted(self):
        mode = interpreting()
        k = self._by_mode.get(mode)
        if k is None:
            if not triton_importable():
                raise RuntimeError(
                    "streamattn.triton_kernels: triton is not installed (pip install triton); "
                    "use the torch references (*_reference) instead"
                )
            import triton

            k = triton.jit(self.fn)
            self._by_mode[mode] = k
        return k

    def __getitem__(self, grid):
        return self.jitted()[grid]


def lazy_jit(fn):
    return LazyKernel(fn)


def check_device(*tensors) -> None:
    """Raise a clear error instead of a Triton crash when the tensors cannot be used here."""
    if not triton_importable():
        raise RuntimeError("streamattn.triton_kernels: triton is not installed (pip install triton)")
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type == "cpu" and not interpreting():
        raise RuntimeError(
            "streamattn.triton_kernels: CPU tensors need TRITON_INTERPRET=1 (set before the first "
            "kernel launch); on CPU the library should use the torch references instead"
        )
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"streamattn.triton_kernels: unsupported device {dev}")
