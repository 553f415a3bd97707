"""RankPool tasks: DiffSynth-Studio's xDiT path (`use_usp`, Wan) running on streamattn through the
`streamattn.compat.xfuser` stand-in, on CPU gloo ranks, against the same model in one process.

What is done to DiffSynth inside these tasks, said as such:
  * stubbed (only for imports that come from diffsynth's own modules, so transformers still sees
    the real environment): torchvision, imageio, modelscope, pandas, peft, accelerate, ftfy. The
    Wan DiT / text-encoder / VAE path never calls them; they are imported by diffsynth's package
    __init__ for data loading, training, model download and LoRA;
  * patched, the two CPU-only blockers: `initialize_usp` knows only nccl/hccl backends (replaced by
    the same three calls with gloo), and `torch.cpu.empty_cache` does not exist (usp_attn_forward
    calls `getattr(torch, device_type).empty_cache()`; a no-op is set for the task's duration).
Everything else is DiffSynth's code unchanged: `usp_dit_forward` / `usp_attn_forward` (its
chunking, RoPE offsets, all_gather) call xfuser / yunchang APIs, which here are streamattn's.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

import torch

from .faults import break_ring_lse

STUBBED = ("torchvision", "imageio", "modelscope", "pandas", "peft", "accelerate", "ftfy")


class _Dummy:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        raise RuntimeError("streamattn test stub: this DiffSynth dependency is not installed")


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (_Dummy,), {})
        setattr(self, name, value)
        return value


def _imported_from_diffsynth() -> bool:
    f = sys._getframe(1)
    while f is not None:
        n = f.f_globals.get("__name__", "")
        if not (n.startswith(("importlib", "_frozen_importlib")) or n == __name__):
            return n.startswith("diffsynth")
        f = f.f_back
    return False


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED and _imported_from_diffsynth():
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    def exec_module(self, module):
        pass


def import_diffsynth():
    """Import DiffSynth's Wan modules with the stand-ins in place; returns the diffsynth package."""
    if "diffsynth.pipelines.wan_video" in sys.modules:
        return sys.modules["diffsynth"]
    from ..compat import xfuser as sx

    sx.install()
    # transformers decides once, at its first import of these, which optional packages exist: let
    # it see the real environment before the stubs answer diffsynth's imports.
    import transformers.image_utils  # noqa: F401
    from transformers import Wav2Vec2Processor  # noqa: F401

    sys.meta_path.insert(0, _StubFinder())
    import diffsynth
    import diffsynth.models.wan_video_dit  # noqa: F401
    import diffsynth.pipelines.wan_video  # noqa: F401
    import diffsynth.utils.xfuser  # noqa: F401

    return diffsynth


@contextlib.contextmanager
def cpu_blockers_patched():
    """DiffSynth's CPU-only blocker #2: torch.cpu.empty_cache does not exist."""
    had = hasattr(torch.cpu, "empty_cache")
    if not had:
        torch.cpu.empty_cache = lambda: None
    try:
        yield
    finally:
        if not had:
            del torch.cpu.empty_cache


def tiny_wan_model(seed=0, *, dim=48, heads=4, layers=2, in_dim=16, text_dim=32):
    """A randomly initialised Wan DiT (text-to-video, no image input), head dim 12, patch 1x2x2."""
    import_diffsynth()
    from diffsynth.models.wan_video_dit import WanModel

    torch.manual_seed(seed)
    return WanModel(dim=dim, in_dim=in_dim, ffn_dim=2 * dim, out_dim=in_dim, text_dim=text_dim,
                    freq_dim=32, eps=1e-6, patch_size=(1, 2, 2), num_heads=heads, num_layers=layers,
                    has_image_input=False).eval().float()


def _init_model_parallel(world_size, ulysses_degree, ring_degree):
    from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel

    init_distributed_environment()  # the pool's group is already up: a no-op, as with torchrun
    initialize_model_parallel(sequence_parallel_degree=world_size, ulysses_degree=ulysses_degree,
                              ring_degree=ring_degree)


