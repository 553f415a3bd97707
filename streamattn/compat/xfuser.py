"""xDiT (`xfuser`) stand-in on streamattn, for engines that import xfuser / yunchang (DiffSynth-Studio's
`use_usp`, other Wan / Hunyuan ports): one call puts it in place of the real packages.

    import streamattn.compat.xfuser as sx
    sx.install()                  # registers xfuser, xfuser.core, xfuser.core.distributed,
                                  # xfuser.core.long_ctx_attention, yunchang, yunchang.kernels,
                                  # yunchang.comm, yunchang.comm.all_to_all in sys.modules
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
    init_distributed_environment(rank=r, world_size=n)          # gloo on CPU, nccl on CUDA
    initialize_model_parallel(sequence_parallel_degree=n, ring_degree=2, ulysses_degree=n // 2)
    # ... the engine's own xfuser-based code runs unchanged on streamattn.attention

What it provides (the subset those engines use):
  * `xfuser.core.distributed`: `init_distributed_environment(rank, world_size, local_rank,
    distributed_init_method, backend)`, `initialize_model_parallel(data_parallel_degree,
    classifier_free_guidance_degree, sequence_parallel_degree, ulysses_degree, ring_degree, ...)`,
    `get_sequence_parallel_rank/_world_size`, `get_sp_group()`, `get_world_group()`,
    `get_data_parallel_rank/_world_size`, `model_parallel_is_initialized`, `destroy_model_parallel`;
  * `xfuser.core.long_ctx_attention.xFuserLongContextAttention(attn_type=, ring_impl_type=)`, called
    as `(attn, query=, key=, value=, joint_tensor_query=..., joint_strategy=...)`: every call is
    `streamattn.attention` on the sequence-parallel group with the degrees given above
    (`streamattn.compat.yunchang`, whose docstring lists the attention-level differences);
  * `yunchang.kernels.AttnType` (the enum; the value is accepted and ignored: streamattn picks its
    kernel) and `yunchang.comm.all_to_all.SeqAllToAll4D` (autograd all-to-all of [B, S, H, D]
    tensors, scatter one dim and gather another, as yunchang's);
  * `yunchang.LongContextAttention`, `yunchang.UlyssesAttention`, `yunchang.set_seq_parallel_pg`.

Differences from xDiT (xfuser 0.4):
  * only sequence parallelism: data-parallel replicas are allowed (world = dp x sp, consecutive
    ranks per replica), classifier-free-guidance / tensor / pipeline / VAE parallel degrees > 1
    raise NotImplementedError instead of being half-applied;
  * `get_sp_group()` returns a small coordinator (`SequenceParallelGroup`) with `all_gather(x, dim)`,
    `all_reduce`, `broadcast`, `barrier`, `rank_in_group`, `world_size`, `ranks`, `device_group`,
    `ulysses_group`, `ring_group`; xDiT's GroupCoordinator has many more methods (send/recv,
    pipeline helpers). Note that `streamattn.compat.yunchang.get_sp_group()` is different: it returns
    the ProcessGroup (or None for the default group), as that module's own API;
  * `initialize_model_parallel` without `sequence_parallel_degree` takes ulysses x ring; with it,
    it must equal ulysses x ring (xDiT's rule too);
  * shards may have any length on every rank (xDiT pads); `use_kv_cache` (PipeFusion) raises;
  * xDiT itself cannot even be imported without an accelerator (its `envs.py` raises on a CPU-only
    box), which is why this stand-in exists for CPU tests; on a GPU box the real xfuser can be
    compared against it.
`install()` leaves an importable real package alone unless `force=True`; `uninstall()` removes what
`install()` registered.
"""
from __future__ import annotations

import datetime
import enum
import importlib.util
import os
import sys
import types
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from . import yunchang as _yc

