"""streamattn: topology-aware sequence-parallel attention for Diffusion Transformers.

    out = streamattn.attention(q, k, v, group)   # each rank: its [B, S_local, H, D] shard in, same out
"""
from . import lifecycle as _lifecycle
from .api import release
from .errors import PeerError, PeerTimeoutError, StreamAttnError
from .plan import Plan
from .planner import make_plan, plan_for
from .problem import Problem
from .reference import reference_attention
from .stale import StaleKV
from .dispatch import attention  # noqa: E402  eager, or the registered op (autograd, compile)
from .zigzag import zigzag_lengths, zigzag_shard, zigzag_unshard

_lifecycle.install()

__version__ = "0.1.0"
__all__ = ["attention", "release", "Plan", "Problem", "make_plan", "plan_for", "reference_attention", "StaleKV", "zigzag_shard",
           "zigzag_unshard", "zigzag_lengths", "PeerError",
           "PeerTimeoutError", "StreamAttnError", "__version__"]
