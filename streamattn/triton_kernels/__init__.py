"""Triton kernels: attention forward with LSE, LSE merge, all-to-all pack/unpack.

Importing this package never needs triton; ``available()`` says whether the kernels can launch
(triton importable and a CUDA device, or ``TRITON_INTERPRET=1`` for CPU tensors). Every kernel has a
torch reference with the same signature (``*_reference``) for CPU use and tests.
Kernels are jitted lazily at first launch, so ``TRITON_INTERPRET`` may be set after import, but it
must be set before the first launch in the process.
"""
from ._jit import available, enabled_for, interpreting
from .attention import attention_fwd, attention_reference, block_sizes
from .merge import merge_, merge_init, merge_reference
from .pack import (
    pack_heads,
    pack_heads_reference,
    pack_seq,
    pack_seq_reference,
    unpack_heads,
    unpack_heads_reference,
    unpack_seq,
    unpack_seq_reference,
)

__all__ = [
    "available", "enabled_for", "interpreting",
    "attention_fwd", "attention_reference", "block_sizes",
    "merge_", "merge_init", "merge_reference",
    "pack_heads", "pack_heads_reference", "unpack_seq", "unpack_seq_reference",
    "pack_seq", "pack_seq_reference", "unpack_heads", "unpack_heads_reference",
]