__all__ = ["AttnType", "SeqAllToAll4D", "SequenceParallelGroup", "destroy_model_parallel",
           "get_sequence_parallel_rank", "get_sequence_parallel_world_size", "get_sp_group",
           "init_distributed_environment", "initialize_model_parallel", "install", "uninstall",
           "xFuserLongContextAttention"]

xFuserLongContextAttention = _yc.xFuserLongContextAttention  # noqa: N816 - xDiT's name


class AttnType(enum.Enum):
    """yunchang.kernels.AttnType (accepted and ignored: streamattn selects the local kernel)."""

    AITER = "aiter"
    FA = "fa"
    FA3 = "fa3"
    FLASHINFER = "flashinfer"
    TORCH = "torch"
    SAGE_AUTO = "sage_auto"
    SAGE_FP16 = "sage_fp16"
    SAGE_FP16_TRITON = "sage_fp16_triton"
    SAGE_FP8 = "sage_fp8"
    SAGE_FP8_SM90 = "sage_fp8_sm90"
    SPARSE_SAGE = "sparse_sage"
    NPU = "npu"

    @classmethod
    def from_string(cls, s: str) -> "AttnType":
        for member in cls:
            if member.value == s:
                return member
        raise ValueError(f"unknown AttnType {s!r}; one of {[m.value for m in cls]}")


def _all_to_all_4d(group, x: torch.Tensor, scatter_idx: int, gather_idx: int) -> torch.Tensor:
    """Split x into P chunks along scatter_idx, send chunk i to group rank i, concatenate what
    arrives along gather_idx in rank order. [B, S/P, H, D] (2, 1) -> [B, S, H/P, D] and back."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    if x.shape[scatter_idx] % p:
        raise ValueError(f"SeqAllToAll4D: dim {scatter_idx} of size {x.shape[scatter_idx]} is not "
                         f"divisible by the group size {p}")
    send = torch.stack([c.contiguous() for c in x.chunk(p, dim=scatter_idx)])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_idx).contiguous()


class SeqAllToAll4D(torch.autograd.Function):
    """yunchang.comm.all_to_all.SeqAllToAll4D: apply(group, input, scatter_idx, gather_idx,
    use_sync=False); the backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, group, input, scatter_idx, gather_idx, use_sync=False):  # noqa: A002
        ctx.group, ctx.scatter_idx, ctx.gather_idx = group, scatter_idx, gather_idx
        return _all_to_all_4d(group, input, scatter_idx, gather_idx)

    @staticmethod
    def backward(ctx, grad):
        return (None, _all_to_all_4d(ctx.group, grad, ctx.gather_idx, ctx.scatter_idx), None, None,
                None)


class SequenceParallelGroup:
    """What xfuser's get_sp_group() returns, reduced to what DiT engines call."""

    def __init__(self, device_group, ranks: List[int], ulysses_group, ring_group,
                 ulysses_degree: int, ring_degree: int):
        self.device_group = device_group  # None = the default (world) group
        self.ranks = list(ranks)
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.rank_in_group = self.ranks.index(self.rank)
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.ulysses_world_size, self.ring_world_size = ulysses_degree, ring_degree

    def all_gather(self, input_: torch.Tensor, dim: int = -1, separate_tensors: bool = False):
        """Every rank's tensor, concatenated along dim in rank order (or the list, separate)."""
        if self.world_size == 1:
            return [input_] if separate_tensors else input_
        parts = [torch.empty_like(input_) for _ in range(self.world_size)]
        dist.all_gather(parts, input_.contiguous(), group=self.device_group)
        return parts if separate_tensors else torch.cat(parts, dim=dim)

    def all_reduce(self, input_: torch.Tensor, op=None):
        if self.world_size > 1:
            dist.all_reduce(input_, op=op or dist.ReduceOp.SUM, group=self.device_group)
        return input_

    def broadcast(self, input_: torch.Tensor, src: int = 0):
        if self.world_size > 1:
            dist.broadcast(input_, src=self.ranks[src], group=self.device_group)
        return input_

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(group=self.device_group)


