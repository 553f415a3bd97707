"""The description of one attention call, identical on every rank once metadata is gathered."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Problem:
    """Global shape of a sharded attention call.

    seq_lens[r]: tokens held by group rank r (its shard of the image sequence); they are laid out
    in rank order, so rank r's tokens start at global position offsets[r].
    joint_len: replicated text tokens (0 when none).
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    seq_lens: tuple
    scale: float
    causal: bool = False
    joint_len: int = 0
    joint_strategy: str = "front"
    offsets: tuple = field(init=False)

    def __post_init__(self):
        offs, total = [], 0
        for n in self.seq_lens:
            offs.append(total)
            total += n
        object.__setattr__(self, "offsets", tuple(offs))

    @property
    def seq_total(self) -> int:
        return sum(self.seq_lens)

    @property
    def world_size(self) -> int:
        return len(self.seq_lens)
