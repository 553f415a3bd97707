"""The description of one attention call, identical on every rank once metadata is gathered."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Problem:
    """Global shape of a sharded attention call.

    seq_lens[r]: tokens held by group rank r (its shard of the image sequence); they are laid out
    in rank order, so rank r's tokens start at global position offsets[r].
    joint_len: replicated text tokens (0 when none).
    zigzag: the tokens are in the zigzag layout instead (segments(r): where rank r's tokens are).
    wire_dtype: the dtype the call's q/k/v and output messages travel in (comm_dtype: a float32
    call on a bfloat16 wire, transport.cast); None: dtype. The joint (out, lse) partials stay exact.
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
    zigzag: bool = False  # the zigzag sequence layout (streamattn.zigzag); else rank order
    wire_dtype: Optional[torch.dtype] = None
    offsets: tuple = field(init=False)

    def __post_init__(self):
        offs, total = [], 0
        for n in self.seq_lens:
            offs.append(total)
            total += n
        object.__setattr__(self, "offsets", tuple(offs))

    def segments(self, rank: int) -> list:
        """[(global offset, length), ...]: the positions of rank's tokens, in shard order (one
        segment in rank order; two with zigzag)."""
        if self.zigzag:
            from .zigzag import zigzag_segments

            return zigzag_segments(self.seq_total, self.world_size, rank)
        return [(self.offsets[rank], self.seq_lens[rank])]

    @property
    def seq_total(self) -> int:
        return sum(self.seq_lens)

    @property
    def world_size(self) -> int:
        return len(self.seq_lens)