_STATE: Dict[str, object] = {"sp": None, "dp_rank": 0, "dp_size": 1}


def init_distributed_environment(world_size: int = -1, rank: int = -1,
                                 distributed_init_method: str = "env://", local_rank: int = -1,
                                 backend: Optional[str] = None, **_ignored) -> None:
    """Initialise torch.distributed (gloo on CPU, nccl with CUDA) unless it already is."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kw = {}
    if world_size is not None and world_size >= 0:
        kw["world_size"] = world_size
    if rank is not None and rank >= 0:
        kw["rank"] = rank
    timeout = datetime.timedelta(seconds=float(os.environ.get("STREAMATTN_TIMEOUT_S", "300") or 300))
    dist.init_process_group(backend, init_method=distributed_init_method, timeout=timeout, **kw)


def _groups_of(blocks: List[List[int]]):
    """new_group for every block (collective: every rank creates every group); this rank's."""
    me, mine = dist.get_rank(), None
    for ranks in blocks:
        g = dist.new_group(ranks)
        if me in ranks:
            mine = g
    return mine


def initialize_model_parallel(data_parallel_degree: int = 1, classifier_free_guidance_degree: int = 1,
                              sequence_parallel_degree: Optional[int] = None, ulysses_degree: int = 1,
                              ring_degree: int = 1, tensor_parallel_degree: int = 1,
                              pipeline_parallel_degree: int = 1, vae_parallel_size: int = 0,
                              backend: Optional[str] = None, **_ignored) -> None:
    """Sequence parallelism of ulysses_degree x ring_degree ranks (consecutive ranks; Ulysses
    groups of consecutive ranks inside it, as yunchang's use_ulysses_low), data-parallel replicas
    for the rest of the world. Collective."""
    if not dist.is_initialized():
        raise RuntimeError("call init_distributed_environment() first")
    for name, v in (("classifier_free_guidance_degree", classifier_free_guidance_degree),
                    ("tensor_parallel_degree", tensor_parallel_degree),
                    ("pipeline_parallel_degree", pipeline_parallel_degree)):
        if int(v) != 1:
            raise NotImplementedError(f"streamattn.compat.xfuser: {name}={v} is not supported "
                                      "(sequence and data parallelism only)")
    if vae_parallel_size:
        raise NotImplementedError("streamattn.compat.xfuser: vae_parallel_size is not supported")
    u, r = int(ulysses_degree), int(ring_degree)
    sp = u * r if sequence_parallel_degree is None else int(sequence_parallel_degree)
    if sp != u * r:
        raise ValueError(f"sequence_parallel_degree {sp} != ulysses_degree {u} x ring_degree {r}")
    world = dist.get_world_size()
    if world % sp or (data_parallel_degree not in (None, 1) and data_parallel_degree * sp != world):
        raise ValueError(f"world size {world} != data_parallel_degree {data_parallel_degree} x "
                         f"sequence_parallel_degree {sp}")
    me = dist.get_rank()
    _yc.set_seq_parallel_pg(u, r, me, world)
    sp_group = _yc.get_sp_group()  # None when sp == world
    base = me // sp * sp
    ranks = list(range(base, base + sp))
    # Ulysses sub-groups (consecutive u ranks) and ring sub-groups (stride u) of every replica.
    uly_blocks = [list(range(b + i * u, b + (i + 1) * u)) for b in range(0, world, sp) for i in range(r)]
    ring_blocks = [list(range(b + j, b + sp, u)) for b in range(0, world, sp) for j in range(u)]
    uly = sp_group if u == sp else _groups_of(uly_blocks)
    ring = sp_group if r == sp else _groups_of(ring_blocks)
    _STATE.update(sp=SequenceParallelGroup(sp_group, ranks, uly, ring, u, r), dp_rank=me // sp,
                  dp_size=world // sp)


def model_parallel_is_initialized() -> bool:
    return _STATE["sp"] is not None


def _sp() -> SequenceParallelGroup:
    if _STATE["sp"] is None:
        raise RuntimeError("call initialize_model_parallel() first (xfuser.core.distributed)")
    return _STATE["sp"]


def get_sp_group() -> SequenceParallelGroup:
    return _sp()


def get_sequence_parallel_world_size() -> int:
    return _sp().world_size


def get_sequence_parallel_rank() -> int:
    return _sp().rank_in_group


def get_data_parallel_world_size() -> int:
    return int(_STATE["dp_size"])


def get_data_parallel_rank() -> int:
    return int(_STATE["dp_rank"])


def get_world_group() -> SequenceParallelGroup:
    n = dist.get_world_size()
    return SequenceParallelGroup(None, list(range(n)), None, None, n, 1)


def destroy_model_parallel() -> None:
    _STATE.update(sp=None, dp_rank=0, dp_size=1)


# ───────────────────────────────────────────────────────────────────────── install


_INSTALLED: List[str] = []


def _module(name: str, doc: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name, doc)
    m.__dict__.update(attrs)
    m.__streamattn_standin__ = True
    return m


def _real_importable(top: str) -> bool:
    if top in sys.modules:
        return not getattr(sys.modules[top], "__streamattn_standin__", False)
    return importlib.util.find_spec(top) is not None


def install(force: bool = False) -> List[str]:
    """Register the stand-in modules in sys.modules; returns their names. A real, importable
    `xfuser` / `yunchang` is left alone (force=True replaces it)."""
    dist_mod = _module(
        "xfuser.core.distributed", "streamattn stand-in for xfuser.core.distributed",
        init_distributed_environment=init_distributed_environment,
        initialize_model_parallel=initialize_model_parallel,
        model_parallel_is_initialized=model_parallel_is_initialized,
        get_sp_group=get_sp_group, get_world_group=get_world_group,
        get_sequence_parallel_rank=get_sequence_parallel_rank,
        get_sequence_parallel_world_size=get_sequence_parallel_world_size,
        get_data_parallel_rank=get_data_parallel_rank,
        get_data_parallel_world_size=get_data_parallel_world_size,
        destroy_model_parallel=destroy_model_parallel)
    lca = _module("xfuser.core.long_ctx_attention", "streamattn stand-in",
                  xFuserLongContextAttention=xFuserLongContextAttention)
    core = _module("xfuser.core", "streamattn stand-in", distributed=dist_mod, long_ctx_attention=lca)
    xf = _module("xfuser", "streamattn stand-in for xDiT (streamattn.compat.xfuser)", core=core)
    a2a = _module("yunchang.comm.all_to_all", "streamattn stand-in", SeqAllToAll4D=SeqAllToAll4D)
    comm = _module("yunchang.comm", "streamattn stand-in", all_to_all=a2a)
    kernels = _module("yunchang.kernels", "streamattn stand-in", AttnType=AttnType)
    yc = _module("yunchang", "streamattn stand-in for yunchang (streamattn.compat.yunchang)",
                 comm=comm, kernels=kernels, LongContextAttention=_yc.LongContextAttention,
                 UlyssesAttention=_yc.UlyssesAttention, set_seq_parallel_pg=_yc.set_seq_parallel_pg)
    mods = {"xfuser": [xf, core, dist_mod, lca], "yunchang": [yc, comm, kernels, a2a]}
    done = []
    for top, ms in mods.items():
        if not force and _real_importable(top):
            continue
        for m in ms:
            for p in ("__path__",):
                setattr(m, p, [])  # a package, so `import a.b` works
            sys.modules[m.__name__] = m
            done.append(m.__name__)
    _INSTALLED.extend(n for n in done if n not in _INSTALLED)
    return done


def uninstall() -> None:
    """Remove the modules install() registered."""
    for name in _INSTALLED:
        m = sys.modules.get(name)
        if m is not None and getattr(m, "__streamattn_standin__", False):
            del sys.modules[name]
    _INSTALLED.clear()
