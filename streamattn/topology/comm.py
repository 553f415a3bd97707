"""Small torch.distributed helpers with a timeout on every wait and no pickling.

Everything travels as int64 / float64 / uint8 tensors (never ``all_gather_object``). Tensors live on
the CPU for gloo and other CPU backends, on the current CUDA device for NCCL.
"""
from __future__ import annotations

import datetime
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import config

TIMEOUT_ENV = "STREAMATTN_PROBE_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0


def default_timeout() -> float:
    """Seconds for every wait: ``$STREAMATTN_PROBE_TIMEOUT``, else ``$STREAMATTN_TIMEOUT_S``, else 60."""
    return config.probe_timeout_s()


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized()


def world(group=None) -> int:
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_distributed(group) else 0


def backend(group=None) -> str:
    if not is_distributed(group):
        return "none"
    return str(dist.get_backend(group)).lower()


def device(group=None) -> torch.device:
    """Where tensors for ``group``'s collectives must live."""
    b = backend(group)
    if b == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def wait(work, timeout_s: float, what: str, dev: Optional[torch.device] = None) -> None:
    """Wait for an async op; raise RuntimeError naming ``what`` after ``timeout_s`` seconds.
    For CUDA tensors (NCCL) also synchronise the device so the data is really there."""
    try:
        ok = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        raise RuntimeError(f"streamattn.topology: {what} failed or timed out after {timeout_s:g} s: {e}") from e
    if ok is False:
        raise RuntimeError(f"streamattn.topology: {what} timed out after {timeout_s:g} s")
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def all_gather_int64(values: Sequence[int], group=None, timeout_s: Optional[float] = None) -> List[List[int]]:
    """Every rank's ``values`` (same length on every rank), indexed by group rank."""
    return _all_gather([int(v) for v in values], torch.int64, group, timeout_s)


def all_gather_float64(values: Sequence[float], group=None, timeout_s: Optional[float] = None) -> List[List[float]]:
    return _all_gather([float(v) for v in values], torch.float64, group, timeout_s)


def _all_gather(values: list, dtype, group, timeout_s):
    n = world(group)
    if n == 1:
        return [list(values)]
    t = timeout_s or default_timeout()
    dev = device(group)
    mine = torch.tensor(values, dtype=dtype, device=dev)
    out = [torch.empty_like(mine) for _ in range(n)]
    wait(dist.all_gather(out, mine, group=group, async_op=True), t, "all_gather", dev)
    return [o.cpu().tolist() for o in out]


def broadcast_float64(values: Optional[Sequence[float]], n: int, src: int, group=None,
                      timeout_s: Optional[float] = None) -> List[float]:
    """Group rank ``src``'s ``n`` floats on every rank (other ranks pass None)."""
    if world(group) == 1:
        return list(values or [])
    t = timeout_s or default_timeout()
    dev = device(group)
    buf = torch.zeros(n, dtype=torch.float64, device=dev)
    if rank(group) == src:
        buf.copy_(torch.tensor([float(v) for v in values], dtype=torch.float64))
    wait(dist.broadcast(buf, src=global_rank(group, src), group=group, async_op=True), t, "broadcast", dev)
    return buf.cpu().tolist()


def broadcast_bytes(data: Optional[bytes], src: int = 0, group=None,
                    timeout_s: Optional[float] = None) -> bytes:
    """Group rank ``src``'s bytes on every rank: length as int64, then the bytes as uint8."""
    if world(group) == 1:
        return bytes(data or b"")
    t = timeout_s or default_timeout()
    dev = device(group)
    me = rank(group)
    src_global = global_rank(group, src)
    n = torch.tensor([len(data) if (me == src and data) else 0], dtype=torch.int64, device=dev)
    wait(dist.broadcast(n, src=src_global, group=group, async_op=True), t, "broadcast(length)", dev)
    length = int(n.item())
    if length == 0:
        return b""
    if me == src:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(length, dtype=torch.uint8, device=dev)
    wait(dist.broadcast(buf, src=src_global, group=group, async_op=True), t, "broadcast(bytes)", dev)
    return bytes(buf.cpu().numpy().tobytes())


def all_gather_bytes(data: bytes, group=None, timeout_s: Optional[float] = None) -> List[bytes]:
    """Every rank's ``data`` (any length), indexed by group rank: lengths as int64, then the bytes
    padded to the longest as uint8."""
    n = world(group)
    if n == 1:
        return [bytes(data)]
    t = timeout_s or default_timeout()
    dev = device(group)
    lengths = [row[0] for row in all_gather_int64([len(data)], group=group, timeout_s=t)]
    width = max(max(lengths), 1)
    mine = torch.zeros(width, dtype=torch.uint8)
    if data:
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(dev)
    out = [torch.empty_like(mine) for _ in range(n)]
    wait(dist.all_gather(out, mine, group=group, async_op=True), t, "all_gather(bytes)", dev)
    return [bytes(o.cpu().numpy().tobytes()[:ln]) for o, ln in zip(out, lengths)]
