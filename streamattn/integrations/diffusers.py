"""Sequence-parallel diffusers transformers on streamattn: `parallelize(transformer, group)`.

Every rank of `group` holds the same transformer (same weights) and calls it with the same full
inputs, as a diffusers pipeline does. After `parallelize`:

  * the image tokens are split along the sequence, in rank order (uneven splits are fine: 4097
    tokens on 4 ranks run as 1025/1024/1024/1024), right where they become tokens: Flux's
    `hidden_states` / `img_ids` at the transformer's input (so every rank computes the rotary
    embedding of exactly its own image positions), SD3's patch embedding output;
  * the text tokens (`encoder_hidden_states`) stay replicated: every rank runs the text stream,
    and attention treats them as joint tokens (`streamattn.attention(..., joint_q/k/v)`: Flux puts
    them in front of the image tokens, SD3 behind);
  * every attention layer runs `streamattn.attention` over the group (or the stale-K/V variant,
    `stale_kv=True`, see streamattn.stale);
  * the output of `proj_out` is gathered along the sequence, so the transformer returns the full,
    identical output on every rank and the pipeline (scheduler, VAE) goes on unchanged.

Everything between attention layers acts per token (norms, MLPs, AdaLN with the global `temb`),
so the sharded run computes the same function as the single-rank one.

Supported: `FluxTransformer2DModel` (double- and single-stream blocks, RoPE) and
`SD3Transformer2DModel` (SD3 and SD3.5: joint blocks, `context_pre_only`, dual-attention blocks'
image-only `attn2`). Not supported: attention masks, IP-adapters, fused QKV projections.

diffusers is optional: `pip install "streamattn[diffusers]"`.
"""
from __future__ import annotations

import inspect

import torch

import streamattn
from .. import tags
from ..sharding import split_lengths

TAG_GATHER = tags.DIFFUSERS_GATHER
TAG_GRAD = tags.DIFFUSERS_GRAD           # training: the joint-output gradient sum, the parameter-gradient sum

__all__ = ["parallelize", "unparallelize", "reset_stale_kv", "all_reduce_gradients",
           "FluxStreamAttnProcessor", "SD3StreamAttnProcessor", "split_lengths"]


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without diffusers
        raise ImportError(
            "streamattn.integrations.diffusers needs diffusers: pip install \"streamattn[diffusers]\" "
            f"(or pip install diffusers) [{exc}]") from exc
    return diffusers


class _Context:
    """Shared by the hooks and processors of one parallelized transformer."""

    def __init__(self, group, kind, stale, attention_kwargs):
        from ..api import group_size

        self.group = group
        self.kind = kind
        self.size = group_size(group)
        self.rank = 0 if self.size == 1 else torch.distributed.get_rank(group)
        self.attention_kwargs = attention_kwargs
        self.stale = stale
        self.lens = None          # image tokens per rank, set per forward
        self.text_len = None      # Flux single-stream blocks need it to split text / image
        self.handles = []
        self.original_processors = None
        self.last_t = None        # for the stale state: a timestep that goes up = new generation
        self.slot = 0             # n-th forward at the same timestep (true CFG: cond, uncond)

    # -- sequence split / gather -----------------------------------------------------------------
    def set_total(self, total):
        self.lens = split_lengths(total, self.size)
        if self.lens[self.rank] == 0:
            raise ValueError(f"streamattn parallelize: {total} image tokens cannot feed {self.size} ranks")

    def local_slice(self):
        start = sum(self.lens[: self.rank])
        return slice(start, start + self.lens[self.rank])

    def gather(self, x):
        """[B, S_local, C] -> [B, S, C], in rank order, on every rank. Differentiable: every rank
        computes the same loss from the full output, so a shard's gradient is its slice of the
        (identical) full gradient."""
        if self.size == 1:
            return x
        if torch.is_grad_enabled() and x.requires_grad:
            return _Gather.apply(self, x)
        return self._gather(x)

    def _gather(self, x):
        from ..api import group_transport

        return group_transport(self.group).all_gather_rows(x, self.lens, TAG_GATHER)

    def note_timestep(self, timestep):
        if self.stale is None or timestep is None:
            return
        t = float(torch.as_tensor(timestep).flatten()[0]) if torch.as_tensor(timestep).numel() else 0.0
        if self.last_t is not None and t > self.last_t:
            self.stale.reset()           # timesteps go down within a generation
        self.slot = self.slot + 1 if (self.last_t is not None and t == self.last_t) else 0
        self.last_t = t

    # -- attention -------------------------------------------------------------------------------
    def attend(self, name, q, k, v, jq=None, jk=None, jv=None, strategy="front"):
        joint = {} if jq is None else dict(joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy=strategy)
        if self.stale is not None and self.size > 1:
            return self.stale.attention((name, self.slot), q, k, v, **joint)
        training = self.size > 1 and jq is not None and torch.is_grad_enabled()
        if training:
            # The text stream is replicated, so its gradients are per-rank shares that add up to
            # the full gradient (what all_reduce_gradients expects); streamattn's op takes and
            # returns full joint gradients. Convert at its boundary.
            joint.update(joint_q=_ShareGrad.apply(self, jq), joint_k=_ShareGrad.apply(self, jk),
                         joint_v=_ShareGrad.apply(self, jv))
        res = streamattn.attention(q, k, v, self.group, **joint, **self.attention_kwargs)
        if training:
            res = (res[0], _SumGrad.apply(self, res[1]))
        return res


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, x):
        ctx.c, ctx.sl = c, c.local_slice()
        return c._gather(x)

    @staticmethod
    def backward(ctx, g):
        return None, g[:, ctx.sl]


