"""Pack / unpack for the Ulysses all-to-all, so the exchange needs no extra torch copies.

Way there (sequence-sharded -> head-sharded), P peers, H = P * Hs heads:
    ``pack_heads(x [B, S, H, D], P) -> y [P, B, S, Hs, D]`` contiguous; chunk ``y[p]`` holds heads
        ``[p*Hs, (p+1)*Hs)`` and goes to peer p (``y.view(-1)`` is the send buffer; chunk p starts
        at element ``p * B*S*Hs*D``).
    ``unpack_seq(buf, lengths, B, Hs, D) -> x [B, sum(lengths), Hs, D]``: ``buf`` holds the chunks
        received from peers 0..P-1 back to back, chunk j ``[B, lengths[j], Hs, D]`` contiguous
        starting at element ``B*Hs*D*sum(lengths[:j])`` (uneven ``lengths`` allowed, zeros too).
Way back (head-sharded -> sequence-sharded):
    ``pack_seq(x [B, S_total, Hs, D], lengths) -> buf`` 1-D, the exact inverse of ``unpack_seq``:
        chunk j = ``x[:, off_j : off_j + lengths[j]]`` contiguous at element ``B*Hs*D*off_j``.
    ``unpack_heads(y [P, B, S, Hs, D]) -> x [B, S, P*Hs, D]``, the inverse of ``pack_heads``
        (a flat receive buffer is passed as ``buf.view(P, B, S, Hs, D)``).
Joint tokens (MMDiT text tokens, replicated on every rank, split by heads):
    ``pack_heads(joint, P)[rank]`` is this rank's head slice (or just ``joint[:, :, r*Hs:(r+1)*Hs]``,
    a view); ``unpack_seq(..., joint=jh, joint_front=False)`` writes the local joint head slice
    ``jh [B, S_joint, Hs, D]`` after (rear) or before (front) the gathered sequence in the SAME output,
    so attention runs on one tensor with no ``torch.cat``; on the way back ``pack_seq(x, lengths,
    seq_start=S_joint)`` skips front joint tokens (``x[:, :S_joint]`` is then the joint output, a view),
    and ``unpack_heads`` gathers the joint outputs of all peers along heads.
Every function takes ``out=`` to write straight into a (symmetric / preallocated) buffer; inputs may
have any strides. ``*_reference`` are the torch versions with identical signatures and results.
"""
import torch

from ._jit import check_device, interpreting, lazy_jit

try:
    import triton.language as tl
except Exception:  # pragma: no cover
    class tl:  # noqa: N801
        constexpr = None


