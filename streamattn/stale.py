"""Stale K/V across diffusion steps (opt-in, approximate): communication off the critical path.

A DiT's activations change little between adjacent denoising steps (DistriFusion, PipeFusion,
DiTCacheAnalysis), so a rank can attend its queries to the *previous step's* K/V of the other
ranks while this step's K/V travel in the background for the whole step:

    step n, layer L:  wait for the K/V exchange layer L posted at step n-1 (it had a whole step)
                      post the exchange of this step's local K/V (completed at step n+1)
                      out = LSE-merge( attn(q, [joint K/V, fresh local K/V]),
                                       attn(q, other ranks' K/V from step n-1) )

The first `warmup_steps` calls of every layer are exact (`streamattn.attention`), like xDiT's
`warmup_steps`; the last warm-up call also posts its K/V so the first stale step has them.

Joint (text) tokens are replicated, so their K/V are always fresh. The joint *queries* attend the
image K/V of every rank; two modes:
  joint_mode="exact" (default): each rank attends the joint queries to its own fresh image K/V and
      the partial (out, lse) of T text rows (small next to the image K/V) is exchanged while the
      image queries compute; the joint output is exact and bit-identical on every rank.
  joint_mode="stale": the joint queries attend every rank's image K/V of step n-1 (the own one
      included, so the result is still identical on every rank); no exchange waits at all.

Memory: every layer keeps the other ranks' K/V, (P-1)/P of the whole sequence's K/V per layer
(as DistriFusion). Non-causal attention only (DiTs). Communication uses the group's two-sided
transport with tags TAG_BASE + 2*layer_index (+1 for the joint partials), so every layer's
exchange can stay in flight at once.

Usage (every rank, same call order)::

    state = StaleKV(group, warmup_steps=1)
    for step in ...:
        for layer in ...:
            out, jout = state.attention(layer, q, k, v, joint_q=..., joint_k=..., joint_v=...)
    state.reset()       # before the next generation (waits for the last exchanges)

A state dropped without reset() leaves its last exchanges in flight; the transport keeps their
buffers and the group's next call waits for them (TorchTransport.adopt), so the group stays usable.
"""
from __future__ import annotations

import math
import time

import torch

from . import tags
from .kernels import attention_with_lse
from .merge import acc_dtype, update_out_and_lse
from .dispatch import attention as exact_attention

TAG_BASE = tags.STALE   # per layer: TAG_BASE + 2*i (K/V), TAG_BASE + 2*i + 1 (joint partials)
TAG_LENS = tags.STALE_LENS

__all__ = ["StaleKV", "TAG_BASE"]


class _Layer:
    __slots__ = ("index", "step", "pending", "send", "recv", "remote_k", "remote_v", "lens",
                 "shape", "prev_all")

    def __init__(self, index):
        self.index = index
        self.step = 0             # calls of this layer since the last reset
        self.pending = None       # Pending of the K/V exchange posted by the previous call
        self.send = None          # the tensor being sent (kept alive until wait())
        self.recv = None          # {peer: [2, B, S_p, Hk, D]} receive buffers
        self.remote_k = None      # other ranks' K of the previous step, rank order, [B, S_rem, Hk, D]
        self.remote_v = None
        self.prev_all = None      # (K, V) of every rank of the previous step (joint_mode="stale")
        self.lens = None          # S_local of every rank
        self.shape = None         # local K shape the buffers were made for