class _ShareGrad(torch.autograd.Function):
    """Identity; backward: a full (identical on every rank) gradient -> this rank's 1/P share."""

    @staticmethod
    def forward(ctx, c, x):
        ctx.size = c.size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None, g / ctx.size


class _SumGrad(torch.autograd.Function):
    """Identity; backward: the ranks' shares of a replicated tensor's gradient summed (in rank
    order, so every rank gets the identical full gradient)."""

    @staticmethod
    def forward(ctx, c, x):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None, _sum_over_group(ctx.c, g)


def _sum_over_group(c, t):
    from ..api import group_transport

    parts = group_transport(c.group).all_gather(t.contiguous(), range(c.size), TAG_GRAD)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def all_reduce_gradients(transformer):
    """Training with a parallelized transformer: after loss.backward() on every rank (each rank's
    loss computed from the full, gathered output), sum the parameter gradients over the group so
    every rank holds the full gradient, identical everywhere; then step the optimizer. (Each
    rank's gradients are its share: its image tokens, and 1/P of the replicated text stream.)"""
    ctx = getattr(transformer, "_streamattn_ctx", None)
    if ctx is None:
        raise ValueError("all_reduce_gradients: the transformer is not parallelized")
    if ctx.size == 1:
        return transformer
    params = [p for p in transformer.parameters() if p.grad is not None]
    if params:
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        total = _sum_over_group(ctx, flat)
        i = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(total[i : i + n].view_as(p.grad))
            i += n
    return transformer


# ---------------------------------------------------------------------------------- processors


class FluxStreamAttnProcessor:
    """FluxAttnProcessor with the attention over the group: image tokens sharded, text joint."""

    def __init__(self, ctx, name):
        self.ctx, self.name = ctx, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise NotImplementedError("streamattn parallelize: attention masks are not supported")
        ctx = self.ctx
        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            T = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = (torch.cat(p, 1) for p in ((eq, query), (ek, key), (ev, value)))
        else:  # single-stream block: hidden_states = [text, this rank's image tokens]
            T = ctx.text_len or 0
        if image_rotary_emb is not None:  # covers [text, this rank's image positions]
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if T:
            out, jout = ctx.attend(self.name, query[:, T:], key[:, T:], value[:, T:],
                                   query[:, :T], key[:, :T], value[:, :T], "front")
            hidden = torch.cat([jout, out], 1)
        else:
            hidden = ctx.attend(self.name, query, key, value)
        hidden = hidden.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            enc, hidden = hidden.split_with_sizes([T, hidden.shape[1] - T], dim=1)
            hidden = attn.to_out[1](attn.to_out[0](hidden.contiguous()))
            enc = attn.to_add_out(enc.contiguous())
            return hidden, enc
        return hidden


