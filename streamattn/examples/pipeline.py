"""A whole diffusers pipeline (Flux or SD3) from tiny random components, on 1 rank and on N ranks.

    python -m streamattn.examples.pipeline --nproc 4                  # local gloo ranks
    python -m streamattn.examples.pipeline --nproc 4 --model sd3
    torchrun --nproc-per-node 4 -m streamattn.examples.pipeline       # inside any torchrun group
    streamattn launch --emulate 2x2 -- -m streamattn.examples.pipeline   # emulated 2 nodes (root)

Every component is built from a config with random weights (`torch.manual_seed`), so nothing is
downloaded and every rank builds the same pipeline: a word-level tokenizer made in memory (the
`tokenizers` library, wrapped in transformers' `PreTrainedTokenizerFast`; it stands in for CLIP's BPE
and T5's SentencePiece tokenizers, which need vocabulary files), tiny CLIP and T5 text encoders from
transformers configs, a tiny `AutoencoderKL`, the tiny Flux / SD3 transformer and the usual
flow-matching Euler scheduler. Rank 0 runs `pipe(prompt, num_inference_steps=4)` alone; then every
rank runs it after `parallelize(pipe.transformer)` (image tokens sharded, text tokens joint). Rank 0
reports the max absolute pixel difference (images in [0, 1]; the bar is 1/255, one 8-bit level) and
writes both images as PNG.

The same run tries diffusers' own context parallelism (`transformer.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=N))`) as a baseline and reports whether it ran; on a CPU
box it cannot (diffusers 0.42: `ModelMixin._resolve_parallel_config` computes
`rank % torch.accelerator.device_count()`, a ZeroDivisionError without an accelerator).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ..testing.faults import break_ring_lse
from ..testing.models import tiny_tokenizer, vocab_size

PROMPT = "a photo of a red cat on the tree"


# ───────────────────────────────────────────────────────────────────────── tiny components


def _clip(width=32, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size(), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                         projection_dim=width, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(width=32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab_size(), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
                         sample_size=32, **kw).eval()


def tiny_flux_pipeline(seed: int = 0, *, heads: int = 4, head_dim: int = 16):
    """FluxPipeline: CLIP (pooled, 32) + T5 (32 wide), VAE 2x down with 4 latent channels (so the
    transformer sees 16 channels after 2x2 packing), Flux transformer 1 double + 1 single block."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(
        4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(), tokenizer=tiny_tokenizer(16), text_encoder_2=_t5(),
        tokenizer_2=tiny_tokenizer(16), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, *, heads: int = 4, head_dim: int = 16):
    """StableDiffusion3Pipeline: two CLIPs with projection (pooled 2 x 32) + T5 (32 wide), VAE 2x
    down with 4 latent channels, SD3 transformer (patch 2, 2 blocks, the first a dual-attention one)."""
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_clip(projection=True), tokenizer=tiny_tokenizer(16),
        text_encoder_2=_clip(projection=True), tokenizer_2=tiny_tokenizer(16),
        text_encoder_3=_t5(), tokenizer_3=tiny_tokenizer(16))
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}


def generate(pipe, model: str, *, prompt: str = PROMPT, steps: int = 4, size: int = 64, seed: int = 0):
    """One image, float32 [H, W, 3] in [0, 1] (numpy)."""
    import torch

    kw = dict(num_inference_steps=steps, height=size, width=size, max_sequence_length=16,
              generator=torch.Generator().manual_seed(seed), output_type="np")
    if model == "flux":
        kw["guidance_scale"] = 0.0  # no guidance embedding in the tiny transformer
    else:
        kw["guidance_scale"] = 4.0  # SD3: classifier-free guidance (batch of 2 through the transformer)
    with torch.no_grad():
        return pipe(prompt, **kw).images[0]


def save_png(image, path: str) -> str:
    """Write a [H, W, 3] float image in [0, 1] as an 8-bit PNG (atomically, mode 0600)."""
    import tempfile

    import numpy as np
    from PIL import Image

    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".streamattn-", suffix=".png", dir=os.path.dirname(path))
    os.close(fd)
    try:
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype("uint8")).save(tmp, format="PNG")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ──────────────────────────────────────────────────────────────────────── the comparison


def _diffusers_cp_baseline(pipe, model, world_size, image_1, kw):
    """Try diffusers' own ContextParallelConfig on this group; returns a dict (ran / why not)."""
    import torch.distributed as dist

    try:
        from diffusers import ContextParallelConfig
    except ImportError as e:
        return {"ran": False, "reason": f"diffusers has no ContextParallelConfig ({e})"}
    import torch

    err = None
    try:
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
    except Exception as e:  # noqa: BLE001 - reported, and the ranks agree below
        err = f"{type(e).__name__}: {e}"
        if isinstance(e, ZeroDivisionError) and not torch.cuda.is_available():
            err += (" (diffusers' ModelMixin._resolve_parallel_config takes the device as "
                    "rank % torch.accelerator.device_count(), and this box has no accelerator)")
    ok = torch.tensor([0 if err else 1])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        return {"ran": False, "reason": err or "enable_parallelism failed on another rank"}
    t0 = time.perf_counter()
    img = generate(pipe, model, **kw)
    return {"ran": True, "seconds": time.perf_counter() - t0,
            "max_abs_pixel_diff": float(abs(img - image_1).max())}


