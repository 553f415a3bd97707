"""Per-group state follows the group's life: torch.distributed.destroy_process_group(group) also
releases what streamattn holds for it (streamattn.api.release: transports closed, shm heaps
unmapped, plans dropped), so creating and destroying groups leaks no fds, mappings or memory.

The hook wraps torch.distributed.destroy_process_group once, when streamattn is imported (code that
bound the original function before that can call streamattn.release(group) itself).
"""
from __future__ import annotations

import functools

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from . import api


def install() -> None:
    real = c10d.destroy_process_group
    if getattr(real, "streamattn_hook", False):
        return

    @functools.wraps(real)
    def destroy_process_group(*args, **kwargs):
        group = args[0] if args else kwargs.get("group")
        try:
            if group is None:
                api.release_all()  # None destroys every group
            else:
                api.release(group)
        finally:
            return real(*args, **kwargs)

    destroy_process_group.streamattn_hook = True
    c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group