class SD3StreamAttnProcessor:
    """JointAttnProcessor2_0 with the attention over the group (text joint, behind the image)."""

    def __init__(self, ctx, name):
        self.ctx, self.name = ctx, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("streamattn parallelize: attention masks are not supported")
        B = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, hd) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is None:  # SD3.5 dual-attention attn2: image tokens only
            out = self.ctx.attend(self.name, q, k, v)
            enc = None
        else:
            eq = attn.add_q_proj(encoder_hidden_states).view(B, -1, attn.heads, hd)
            ek = attn.add_k_proj(encoder_hidden_states).view(B, -1, attn.heads, hd)
            ev = attn.add_v_proj(encoder_hidden_states).view(B, -1, attn.heads, hd)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            out, enc = self.ctx.attend(self.name, q, k, v, eq, ek, ev, "rear")
            enc = enc.reshape(B, -1, attn.heads * hd).to(q.dtype)
            if not attn.context_pre_only:
                enc = attn.to_add_out(enc)
        hidden = out.reshape(B, -1, attn.heads * hd).to(q.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        return hidden if enc is None else (hidden, enc)


# ---------------------------------------------------------------------------------- hooks


def _bind(model, args, kwargs):
    sig = inspect.signature(type(model).forward)
    bound = sig.bind_partial(model, *args, **kwargs)
    out = dict(bound.arguments)
    out.pop("self", None)
    extra = out.pop("kwargs", None)  # a **kwargs parameter, if the model has one
    if isinstance(extra, dict):
        out.update(extra)
    return out


def _flux_pre_hook(ctx):
    def hook(model, args, kwargs):
        kw = _bind(model, args, kwargs)
        hs = kw["hidden_states"]
        ctx.set_total(hs.shape[1])
        sl = ctx.local_slice()
        kw["hidden_states"] = hs[:, sl]
        ids = kw.get("img_ids")
        if ids is not None:
            kw["img_ids"] = ids[sl] if ids.ndim == 2 else ids[:, sl]
        enc = kw.get("encoder_hidden_states")
        ctx.text_len = 0 if enc is None else enc.shape[1]
        ctx.note_timestep(kw.get("timestep"))
        return (), kw

    return hook


def _sd3_pre_hook(ctx):
    def hook(model, args, kwargs):
        kw = _bind(model, args, kwargs)
        h, w = kw["hidden_states"].shape[-2:]
        p = model.config.patch_size
        ctx.set_total((h // p) * (w // p))
        ctx.note_timestep(kw.get("timestep"))
        return None

    return hook


def _slice_output_hook(ctx):
    def hook(module, args, output):
        return output[:, ctx.local_slice()]

    return hook


def _gather_output_hook(ctx):
    def hook(module, args, output):
        return ctx.gather(output)

    return hook


def _kind(transformer):
    for cls in type(transformer).__mro__:
        if cls.__name__ == "FluxTransformer2DModel":
            return "flux"
        if cls.__name__ == "SD3Transformer2DModel":
            return "sd3"
    raise TypeError(
        f"streamattn parallelize supports diffusers' FluxTransformer2DModel and SD3Transformer2DModel, "
        f"not {type(transformer).__name__}")


def parallelize(transformer, group=None, *, stale_kv=False, warmup_steps=1, joint_mode="exact",
                **attention_kwargs):
    """Make `transformer` (diffusers Flux / SD3) run sequence-parallel over `group`, in place.

    Call on every rank of the group with the same model; then call the transformer (or the
    pipeline) with the same full inputs on every rank; each returns the full output.
    attention_kwargs go to streamattn.attention (algorithm=, ulysses_degree=, ring_degree=).
    stale_kv=True: approximate, use the other ranks' K/V of the previous step after `warmup_steps`
    exact steps (streamattn.stale); a timestep that goes *up* starts a new generation (state reset),
    `reset_stale_kv(transformer)` does it explicitly. joint_mode: see streamattn.stale.
    Returns the transformer. `unparallelize(transformer)` undoes it.
    """
    _require_diffusers()
    kind = _kind(transformer)
    if getattr(transformer, "_streamattn_ctx", None) is not None:
        raise ValueError("this transformer is already parallelized (unparallelize it first)")
    stale = None
    if stale_kv:
        from ..stale import StaleKV

        stale = StaleKV(group, warmup_steps=warmup_steps, joint_mode=joint_mode, **attention_kwargs)
    ctx = _Context(group, kind, stale, attention_kwargs)
    ctx.original_processors = transformer.attn_processors
    proc_cls = FluxStreamAttnProcessor if kind == "flux" else SD3StreamAttnProcessor
    transformer.set_attn_processor(
        {name: proc_cls(ctx, name) for name in ctx.original_processors})
    if kind == "flux":
        ctx.handles.append(transformer.register_forward_pre_hook(_flux_pre_hook(ctx), with_kwargs=True))
    else:
        ctx.handles.append(transformer.register_forward_pre_hook(_sd3_pre_hook(ctx), with_kwargs=True))
        ctx.handles.append(transformer.pos_embed.register_forward_hook(_slice_output_hook(ctx)))
    ctx.handles.append(transformer.proj_out.register_forward_hook(_gather_output_hook(ctx)))
    transformer._streamattn_ctx = ctx
    return transformer


def unparallelize(transformer):
    """Restore the original processors and remove the hooks (finishes stale-K/V exchanges)."""
    ctx = getattr(transformer, "_streamattn_ctx", None)
    if ctx is None:
        return transformer
    if ctx.stale is not None:
        ctx.stale.reset()
    for h in ctx.handles:
        h.remove()
    transformer.set_attn_processor(dict(ctx.original_processors))
    transformer._streamattn_ctx = None
    return transformer


def reset_stale_kv(transformer):
    """Start a new generation: the next steps warm up exactly again (no-op without stale_kv)."""
    ctx = getattr(transformer, "_streamattn_ctx", None)
    if ctx is not None and ctx.stale is not None:
        ctx.stale.reset()
        ctx.last_t, ctx.slot = None, 0


def stale_state(transformer):
    """The StaleKV object of a transformer parallelized with stale_kv=True (stats, finish())."""
    ctx = getattr(transformer, "_streamattn_ctx", None)
    return None if ctx is None else ctx.stale