def _copy4d_kernel(
    SRC, DST,
    N1, N2, N3, NROWS, NCOLS,
    ss0, ss1, ss2, ss3,
    ds0, ds1, ds2, ds3,
    src_chunk, dst_chunk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dst[c][i0, i1, i2, i3] = src[c][i0, i1, i2, i3]; rows = (i0, i1), cols = (i2, i3), chunk c = axis 2."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    chunk = tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    i0 = (r // N1).to(tl.int64)
    i1 = (r % N1).to(tl.int64)
    i2 = (c // N3).to(tl.int64)
    i3 = (c % N3).to(tl.int64)
    mask = (r < NROWS)[:, None] & (c < NCOLS)[None, :]
    src = SRC + chunk.to(tl.int64) * src_chunk + (i0 * ss0 + i1 * ss1)[:, None] + (i2 * ss2 + i3 * ss3)[None, :]
    dst = DST + chunk.to(tl.int64) * dst_chunk + (i0 * ds0 + i1 * ds1)[:, None] + (i2 * ds2 + i3 * ds3)[None, :]
    vals = tl.load(src, mask=mask)
    tl.store(dst, vals.to(DST.dtype.element_ty), mask=mask)


_copy4d = lazy_jit(_copy4d_kernel)


def _copy4d_chunks(src, dst, nchunks=1, src_chunk=0, dst_chunk=0):
    """Copy 4-D ``src`` into 4-D ``dst`` (same shape, any strides), ``nchunks`` times at element offsets."""
    n0, n1, n2, n3 = src.shape
    if src.numel() == 0 or nchunks == 0:
        return
    nrows, ncols = n0 * n1, n2 * n3
    bc = min(1024 if not interpreting() else 4096, max(16, 1 << (ncols - 1).bit_length()))
    br = max(1, min(64, 4096 // bc)) if not interpreting() else max(1, min(256, 16384 // bc))
    br = 1 << (br.bit_length() - 1)
    grid = ((nrows + br - 1) // br, (ncols + bc - 1) // bc, nchunks)
    _copy4d[grid](
        src, dst, n1, n2, n3, nrows, ncols,
        *src.stride(), *dst.stride(), src_chunk, dst_chunk,
        BLOCK_R=br, BLOCK_C=bc,
    )


def _heads_split(x, num_chunks):
    if x.dim() != 4:
        raise ValueError(f"expected [B, S, H, D], got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    if num_chunks <= 0 or H % num_chunks:
        raise ValueError(f"{H} heads cannot be split into {num_chunks} equal chunks")
    return B, S, H, D, H // num_chunks


def _out(out, shape, like):
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape):
        try:
            return out.view(shape)
        except RuntimeError as e:
            raise ValueError(f"out of shape {tuple(out.shape)} cannot hold {tuple(shape)}") from e
    return out


def _flat_out(out, numel, like):
    if out is None:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    if not out.is_contiguous() or out.numel() < numel:
        raise ValueError(f"out must be contiguous with >= {numel} elements, got {tuple(out.shape)}")
    return out.reshape(-1)[:numel]


# ---------------------------------------------------------------- way there
def pack_heads(x, num_chunks, *, out=None):
    """``x [B, S, H, D]`` -> ``[num_chunks, B, S, H/num_chunks, D]`` contiguous (chunk p = heads of peer p).

    ``out``: optional contiguous tensor with that many elements (e.g. a symmetric send buffer); the
    result is a view of it.
    """
    B, S, H, D, Hs = _heads_split(x, num_chunks)
    y = _out(None if out is None else _flat_out(out, x.numel(), x), (num_chunks, B, S, Hs, D), x)
    check_device(x, y)
    # chunk p: src = x[:, :, p*Hs:(p+1)*Hs] (offset p*Hs*stride_h), dst = y[p] (offset p*B*S*Hs*D)
    _copy4d_chunks(x[:, :, :Hs], y[0], num_chunks, Hs * x.stride(2), y.stride(0))
    return y


def pack_heads_reference(x, num_chunks, *, out=None):
    B, S, H, D, Hs = _heads_split(x, num_chunks)
    y = x.reshape(B, S, num_chunks, Hs, D).permute(2, 0, 1, 3, 4).contiguous()
    if out is not None:
        res = _flat_out(out, y.numel(), x).view(y.shape)
        res.copy_(y)
        return res
    return y


def _seq_layout(lengths, B, Hs, D, joint, joint_front):
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"negative length in {lengths}")
    S = sum(lengths)
    SJ = 0
    if joint is not None:
        if joint.dim() != 4 or joint.shape[0] != B or joint.shape[2] != Hs or joint.shape[3] != D:
            raise ValueError(f"joint must be [B={B}, S_joint, Hs={Hs}, D={D}], got {tuple(joint.shape)}")
        SJ = joint.shape[1]
    seq0 = SJ if joint_front else 0
    return lengths, S, SJ, seq0


def unpack_seq(buf, lengths, B, Hs, D, *, joint=None, joint_front=False, out=None):
    """Received chunks -> ``x [B, S_joint? + sum(lengths), Hs, D]``.

    ``buf``: contiguous tensor (any shape, read flat) holding peer j's ``[B, lengths[j], Hs, D]``
    chunk at element ``B*Hs*D*sum(lengths[:j])``. ``joint``: optional ``[B, S_joint, Hs, D]`` (any
    strides) placed before (``joint_front=True``) or after the sequence. ``out``: optional
    ``[B, S_out, Hs, D]`` destination (any strides).
    """
    lengths, S, SJ, seq0 = _seq_layout(lengths, B, Hs, D, joint, joint_front)
    if not buf.is_contiguous():
        raise ValueError("buf must be contiguous (it is read as a flat receive buffer)")
    flat = buf.reshape(-1)
    if flat.numel() < B * S * Hs * D:
        raise ValueError(f"buf has {flat.numel()} elements, lengths {lengths} need {B * S * Hs * D}")
    x = _out(out, (B, S + SJ, Hs, D), buf)
    check_device(flat, x)
    off = 0
    even = len(set(lengths)) == 1 and lengths[0] > 0
    if even:  # one launch: chunk j -> x[:, seq0 + j*n : seq0 + (j+1)*n]
        n = lengths[0]
        src = flat[: B * n * Hs * D].view(B, n, Hs, D)
        _copy4d_chunks(src, x[:, seq0:seq0 + n], len(lengths), src.numel(), n * x.stride(1))
    else:
        for n in lengths:
            if n:
                src = flat[B * off * Hs * D: B * (off + n) * Hs * D].view(B, n, Hs, D)
                _copy4d_chunks(src, x[:, seq0 + off: seq0 + off + n])
            off += n
    if joint is not None and SJ:
        j0 = 0 if joint_front else S
        _copy4d_chunks(joint, x[:, j0:j0 + SJ])
    return x


def unpack_seq_reference(buf, lengths, B, Hs, D, *, joint=None, joint_front=False, out=None):
    lengths, S, SJ, seq0 = _seq_layout(lengths, B, Hs, D, joint, joint_front)
    flat = buf.reshape(-1)
    parts, off = [], 0
    for n in lengths:
        parts.append(flat[B * off * Hs * D: B * (off + n) * Hs * D].view(B, n, Hs, D))
        off += n
    if joint is not None:
        parts = [joint] + parts if joint_front else parts + [joint]
    x = torch.cat(parts, dim=1) if parts else flat.new_empty((B, 0, Hs, D))
    if out is not None:
        res = _out(out, x.shape, buf)
        res.copy_(x)
        return res
    return x


# ---------------------------------------------------------------- way back
def pack_seq(x, lengths, *, seq_start=0, out=None):
    """``x [B, S_x, Hs, D]`` -> flat ``buf`` with chunk j = ``x[:, seq_start+off_j : ...+lengths[j]]``.

    Chunk j is ``[B, lengths[j], Hs, D]`` contiguous at element ``B*Hs*D*off_j``, ``off_j =
    sum(lengths[:j])`` (the layout ``unpack_seq`` reads). ``seq_start`` skips leading (front joint)
    tokens. ``out``: optional contiguous destination with at least that many elements; returns the
    1-D view of the written part.
    """
    if x.dim() != 4:
        raise ValueError(f"expected [B, S, Hs, D], got {tuple(x.shape)}")
    B, SX, Hs, D = x.shape
    lengths = [int(n) for n in lengths]
    S = sum(lengths)
    if seq_start < 0 or seq_start + S > SX:
        raise ValueError(f"seq_start {seq_start} + sum(lengths) {S} exceeds sequence length {SX}")
    buf = _flat_out(out, B * S * Hs * D, x)
    check_device(x, buf)
    if len(set(lengths)) == 1 and lengths[0] > 0:
        n = lengths[0]
        dst = buf[: B * n * Hs * D].view(B, n, Hs, D)
        _copy4d_chunks(x[:, seq_start:seq_start + n], dst, len(lengths), n * x.stride(1), dst.numel())
    else:
        off = 0
        for n in lengths:
            if n:
                dst = buf[B * off * Hs * D: B * (off + n) * Hs * D].view(B, n, Hs, D)
                _copy4d_chunks(x[:, seq_start + off: seq_start + off + n], dst)
            off += n
    return buf


def pack_seq_reference(x, lengths, *, seq_start=0, out=None):
    lengths = [int(n) for n in lengths]
    parts, off = [], seq_start
    for n in lengths:
        parts.append(x[:, off:off + n].reshape(-1))
        off += n
    flat = torch.cat(parts) if parts else x.new_empty(0)
    if out is not None:
        res = _flat_out(out, flat.numel(), x)
        res.copy_(flat)
        return res
    return flat


def unpack_heads(y, *, out=None):
    """``y [P, B, S, Hs, D]`` (peer p's output for heads ``[p*Hs, (p+1)*Hs)``) -> ``[B, S, P*Hs, D]``.

    ``y`` may have any strides; ``out``: optional ``[B, S, P*Hs, D]`` destination (any strides).
    """
    if y.dim() != 5:
        raise ValueError(f"expected [P, B, S, Hs, D], got {tuple(y.shape)}")
    P, B, S, Hs, D = y.shape
    x = _out(out, (B, S, P * Hs, D), y)
    check_device(y, x)
    _copy4d_chunks(y[0], x[:, :, :Hs], P, y.stride(0), Hs * x.stride(2))
    return x


def unpack_heads_reference(y, *, out=None):
    P, B, S, Hs, D = y.shape
    x = y.permute(1, 2, 0, 3, 4).reshape(B, S, P * Hs, D)
    if out is not None:
        res = _out(out, x.shape, y)
        res.copy_(x)
        return res
    return x.contiguous()
