"""streamattn.triton_kernels under TRITON_INTERPRET=1 on CPU tensors, against torch float64 references.

Tolerances, honestly: the kernels accumulate in float32, so fp32 inputs agree with float64 to a few
1e-7 on O(1) values (measured ~5e-7 here); 1e-5 abs+rel leaves ~20x headroom for other BLAS/numpy
orderings. fp16 inputs are rounded to fp16 once more inside (P before the P.V dot, the output), so
2e-2. bf16: Triton 3.9's interpreter computes bf16 ``tl.dot`` wrongly, so under the interpreter the
kernel upcasts bf16 tiles to fp32 before each dot; what the bf16 test checks is that path (load,
upcast, store as bf16), not the GPU's bf16 tensor-core dot.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported / any kernel is jitted

import pytest
import torch

triton = pytest.importorskip("triton")

from streamattn import triton_kernels as tk  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _check_attn(q, k, v, tol, **kw):
    out, lse = tk.attention_fwd(q, k, v, **kw)
    kw.pop("block_m", None), kw.pop("block_n", None)
    ro, rl = tk.attention_reference(q.double(), k.double(), v.double(), **kw)
    assert out.dtype == q.dtype and out.shape == q.shape[:3] + (v.shape[-1],)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    fin = torch.isfinite(rl)
    torch.testing.assert_close(lse.double()[fin], rl[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
    return out, lse, rl


def test_available():
    assert tk.available() is True
    assert tk.interpreting()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [16, 64])
def test_attention_noncausal_odd_lengths(dtype, D):
    g = torch.Generator().manual_seed(D)
    q = _rand((2, 2, 37, D), dtype, g)
    k = _rand((2, 2, 53, D), dtype, g)
    v = _rand((2, 2, 53, D), dtype, g)
    _check_attn(q, k, v, TOL[dtype], scale=D ** -0.5)


def test_attention_block_edges():
    # lengths exactly at, one under and one over the 16-wide tiles
    g = torch.Generator().manual_seed(1)
    for sq, sk in [(16, 16), (15, 17), (17, 33), (32, 31), (1, 1), (1, 47)]:
        q = _rand((1, 2, sq, 16), torch.float32, g)
        k = _rand((1, 2, sk, 16), torch.float32, g)
        v = _rand((1, 2, sk, 16), torch.float32, g)
        for causal in (False, True):
            _check_attn(q, k, v, 1e-5, scale=0.25, causal=causal, q_offset=sk - sq if causal else 0,
                        block_m=16, block_n=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "q_offset,k_offset",
    [(0, 0), (53, 0), (0, 20), (16, 15), (10, 47)],  # (0, 20): first 20 rows see nothing
)
def test_attention_causal_global_offsets(dtype, q_offset, k_offset):
    g = torch.Generator().manual_seed(q_offset * 100 + k_offset)
    q = _rand((1, 2, 37, 32), dtype, g)
    k = _rand((1, 2, 53, 32), dtype, g)
    v = _rand((1, 2, 53, 32), dtype, g)
    _, lse, rl = _check_attn(q, k, v, TOL[dtype], scale=0.2, causal=True, q_offset=q_offset,
                             k_offset=k_offset, block_m=16, block_n=16)
    if k_offset > q_offset:
        n_empty = k_offset - q_offset
        assert torch.isneginf(lse[..., :n_empty]).all() and torch.isfinite(lse[..., n_empty:]).all()


def test_attention_fully_masked_block():
    # the whole K block lies in the future of every query: out 0, lse -inf, no NaN
    g = torch.Generator().manual_seed(3)
    q = _rand((1, 2, 20, 16), torch.float32, g)
    k = _rand((1, 2, 24, 16), torch.float32, g)
    v = _rand((1, 2, 24, 16), torch.float32, g)
    out, lse = tk.attention_fwd(q, k, v, scale=0.3, causal=True, q_offset=0, k_offset=100)
    assert torch.isneginf(lse).all() and (out == 0).all()
    out, lse = tk.attention_fwd(q, k[:, :, :0], v[:, :, :0], scale=0.3)  # no keys at all
    assert torch.isneginf(lse).all() and (out == 0).all()


@pytest.mark.parametrize("hq,hk", [(8, 2), (4, 1)])  # GQA 8/2 and MQA
def test_attention_gqa_mqa(hq, hk):
    g = torch.Generator().manual_seed(hq + hk)
    q = _rand((2, hq, 19, 16), torch.float32, g)
    k = _rand((2, hk, 23, 16), torch.float32, g)
    v = _rand((2, hk, 23, 16), torch.float32, g)
    _check_attn(q, k, v, 1e-5, scale=0.25)
    _check_attn(q, k, v, 1e-5, scale=0.25, causal=True, q_offset=4)


def test_attention_strided_bshd_views_and_odd_head_dim():
    g = torch.Generator().manual_seed(5)
    # bshd storage passed as bhsd views (no copy), D = 24 (padded to 32 inside)
    q = _rand((2, 21, 4, 24), torch.float32, g).transpose(1, 2)
    k = _rand((2, 30, 2, 24), torch.float32, g).transpose(1, 2)
    v = _rand((2, 30, 2, 24), torch.float32, g).transpose(1, 2)
    _check_attn(q, k, v, 1e-5, scale=0.2, causal=True, q_offset=9)


def test_attention_bf16_via_fp32_dots():
    g = torch.Generator().manual_seed(6)
    q = _rand((1, 2, 33, 16), torch.bfloat16, g)
    k = _rand((1, 2, 40, 16), torch.bfloat16, g)
    v = _rand((1, 2, 40, 16), torch.bfloat16, g)
    _check_attn(q, k, v, TOL[torch.bfloat16], scale=0.25, causal=True, q_offset=7)


def test_attention_rejects_bad_heads():
    q = torch.zeros(1, 3, 4, 16)
    k = torch.zeros(1, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple"):
        tk.attention_fwd(q, k, k, scale=1.0)


def test_ring_of_blocks_merges_to_full_attention():
    """What ring/torus do: causal attention against 3 K/V blocks at global offsets, merged by LSE."""
    g = torch.Generator().manual_seed(7)
    B, H, S, D = 1, 2, 45, 16
    q = _rand((B, H, S, D), torch.float32, g)
    k = _rand((B, H, S, D), torch.float32, g)
    v = _rand((B, H, S, D), torch.float32, g)
    q_off, q_len = 15, 15  # this rank's query block: global rows 15..29
    qb = q[:, :, q_off:q_off + q_len]
    out, lse = tk.merge_init(B, H, q_len, D)
    for k_off, k_len in [(30, 15), (0, 15), (15, 15)]:  # last block entirely in the future
        bo, bl = tk.attention_fwd(qb, k[:, :, k_off:k_off + k_len], v[:, :, k_off:k_off + k_len],
                                  scale=0.25, causal=True, q_offset=q_off, k_offset=k_off)
        tk.merge_(out, lse, bo, bl)
    ro, rl = tk.attention_reference(q.double(), k.double(), v.double(), scale=0.25, causal=True)
    torch.testing.assert_close(out.double(), ro[:, :, q_off:q_off + q_len], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rl[:, :, q_off:q_off + q_len], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_matches_reference_with_inf_rows(bdtype):
    g = torch.Generator().manual_seed(8)
    B, H, S, D = 2, 3, 37, 24
    o1 = _rand((B, H, S, D), torch.float32, g)
    l1 = _rand((B, H, S), torch.float32, g) * 3
    o2 = _rand((B, H, S, D), torch.float32, g).to(bdtype)
    l2 = _rand((B, H, S), torch.float32, g) * 3
    l1[:, :, :5] = float("-inf"); o1[:, :, :5] = 0          # only the block has keys
    l2[:, :, 5:9] = float("-inf"); o2[:, :, 5:9] = 0        # only the running result has keys
    l1[:, :, 9:12] = float("-inf"); l2[:, :, 9:12] = float("-inf")  # both empty
    o1[:, :, 9:12] = 0; o2[:, :, 9:12] = 0
    ro, rl = o1.double().clone(), l1.double().clone()
    tk.merge_reference(ro, rl, o2.double(), l2.double())
    out, lse = o1.clone(), l1.clone()
    tk.merge_(out, lse, o2, l2)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.isneginf(lse[:, :, 9:12]).all() and (out[:, :, 9:12] == 0).all()
    torch.testing.assert_close(lse.double(), rl, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.double(), ro, atol=1e-6, rtol=1e-6)
    # one side empty: the other is taken unchanged (exactly)
    assert torch.equal(out[:, :, :5], o2[:, :, :5].float()) and torch.equal(lse[:, :, :5], l2[:, :, :5])
    assert torch.equal(out[:, :, 5:9], o1[:, :, 5:9]) and torch.equal(lse[:, :, 5:9], l1[:, :, 5:9])


def test_merge_reference_is_exact_lse_math():
    # merging two halves of the keys equals attention over all keys
    g = torch.Generator().manual_seed(9)
    q = _rand((1, 2, 11, 16), torch.float64, g)
    k = _rand((1, 2, 20, 16), torch.float64, g)
    v = _rand((1, 2, 20, 16), torch.float64, g)
    o1, l1 = tk.attention_reference(q, k[:, :, :7], v[:, :, :7], scale=0.3)
    o2, l2 = tk.attention_reference(q, k[:, :, 7:], v[:, :, 7:], scale=0.3)
    ro, rl = tk.attention_reference(q, k, v, scale=0.3)
    tk.merge_reference(o1, l1, o2, l2)
    torch.testing.assert_close(o1, ro, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l1, rl, atol=1e-12, rtol=1e-12)


def test_merge_strided_bshd_accumulator():
    g = torch.Generator().manual_seed(10)
    acc = torch.zeros(2, 13, 3, 16)          # bshd storage
    acc_lse = torch.full((2, 13, 3), float("-inf"))
    blocks = [(_rand((2, 3, 13, 16), torch.float16, g), _rand((2, 3, 13), torch.float32, g)) for _ in range(3)]
    ro, rl = torch.zeros(2, 3, 13, 16, dtype=torch.float64), torch.full((2, 3, 13), float("-inf"), dtype=torch.float64)
    for bo, bl in blocks:
        tk.merge_(acc.transpose(1, 2), acc_lse.transpose(1, 2), bo, bl)
        tk.merge_reference(ro, rl, bo.double(), bl.double())
    torch.testing.assert_close(acc.transpose(1, 2).double(), ro, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc_lse.transpose(1, 2).double(), rl, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ pack / unpack
def _ulysses_roundtrip(lengths, H, P, dtype, joint_len=0, joint_front=False, use_ref=False):
    """Simulate the all-to-all on one process: P ranks with uneven sequence shards."""
    g = torch.Generator().manual_seed(sum(lengths) + H)
    B, D = 2, 8
    Hs = H // P
    ph = tk.pack_heads_reference if use_ref else tk.pack_heads
    us = tk.unpack_seq_reference if use_ref else tk.unpack_seq
    ps = tk.pack_seq_reference if use_ref else tk.pack_seq
    uh = tk.unpack_heads_reference if use_ref else tk.unpack_heads
    xs = [_rand((B, n, H, D), dtype, g) for n in lengths]
    joint = _rand((B, joint_len, H, D), dtype, g) if joint_len else None
    full = torch.cat(xs, dim=1)
    sent = [ph(x, P) for x in xs]  # sent[j][p]: rank j -> rank p
    for x, y in zip(xs, sent):
        assert y.is_contiguous() and y.shape == (P, B, x.shape[1], Hs, D)
        torch.testing.assert_close(y, tk.pack_heads_reference(x, P), rtol=0, atol=0)
    backs = []
    for p in range(P):
        recv = torch.cat([sent[j][p].reshape(-1) for j in range(P)])  # what an all_to_all delivers
        jh = joint[:, :, p * Hs:(p + 1) * Hs] if joint is not None else None
        xp = us(recv, lengths, B, Hs, D, joint=jh, joint_front=joint_front)
        seq = full[:, :, p * Hs:(p + 1) * Hs]
        if jh is not None:
            seq = torch.cat([jh, seq] if joint_front else [seq, jh], dim=1)
        torch.testing.assert_close(xp, seq, rtol=0, atol=0)
        # "attention" = identity; way back
        start = joint_len if (joint is not None and joint_front) else 0
        backs.append(ps(xp, lengths, seq_start=start))
        torch.testing.assert_close(backs[-1], tk.pack_seq_reference(xp, lengths, seq_start=start), rtol=0, atol=0)
    offs = [sum(lengths[:j]) for j in range(P)]
    for j, n in enumerate(lengths):
        # rank j receives from each peer p its chunk j
        y = torch.stack([backs[p][B * offs[j] * Hs * D: B * (offs[j] + n) * Hs * D].view(B, n, Hs, D)
                         for p in range(P)])
        torch.testing.assert_close(uh(y), xs[j], rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [[5, 5, 5, 5], [7, 3, 0, 11], [13]])
def test_pack_unpack_roundtrip_uneven(lengths):
    P = len(lengths)
    _ulysses_roundtrip(lengths, 4 if P < 4 else 8, P, torch.float32)


def test_pack_unpack_roundtrip_fp16_with_joint_tokens():
    _ulysses_roundtrip([6, 9, 4], 6, 3, torch.float16, joint_len=5, joint_front=False)
    _ulysses_roundtrip([6, 9, 4], 6, 3, torch.float16, joint_len=5, joint_front=True)


def test_pack_references_roundtrip():
    _ulysses_roundtrip([3, 8], 4, 2, torch.float64, joint_len=2, joint_front=True, use_ref=True)


def test_pack_into_preallocated_buffers_and_strided_input():
    g = torch.Generator().manual_seed(11)
    x = _rand((2, 4, 9, 8), torch.float32, g).transpose(1, 2)  # [B=2, S=9, H=4, D=8] non-contiguous
    sym = torch.full((2 * 9 * 4 * 8 + 10,), float("nan"))      # e.g. a symmetric send buffer
    y = tk.pack_heads(x, 2, out=sym)
    assert y.data_ptr() == sym.data_ptr()
    torch.testing.assert_close(y, tk.pack_heads_reference(x, 2), rtol=0, atol=0)
    dst = torch.empty(2, 4, 9, 8).transpose(1, 2)            # non-contiguous destination
    r = tk.unpack_heads(y, out=dst)
    assert r.data_ptr() == dst.data_ptr()
    torch.testing.assert_close(dst, x, rtol=0, atol=0)
    with pytest.raises(ValueError):
        tk.pack_heads(x, 3)


def test_available_false_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tk.available() is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            tk.attention_fwd(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tk.available() is True