class StaleKV:
    """Per-layer stale-K/V attention state for one process group (see the module docstring).

    group: the process group (None: default group). warmup_steps: exact calls per layer before
    stale K/V are used (>= 1 recommended; 0 makes only the very first call exact, which it must
    be). joint_mode: "exact" | "stale". attention_kwargs: passed to streamattn.attention on the
    exact (warm-up) calls (algorithm, ulysses_degree, ...).
    """

    def __init__(self, group=None, *, warmup_steps: int = 1, joint_mode: str = "exact",
                 **attention_kwargs):
        if warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if joint_mode not in ("exact", "stale"):
            raise ValueError(f"joint_mode must be 'exact' or 'stale', not {joint_mode!r}")
        for bad in ("causal", "layout", "joint_q", "joint_k", "joint_v", "group"):
            if bad in attention_kwargs:
                raise ValueError(f"StaleKV: {bad!r} is not a constructor argument")
        self.group = group
        self.warmup_steps = int(warmup_steps)
        self.joint_mode = joint_mode
        self.attention_kwargs = attention_kwargs
        self._layers: dict = {}
        self.stats = {"exact_calls": 0, "stale_calls": 0, "wait_s": 0.0}

    # -- public -----------------------------------------------------------------------------
    def attention(self, layer, q, k, v, *, joint_q=None, joint_k=None, joint_v=None,
                  joint_strategy="front", scale=None, layout="bshd"):
        """Attention of this rank's shard for `layer` (any hashable key, the same on every rank).
        Same arguments and return value as streamattn.attention (non-causal)."""
        from .api import group_size

        size = group_size(self.group)
        joint = joint_q is not None
        if size == 1:
            return exact_attention(q, k, v, self.group, layout=layout, scale=scale,
                                        joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                                        joint_strategy=joint_strategy, **self.attention_kwargs)
        if layout not in ("bshd", "bhsd"):
            raise ValueError(f"layout must be 'bshd' or 'bhsd', not {layout!r}")
        if layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if joint:
                joint_q, joint_k, joint_v = (t.transpose(1, 2) for t in (joint_q, joint_k, joint_v))
        st = self._layer(layer)
        transport = self._transport()
        if st.pending is not None:
            t0 = time.perf_counter()
            st.pending.wait()
            self.stats["wait_s"] += time.perf_counter() - t0
            self._absorb(st, transport)

        if st.step < self.warmup_steps or st.remote_k is None:
            res = exact_attention(q, k, v, self.group, layout="bshd", scale=scale,
                                       joint_q=joint_q, joint_k=joint_k, joint_v=joint_v,
                                       joint_strategy=joint_strategy, **self.attention_kwargs)
            self.stats["exact_calls"] += 1
            if st.step + 1 >= self.warmup_steps:
                if st.lens is None or st.shape != tuple(k.shape):
                    st.lens = [int(x[0]) for x in transport.all_gather_vector(
                        torch.tensor([k.shape[1]], dtype=torch.int64), TAG_LENS)]
                    st.shape = tuple(k.shape)
                self._post(st, transport, k, v)
            out, jout = res if joint else (res, None)
        else:
            if tuple(k.shape) != st.shape:
                raise ValueError(
                    f"StaleKV: layer {layer!r} changed its K shape from {st.shape} to "
                    f"{tuple(k.shape)} between steps; call reset() before a new shape")
            out, jout = self._stale(st, transport, q, k, v, joint_q, joint_k, joint_v, scale)
            self.stats["stale_calls"] += 1
        st.step += 1
        if layout == "bhsd":
            out = out.transpose(1, 2).contiguous()
            jout = None if jout is None else jout.transpose(1, 2).contiguous()
        return (out, jout) if joint else out

    def finish(self) -> None:
        """Complete every K/V exchange still in flight (keeps the state: the next step can go on)."""
        transport = None
        for st in self._layers.values():
            if st.pending is not None:
                transport = transport or self._transport()
                st.pending.wait()
                self._absorb(st, transport)

    def reset(self) -> None:
        """finish(), then forget everything: the next call of every layer warms up again (call
        it between generations: the previous image's K/V are of no use to the next one)."""
        self.finish()
        self._layers.clear()

    @property
    def step(self) -> int:
        """Calls of the most-called layer since the last reset (= diffusion steps done)."""
        return max((st.step for st in self._layers.values()), default=0)

    # -- internals ---------------------------------------------------------------------------
    def _transport(self):
        from .api import group_transport

        return group_transport(self.group)

    def _layer(self, key):
        st = self._layers.get(key)
        if st is None:
            st = self._layers[key] = _Layer(len(self._layers))
        return st

    def _post(self, st, transport, k, v):
        """Start sending this step's local K/V to every other rank (completed at the next call)."""
        me, size = transport.rank, transport.size
        payload = torch.stack([k, v]).contiguous()                  # [2, B, S, Hk, D]
        B, _, Hk, D = k.shape
        st.recv = {p: torch.empty(2, B, st.lens[p], Hk, D, dtype=k.dtype, device=k.device)
                   for p in range(size) if p != me}
        st.send = payload
        st.pending = transport.exchange([(p, payload) for p in st.recv],
                                        list(st.recv.items()), TAG_BASE + 2 * st.index)

    def _absorb(self, st, transport):
        me = transport.rank
        peers = sorted(st.recv)
        st.remote_k = torch.cat([st.recv[p][0] for p in peers], dim=1)
        st.remote_v = torch.cat([st.recv[p][1] for p in peers], dim=1)
        if self.joint_mode == "stale":
            parts = [st.send if p == me else st.recv[p] for p in range(transport.size)]
            st.prev_all = (torch.cat([x[0] for x in parts], 1), torch.cat([x[1] for x in parts], 1))
        st.pending, st.send, st.recv = None, None, None

    def _stale(self, st, transport, q, k, v, jq, jk, jv, scale):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        joint = jq is not None
        # The stale K/V of the other ranks are consumed now; post this step's right away so the
        # exchange has the whole step (every later layer) to complete.
        prev_all = st.prev_all
        self._post(st, transport, k, v)

        def bh(x):
            return x.transpose(1, 2)

        jpending = None
        if joint and self.joint_mode == "exact":
            # The joint queries' partial against this rank's fresh image K/V, to every rank.
            jo, jl = attention_with_lse(bh(jq), bh(k), bh(v), scale=scale)
            adt = acc_dtype(q.dtype)
            mine = torch.cat([jo.to(adt), jl.to(adt).unsqueeze(-1)], -1).contiguous()
            parts = {p: torch.empty_like(mine) for p in range(transport.size) if p != transport.rank}
            jpending = transport.exchange([(p, mine) for p in parts], list(parts.items()),
                                          TAG_BASE + 2 * st.index + 1)
            parts[transport.rank] = mine

        # Image queries: fresh local (+ joint) K/V, then the other ranks' K/V of the last step.
        kl = torch.cat([jk, k], 1) if joint else k
        vl = torch.cat([jv, v], 1) if joint else v
        o, l = attention_with_lse(bh(q), bh(kl), bh(vl), scale=scale)
        o = o.to(acc_dtype(q.dtype))
        l = l.to(o.dtype)
        ro, rl = attention_with_lse(bh(q), bh(st.remote_k), bh(st.remote_v), scale=scale)
        update_out_and_lse(o, l, ro, rl)
        out = bh(o).to(q.dtype)

        jout = None
        if joint:
            jo, jl = attention_with_lse(bh(jq), bh(jk), bh(jv), scale=scale)
            jo, jl = jo.to(o.dtype), jl.to(o.dtype)
            if self.joint_mode == "exact":
                t0 = time.perf_counter()
                jpending.wait()
                self.stats["wait_s"] += time.perf_counter() - t0
                for p in range(transport.size):          # fixed order: identical on every rank
                    update_out_and_lse(jo, jl, parts[p][..., :-1], parts[p][..., -1])
            else:
                pk, pv = prev_all
                po, pl = attention_with_lse(bh(jq), bh(pk), bh(pv), scale=scale)
                update_out_and_lse(jo, jl, po, pl)
            jout = bh(jo).to(q.dtype)
        return out, jout