def compare(rank, world_size, *, model="flux", steps=4, size=64, prompt=PROMPT, seed=0,
            algorithm="auto", out=None, baseline=True, negative_control=False):
    """RankPool task / torchrun body. Every rank builds the pipeline; rank 0 makes the 1-rank image,
    then all ranks make the sequence-parallel one. Rank 0 returns the report (others: {}).

    negative_control=True runs the parallel image with Ring and a local kernel whose LSE is zero
    (a real CPU bug of a peer library): the comparison must then fail."""
    import torch.distributed as dist

    from ..integrations.diffusers import parallelize, unparallelize

    if model not in BUILDERS:
        raise ValueError(f"model must be one of {sorted(BUILDERS)}, not {model!r}")
    pipe = BUILDERS[model](seed)
    kw = dict(prompt=prompt, steps=steps, size=size, seed=seed + 1)
    image_1, t1 = None, None
    if rank == 0:
        t0 = time.perf_counter()
        image_1 = generate(pipe, model, **kw)
        t1 = time.perf_counter() - t0
    dist.barrier()
    parallelize(pipe.transformer, algorithm="ring" if negative_control else algorithm)
    undo = break_ring_lse() if negative_control else (lambda: None)
    try:
        t0 = time.perf_counter()
        image_n = generate(pipe, model, **kw)
        tn = time.perf_counter() - t0
    finally:
        undo()
        unparallelize(pipe.transformer)
    base = None
    if baseline and world_size > 1:
        ref = image_1 if rank == 0 else image_n
        base = _diffusers_cp_baseline(pipe, model, world_size, ref, kw)
    if rank != 0:
        return {}
    diff = abs(image_n - image_1)
    rep = {"model": model, "ranks": world_size, "size": size, "steps": steps, "prompt": prompt,
           "max_abs_pixel_diff": float(diff.max()),
           "pixels_differing_8bit": int(((image_n * 255).round() != (image_1 * 255).round()).sum()),
           "image_mean": float(image_n.mean()), "image_std": float(image_n.std()),
           "seconds_1_rank": t1, "seconds_n_ranks": tn, "algorithm": algorithm,
           "diffusers_context_parallel": base}
    if out:
        stem, ext = os.path.splitext(out)
        rep["png"] = save_png(image_n, out)
        rep["png_1_rank"] = save_png(image_1, f"{stem}-1rank{ext or '.png'}")
    return rep


def _report(rep, where: str) -> None:
    tol = 1 / 255
    print(f"tiny {rep['model']} pipeline, {rep['size']}x{rep['size']} px, {rep['steps']} steps, "
          f"prompt {rep['prompt']!r}; {rep['ranks']} ranks ({where}) vs 1 rank")
    print(f"  max |pixel difference|: {rep['max_abs_pixel_diff']:.3g} (bar 1/255 = {tol:.3g}): "
          f"{'OK' if rep['max_abs_pixel_diff'] <= tol else 'TOO LARGE'}; 8-bit pixels that differ: "
          f"{rep['pixels_differing_8bit']}")
    print(f"  image mean {rep['image_mean']:.3f}, std {rep['image_std']:.3f}; algorithm {rep['algorithm']}")
    print(f"  1 rank {rep['seconds_1_rank']:.2f} s, {rep['ranks']} ranks {rep['seconds_n_ranks']:.2f} s "
          "(CPU timings under load: not a performance figure)")
    b = rep.get("diffusers_context_parallel")
    if b is not None:
        if b["ran"]:
            print(f"  diffusers ContextParallelConfig baseline: ran, max |pixel difference| "
                  f"{b['max_abs_pixel_diff']:.3g}, {b['seconds']:.2f} s")
        else:
            print(f"  diffusers ContextParallelConfig baseline: cannot run here: {b['reason']}")
    if rep.get("png"):
        print(f"  wrote {rep['png']} ({rep['ranks']} ranks) and {rep['png_1_rank']} (1 rank)")


def _in_launched_group() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamattn.examples.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="local ranks when not inside torchrun (default 4)")
    ap.add_argument("--model", choices=sorted(BUILDERS), default="flux")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="image height = width in pixels (default 64)")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--out", default=None, help="PNG path (default ./<model>-<N>ranks.png; '' for none)")
    ap.add_argument("--no-baseline", action="store_true", help="skip diffusers' ContextParallelConfig")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)

    kw = dict(model=args.model, steps=args.steps, size=args.size, prompt=args.prompt,
              algorithm=args.algorithm, baseline=not args.no_baseline)
    if _in_launched_group():
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        world = dist.get_world_size()
        out = f"{args.model}-{world}ranks.png" if args.out is None else args.out
        try:
            rep = compare(dist.get_rank(), world, out=out or None, **kw)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        where = f"torchrun, {os.environ.get('LOCAL_WORLD_SIZE', world)} per node"
    else:
        from ..testing import RankPool

        out = f"{args.model}-{args.nproc}ranks.png" if args.out is None else args.out
        with RankPool(args.nproc, timeout=args.timeout) as pool:
            rep = pool.run("streamattn.examples.pipeline:compare", timeout=args.timeout,
                           out=os.path.abspath(out) if out else None, **kw)[0]
        where = "local gloo ranks"
    if not rep:
        return 0  # not rank 0
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        _report(rep, where)
    return 0 if rep["max_abs_pixel_diff"] <= 1 / 255 else 1


if __name__ == "__main__":
    sys.exit(main())
