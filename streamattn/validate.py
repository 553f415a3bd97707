"""Input checks: local ones (no communication) and the cross-rank agreement check.

The cross-rank check encodes each rank's metadata as an int64 vector (never pickle), gathers it once
per call shape, and raises the same ValueError on every rank when they disagree, including when one
rank's own input was malformed (its message travels in the vector as UTF-8 bytes).
"""
from __future__ import annotations

import math
import struct

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("bshd", "bhsd")
COMM_DTYPES = (None, torch.bfloat16)  # the wire formats of comm_dtype= (None: exact)
STRATEGIES = ("front", "rear")
ALGORITHMS = ("auto", "ulysses", "ring", "usp", "torus")
MAGIC, VERSION = 0x5354524D, 1
MSG_BYTES = 240
ZIGZAG = 2  # the "causal" field's value for causal attention in the zigzag layout (streamattn.zigzag)

# (name, how to show the value) of the metadata fields, in vector order.
FIELDS = ("error", "batch", "seq_len", "heads", "kv_heads", "head_dim", "dtype", "layout", "device",
          "causal", "joint_len", "joint_strategy", "algorithm", "ulysses_degree", "ring_degree",
          "scale", "comm_dtype")
_DEVICE_TYPES = ("cpu", "cuda", "other")


def _tensor4(name, t):
    if not isinstance(t, torch.Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if t.dim() != 4:
        return f"{name} must be 4-D, got shape {tuple(t.shape)}"
    return None


def check_local(q, k, v, layout, causal, scale, joint_q, joint_k, joint_v, joint_strategy,
                algorithm, ulysses_degree, ring_degree):
    """Return an error message for malformed input on this rank, or None. No communication."""
    if layout not in LAYOUTS:
        return f"layout={layout!r}: expected 'bshd' ([B, S, H, D]) or 'bhsd' ([B, H, S, D])"
    for name, t in (("q", q), ("k", k), ("v", v)):
        err = _tensor4(name, t)
        if err:
            return err
    if q.dtype not in DTYPES:
        return f"q has dtype {q.dtype}; supported: float16, bfloat16, float32, float64"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    qs, ks = _bshd_shape(q, layout), _bshd_shape(k, layout)
    if qs[0] != ks[0]:
        return f"batch differs: q {qs[0]} vs k/v {ks[0]} (layout {layout!r})"
    if qs[1] != ks[1]:
        return (f"q has {qs[1]} local tokens but k/v have {ks[1]} (layout {layout!r}); each rank's "
                "q, k, v must cover the same tokens")
    if qs[3] != ks[3]:
        return f"head dim differs: q {qs[3]} vs k/v {ks[3]}"
    if ks[2] == 0 or qs[2] % ks[2]:
        return (f"q has {qs[2]} heads and k/v {ks[2]}: the query heads must be a multiple of the "
                f"key/value heads (layout {layout!r}: is the layout right?)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return f"scale={scale!r} must be a finite number or None"
    if algorithm not in ALGORITHMS:
        return f"algorithm={algorithm!r}: expected one of {', '.join(ALGORITHMS)}"
    for name, d in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if d is not None and (not isinstance(d, int) or d < 1):
            return f"{name}={d!r} must be a positive int or None"
    joints = (joint_q, joint_k, joint_v)
    if any(j is not None for j in joints):
        if any(j is None for j in joints):
            return "joint_q, joint_k and joint_v must be given together"
        for name, t in (("joint_q", joint_q), ("joint_k", joint_k), ("joint_v", joint_v)):
            err = _tensor4(name, t)
            if err:
                return err
            if t.dtype != q.dtype or t.device != q.device:
                return f"{name} must match q's dtype and device ({q.dtype}, {q.device})"
        if joint_strategy not in STRATEGIES:
            return f"joint_strategy={joint_strategy!r}: expected 'front' or 'rear'"
        if causal:
            return "causal=True with joint tokens is not supported (MMDiT joint attention is bidirectional)"
        jq, jk = _bshd_shape(joint_q, layout), _bshd_shape(joint_k, layout)
        if joint_k.shape != joint_v.shape:
            return f"joint_k and joint_v shapes differ: {tuple(joint_k.shape)} vs {tuple(joint_v.shape)}"
        want_q = (qs[0], jq[1], qs[2], qs[3])
        if jq != want_q or jk != (qs[0], jq[1], ks[2], qs[3]):
            return (f"joint tokens must be [B, T, H, D] like q ({layout!r}): got joint_q {jq}, joint_k "
                    f"{jk} for q {qs} and k {ks} (as bshd)")
    return None


def _bshd_shape(t, layout):
    b, x, y, d = t.shape
    return (b, x, y, d) if layout == "bshd" else (b, y, x, d)


def _scale_bits(scale: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(scale)))[0]


def field_values(error, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm, u, r,
                 comm_dtype=None) -> list:
    """This rank's FIELDS as ints (all 0 but the error flag when its input was malformed)."""
    if error:
        return [1] + [0] * (len(FIELDS) - 1)
    b, s, h, d = _bshd_shape(q, layout)
    hk = _bshd_shape(k, layout)[2]
    dev = q.device.type if q.device.type in _DEVICE_TYPES else "other"
    return [0, b, s, h, hk, d, DTYPES.index(q.dtype), LAYOUTS.index(layout),
            _DEVICE_TYPES.index(dev), ZIGZAG if causal == "zigzag" else int(bool(causal)), joint_len,
            STRATEGIES.index(joint_strategy) if joint_strategy in STRATEGIES else 0,
            ALGORITHMS.index(algorithm), u or 0, r or 0, _scale_bits(scale),
            COMM_DTYPES.index(comm_dtype)]


def encode(error, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm, u, r,
           comm_dtype=None) -> torch.Tensor:
    """This rank's metadata as int64: [MAGIC, VERSION, *FIELDS, *message bytes]."""
    msg = (error or "").encode("utf-8")[:MSG_BYTES]
    msg_vec = list(msg) + [0] * (MSG_BYTES - len(msg))
    vals = field_values(error, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm, u, r,
                        comm_dtype)
    return torch.tensor([MAGIC, VERSION] + vals + msg_vec, dtype=torch.int64)


def _show(name, value):
    if name == "dtype":
        return str(DTYPES[value]).replace("torch.", "")
    if name == "layout":
        return LAYOUTS[value]
    if name == "device":
        return _DEVICE_TYPES[value]
    if name == "joint_strategy":
        return STRATEGIES[value]
    if name == "algorithm":
        return ALGORITHMS[value]
    if name == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if name == "comm_dtype":
        return str(COMM_DTYPES[value])
    if name in ("ulysses_degree", "ring_degree"):
        return "None" if value == 0 else str(value)
    return str(value)


def check_agreement(vectors: list) -> dict:
    """Compare every rank's metadata vector. Raise one ValueError (the same text on every rank) on
    any malformed input or disagreement; return the agreed fields plus per-rank seq_lens."""
    n = len(FIELDS)
    for r, vec in enumerate(vectors):
        if int(vec[0]) != MAGIC or int(vec[1]) != VERSION:
            raise ValueError(f"streamattn.attention: rank {r} sent unrecognised metadata (different "
                             "streamattn versions, or ranks making different calls?)")
    rows = [[int(x) for x in vec[2 : 2 + n]] for vec in vectors]
    bad = [r for r, row in enumerate(rows) if row[0]]
    if bad:
        texts = []
        for r in bad:
            raw = bytes(int(x) for x in vectors[r][2 + n :] if int(x) != 0)
            texts.append(f"rank {r}: {raw.decode('utf-8', 'replace')}")
        raise ValueError("streamattn.attention: invalid input on " + "; ".join(texts))
    for i, name in enumerate(FIELDS):
        if name in ("error", "seq_len"):
            continue
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = ", ".join(f"rank {r}: {_show(name, v)}" for r, v in enumerate(values))
            raise ValueError(f"streamattn.attention: ranks disagree on {name} ({shown}); every rank "
                             "must pass the same batch, heads, head dim, dtype, layout and options")
    agreed = {name: rows[0][i] for i, name in enumerate(FIELDS)}
    agreed["seq_lens"] = tuple(row[FIELDS.index("seq_len")] for row in rows)
    agreed["scale"] = struct.unpack("<d", struct.pack("<q", agreed["scale"]))[0]
    return agreed
