"""Transports: how ranks move tensors. Algorithms use only the Transport interface."""
from .base import ByteCounters, Pending, Transport
from .torch_dist import TorchTransport

__all__ = ["ByteCounters", "Pending", "Transport", "TorchTransport"]
