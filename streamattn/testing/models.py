"""Tiny randomly initialised diffusers transformers and a flow-matching Euler loop (no downloads).

Weights come from torch.manual_seed(seed), so every rank builds the same model.
"""
from __future__ import annotations

import time

import torch


def tiny_flux(seed=0, *, heads=4, head_dim=16, layers=2, single_layers=2, in_channels=16,
              text_dim=32, pooled_dim=32):
    from diffusers import FluxTransformer2DModel

    if head_dim % 8:
        raise ValueError("head_dim must be a multiple of 8 (three even rotary axes)")
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=False,
        axes_dims_rope=(head_dim // 2, head_dim // 4, head_dim // 4))
    return model.eval().float()


def flux_inputs(model, seed=1, *, height=16, width=16, text_len=32, batch=1):
    """(latents [B, H*W, C], kwargs for the transformer without hidden_states/timestep)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, height * width, cfg.in_channels, generator=g)
    text = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    kw = dict(encoder_hidden_states=text, pooled_projections=pooled,
              img_ids=img_ids.reshape(height * width, 3), txt_ids=torch.zeros(text_len, 3))
    return latents, kw


def tiny_sd3(seed=0, *, heads=4, head_dim=16, layers=2, in_channels=4, text_dim=32, pooled_dim=32,
             dual_attention_layers=(0,), sample_size=32):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=in_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim,
        out_channels=in_channels, pos_embed_max_size=sample_size,
        dual_attention_layers=tuple(dual_attention_layers), qk_norm="rms_norm")
    return model.eval().float()


def sd3_inputs(model, seed=1, *, height=16, width=16, text_len=24, batch=2):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, height, width, generator=g)
    text = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return latents, dict(encoder_hidden_states=text, pooled_projections=pooled)


@torch.no_grad()
def euler_loop(model, latents, kwargs, steps, *, on_step=None):
    """Flow matching: x_{t'} = x_t + (t' - t) * v(x_t, t), t from 1 to 0 in `steps` steps.
    on_step(i, x, v, seconds) after each step. Returns the final latents."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = latents
    for i in range(steps):
        t = sigmas[i].expand(x.shape[0])
        t0 = time.perf_counter()
        v = model(hidden_states=x, timestep=t, return_dict=False, **kwargs)[0]
        dt = time.perf_counter() - t0
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step(i, x, v, dt)
    return x


# A word-level tokenizer for the tiny pipelines (streamattn.examples.pipeline)
_WORDS = ("a photo of cat dog red blue green tree sky house on the in with under at night painting "
          "small big").split()


def tiny_tokenizer(max_length: int):
    """A word-level tokenizer built in memory: ids 0 <pad>, 1 </s>, 2 <unk>, then `_WORDS`; every
    sequence ends with </s> (what CLIP's pooled output and T5 expect of their EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length,
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def vocab_size() -> int:
    return 3 + len(dict.fromkeys(_WORDS))
