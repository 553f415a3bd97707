"""Benchmark presets: Diffusion-Transformer attention shapes scaled down to finish on a 2-core CPU.

Every preset keeps the model's head count (what decides which Ulysses degrees are valid) and scales
the token counts and the head dimension; the scaling is stated in `scaling`. Sequence lengths are
image/video tokens (the sharded sequence); `joint_len` text tokens are replicated on every rank
(MMDiT joint attention). Lengths are multiples of 8 so every configuration on 4 or 8 ranks,
including yunchang's (which needs equal shards of image + text tokens), is valid.

Expected wall time for a whole preset (all algorithms, yunchang, overlap runs) on the 2-core
development machine: about one to two minutes on a 2x2 emulated cluster at 200mbit.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    full: str  # the real shape
    scaling: str
    seqs: List[int] = field(default_factory=list)
    heads: int = 24
    head_dim: int = 32
    joint_len: int = 0
    batch: int = 1

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    p.name: p
    for p in [
        Preset("flux-1024-cpu", "FLUX.1 at 1024x1024",
               "4096 image + 512 text tokens, 24 heads x 128",
               "tokens / 2, head dim / 4 (image sweep 512..2048 = the full image at 1/2)",
               seqs=[512, 1024, 2048], heads=24, head_dim=32, joint_len=256),
        Preset("flux-2048-cpu", "FLUX.1 at 2048x2048",
               "16384 image + 512 text tokens, 24 heads x 128",
               "tokens / 4, head dim / 4 (image sweep 2048, 4096 = the full image at 1/4)",
               seqs=[2048, 4096], heads=24, head_dim=32, joint_len=128),
        Preset("sd3-cpu", "Stable Diffusion 3 (medium) at 1024x1024",
               "4096 image + 333 text tokens (77 CLIP + 256 T5), 24 heads x 64",
               "tokens / 2 (text 333/2 rounded to 168), head dim / 2",
               seqs=[1024, 2048], heads=24, head_dim=32, joint_len=168),
        Preset("hunyuan-720p-cpu", "HunyuanVideo 720p, 129 frames",
               "118800 video tokens (33x45x80 latents, 2x2 patches) + 256 text, 24 heads x 128",
               "tokens / 32 (video 3712, text 8), head dim / 4 (sweep 1856, 3712)",
               seqs=[1856, 3712], heads=24, head_dim=32, joint_len=8),
    ]
}
