"""Transports: how ranks move tensors. Algorithms use only the Transport interface.

    torch    two-sided torch.distributed point-to-point (gloo, NCCL): any peers
    shm      one-sided puts into POSIX shared memory for the ranks of one node (CPU), torch for the rest
    nvshmem  one-sided puts with NVSHMEM for the ranks of one node (GPU), torch for the rest
    inorder  torch with NCCL's ordering emulated on gloo (tests: catches NCCL deadlocks on CPU)
    nvshmem-device  the csrc/ device kernels on the current CUDA stream (no host polling), torch
             for the rest; shm-device: the same protocol code on CPU over shm (tests)
"""
from .. import config
from .base import ByteCounters, Pending, Transport
from .torch_dist import TorchTransport

NAMES = ("torch", "shm", "nvshmem", "inorder", "nvshmem-device", "shm-device")


def choose_transport(base, problem) -> str:
    """STREAMATTN_TRANSPORT (torch | shm | nvshmem | auto, default auto). auto: shm for CPU groups
    where some node holds more than one rank of the group, else torch."""
    want = config.transport()
    if want != "auto":
        return want
    # A global condition, so every rank of the group makes the same choice.
    if base.device.type == "cpu" and max(base.node_of.count(n) for n in set(base.node_of)) > 1:
        from .shm import supported

        if supported()[0]:
            return "shm"
    return "torch"


def make_transport(name, base):
    """Build transport `name` over the group of `base` (collective over the node's ranks)."""
    if name == "torch":
        return base
    if name == "shm":
        from .onesided import OneSidedTransport
        from .shm import ShmHeap

        return OneSidedTransport(base, ShmHeap)
    if name == "nvshmem":
        from .nvshmem import NvshmemHeap
        from .onesided import OneSidedTransport

        return OneSidedTransport(base, NvshmemHeap)
    if name in ("nvshmem-device", "shm-device"):
        from .device import HostOps, NvshmemDeviceOps, StreamOrderedTransport

        if name == "shm-device":
            from .shm import ShmHeap

            return StreamOrderedTransport(base, ShmHeap, HostOps)
        from .nvshmem import NvshmemHeap

        return StreamOrderedTransport(base, NvshmemHeap, NvshmemDeviceOps)
    if name == "inorder":
        from .inorder import InOrderTransport

        return InOrderTransport(base)
    raise ValueError(f"unknown transport {name!r}")


__all__ = ["ByteCounters", "Pending", "Transport", "TorchTransport", "choose_transport",
           "make_transport", "NAMES"]