def wan_model(rank, world_size, *, ulysses_degree, ring_degree=1, frames=2, height=8, width=8,
              text_len=12, seed=0, negative_control=False):
    """DiffSynth's Wan DiT step (`model_fn_wan_video`) with `use_unified_sequence_parallel=True`
    after `WanVideoPipeline.enable_usp()` (its attention becomes `usp_attn_forward`, i.e.
    xFuserLongContextAttention) on the group, vs the same step without USP on this rank.
    Returns max |difference|, max |reference| and whether they are bit-identical."""
    import_diffsynth()
    from diffsynth.pipelines.wan_video import WanVideoPipeline, model_fn_wan_video

    model = tiny_wan_model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 16, frames, height, width, generator=g)
    ctx = torch.randn(1, text_len, 32, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        ref = model_fn_wan_video(dit=model, latents=x, timestep=t, context=ctx)
    _init_model_parallel(world_size, ulysses_degree, ring_degree)
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = model
    pipe.enable_usp()  # DiffSynth's own switch: patches every block's self_attn.forward
    undo = break_ring_lse() if negative_control else (lambda: None)
    try:
        with torch.no_grad(), cpu_blockers_patched():
            out = model_fn_wan_video(dit=pipe.dit, latents=x, timestep=t, context=ctx,
                                     use_unified_sequence_parallel=True)
    finally:
        undo()
    return {"max_abs_diff": float((out - ref).abs().max()), "max_abs_ref": float(ref.abs().max()),
            "shape": list(out.shape), "bit_identical": bool(torch.equal(out, ref)),
            "sp_world_size": pipe.sp_size}


def xfuser_api(rank, world_size, *, ulysses_degree, ring_degree=1):
    """The stand-in's collective API on the group: ranks/sizes, sp_group.all_gather, the Ulysses
    sub-group's size, SeqAllToAll4D there and back (identity) and against an explicit layout."""
    from ..compat import xfuser as sx

    sx.install()
    from xfuser.core.distributed import (get_sequence_parallel_rank,
                                         get_sequence_parallel_world_size, get_sp_group)
    from yunchang.comm.all_to_all import SeqAllToAll4D

    _init_model_parallel(world_size, ulysses_degree, ring_degree)
    sp = get_sp_group()
    gathered = sp.all_gather(torch.full((1, 2), float(rank)), dim=1)
    u = ulysses_degree
    heads, s_local = 2 * u, 3
    # this rank's shard of a global [1, u * s_local, heads, 1] tensor whose value encodes (token, head)
    me = dist_rank_in(sp.ulysses_group)
    tok = torch.arange(me * s_local, (me + 1) * s_local).view(1, s_local, 1, 1).float()
    x = tok * 100 + torch.arange(heads).view(1, 1, heads, 1).float()
    y = SeqAllToAll4D.apply(sp.ulysses_group, x, 2, 1)  # -> all tokens, this rank's heads
    want = (torch.arange(u * s_local).view(1, -1, 1, 1).float() * 100
            + torch.arange(me * heads // u, (me + 1) * heads // u).view(1, 1, -1, 1).float())
    back = SeqAllToAll4D.apply(sp.ulysses_group, y, 1, 2)
    return {"sp_rank": get_sequence_parallel_rank(), "sp_size": get_sequence_parallel_world_size(),
            "gathered": gathered.flatten().tolist(), "ulysses_size": sp.ulysses_world_size,
            "a2a_ok": bool(torch.equal(y, want)), "roundtrip_ok": bool(torch.equal(back, x))}


def dist_rank_in(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if group is not None else dist.get_rank()


def tiny_wan_pipeline(seed=0):
    """DiffSynth's WanVideoPipeline from tiny random parts (nothing downloaded): the Wan DiT above,
    DiffSynth's own umT5 `WanTextEncoder` (2 layers, 32 wide), its `WanVideoVAE` with a tiny
    `VideoVAE_` (dim 8) and its `HuggingfaceTokenizer` wrapping the in-memory word-level tokenizer
    of streamattn.examples.pipeline (the real one loads umT5's files)."""
    import_diffsynth()
    from diffsynth.models.wan_video_text_encoder import HuggingfaceTokenizer, WanTextEncoder
    from diffsynth.models.wan_video_vae import VideoVAE_, WanVideoVAE
    from diffsynth.pipelines.wan_video import WanVideoPipeline

    from .models import tiny_tokenizer, vocab_size

    dit = tiny_wan_model(seed)
    torch.manual_seed(seed + 100)
    te = WanTextEncoder(vocab=vocab_size(), dim=32, dim_attn=32, dim_ffn=64, num_heads=4,
                        num_layers=2, num_buckets=8, dropout=0.0).eval()
    vae = WanVideoVAE(z_dim=16)
    vae.model = VideoVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 2, 2]).eval().requires_grad_(False)
    tok = HuggingfaceTokenizer.__new__(HuggingfaceTokenizer)  # its __init__ loads files by name
    tok.name, tok.seq_len, tok.clean, tok.tokenizer = "tiny-in-memory", 12, None, tiny_tokenizer(12)
    tok.vocab_size = tok.tokenizer.vocab_size
    pipe = WanVideoPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.text_encoder, pipe.vae, pipe.tokenizer = dit, te, vae, tok
    return pipe


def wan_pipeline(rank, world_size, *, ulysses_degree, ring_degree=1, steps=3, size=64, frames=5,
                 negative_control=False):
    """The whole WanVideoPipeline (prompt + negative prompt, CFG 5, `steps` steps, VAE decode):
    rank 0 alone, then all ranks after DiffSynth's `enable_usp()`. Returns (rank 0) the max
    |difference| of the decoded videos (floats in [-1, 1])."""
    import torch.distributed as dist

    pipe = tiny_wan_pipeline(0)
    kw = dict(prompt="a photo of a red cat", negative_prompt="blue sky at night", seed=0,
              height=size, width=size, num_frames=frames, num_inference_steps=steps, cfg_scale=5.0,
              tiled=False, output_type="floatpoint", progress_bar_cmd=lambda x: x)
    latents = []  # what the denoising loop hands the VAE, captured on the way
    decode = pipe.vae.decode

    def capture(hidden_states, *a, **k):
        latents.append(hidden_states.detach().clone())
        return decode(hidden_states, *a, **k)

    pipe.vae.decode = capture
    ref = None
    with torch.no_grad(), cpu_blockers_patched():
        if rank == 0:
            ref = pipe(**kw)
        dist.barrier()
        _init_model_parallel(world_size, ulysses_degree, ring_degree)  # initialize_usp, on gloo
        pipe.enable_usp()
        undo = break_ring_lse() if negative_control else (lambda: None)
        try:
            out = pipe(**kw)
        finally:
            undo()
    if rank != 0:
        return {}
    lat_ref, lat = latents[0], latents[-1]
    return {"max_abs_diff": float((out - ref).abs().max()), "max_abs_ref": float(ref.abs().max()),
            "latents_max_abs_diff": float((lat - lat_ref).abs().max()),
            "latents_max_abs_ref": float(lat_ref.abs().max()),
            "shape": list(out.shape), "bit_identical": bool(torch.equal(out, ref)),
            "latents_bit_identical": bool(torch.equal(lat, lat_ref)),
            "std": float(ref.std()), "sp_world_size": pipe.sp_size}
