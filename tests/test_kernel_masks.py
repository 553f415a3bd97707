"""Masked blocks with odd key lengths and fp32 causal, on every kernel backend that runs on CPU,
against a float64 reference; and the raw efficient-attention call (CUDA only) through a CPU
stand-in that enforces the CUDA kernel's input checks (torch's mem-efficient kernel, from
xformers: every stride of the bias but the last a multiple of 16 bytes, last stride 1, 16-byte
aligned base pointer, bias shape [B, H, Sq, Sk]; is_causal is the top-left mask)."""
import math

import pytest
import torch

from streamattn import kernels

# (B, Hq, Hk, Sq, Sk, causal, q_offset, k_offset): odd key lengths, offsets, dead rows
CASES = [
    (1, 4, 4, 13, 13, True, 0, 0),       # square causal, Sk not a multiple of 4/8
    (2, 4, 2, 7, 19, True, 30, 20),      # diag > 0, GQA, odd Sk
    (1, 2, 2, 11, 9, True, 5, 9),        # leading dead rows
    (1, 2, 1, 5, 33, True, 0, 0),        # diag 0, Sq != Sk (top-left)
    (1, 4, 4, 17, 23, False, 0, 0),      # unmasked, odd lengths
]
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 2e-2), "float16": (torch.float16, 2e-2)}


def reference(q, k, v, scale, causal, qo, ko):
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = qd @ kd.transpose(-1, -2) * scale
    if causal:
        i = torch.arange(q.shape[2]).unsqueeze(1) + qo
        j = torch.arange(k.shape[2]).unsqueeze(0) + ko
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, -1)
    dead = torch.isneginf(lse)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse).unsqueeze(-1))
    return torch.where(dead.unsqueeze(-1), 0.0, p @ vd), lse, dead


def fake_efficient_op(calls):
    """CPU stand-in of aten._scaled_dot_product_efficient_attention with the CUDA kernel's checks."""

    def op(q, k, v, bias, compute_lse, dropout_p, is_causal, scale=None):
        B, H, Sq, D = q.shape
        Sk = k.shape[2]
        if bias is not None:
            align = 16 // bias.element_size()
            if tuple(bias.shape) != (B, H, Sq, Sk):
                raise RuntimeError(f"attn_bias shape {tuple(bias.shape)} != {(B, H, Sq, Sk)}")
            if bias.stride(-1) != 1:
                raise RuntimeError("attn_bias last dimension must be contiguous")
            for d in range(3):
                if bias.stride(d) % align:
                    raise RuntimeError(f"attn_bias is not correctly aligned (stride {bias.stride()})")
            if bias.data_ptr() % 16:
                raise RuntimeError("attn_bias pointer not 16-byte aligned")
            if bias.dtype != q.dtype:
                raise RuntimeError("attn_bias dtype differs from query")
        calls.append({"bias": None if bias is None else (tuple(bias.shape), bias.stride(),
                                                          bias.untyped_storage().nbytes()),
                      "is_causal": is_causal})
        s = q.double() @ k.double().transpose(-1, -2) * scale
        if is_causal:  # top-left: row i sees keys j <= i
            s = s.masked_fill(torch.arange(Sk).unsqueeze(0) > torch.arange(Sq).unsqueeze(1), float("-inf"))
        if bias is not None:
            s = s + bias.double()
        lse = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ v.double()
        rows = -(-Sq // 32) * 32
        lse_pad = torch.full((B, H, rows), float("inf"), dtype=torch.float32)
        lse_pad[..., :Sq] = lse.float()
        return out.to(q.dtype), lse_pad, torch.tensor(0), torch.tensor(0)

    return op


def _backends():
    out = ["cpu-flash", "math", "torch-efficient"]
    try:
        import triton_kernels  # noqa: F401

        out.append("triton")
    except Exception:
        pass
    return out


@pytest.fixture
def backend_env(monkeypatch):
    def use(backend):
        monkeypatch.setenv("STREAMATTN_KERNEL", backend)
        kernels.select_backend.cache_clear()
    yield use
    kernels.select_backend.cache_clear()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", _backends())
def test_masked_blocks_every_cpu_backend(backend_env, monkeypatch, backend, dtype):
    dt, tol = DTYPES[dtype]
    calls = []
    if backend == "torch-efficient":
        monkeypatch.setattr(kernels, "_efficient_op", lambda: fake_efficient_op(calls))
    backend_env(backend)
    gen = torch.Generator().manual_seed(3)
    for B, Hq, Hk, Sq, Sk, causal, qo, ko in CASES:
        q = torch.randn(B, Hq, Sq, 16, generator=gen).to(dt)
        k, v = (torch.randn(B, Hk, Sk, 16, generator=gen).to(dt) for _ in range(2))
        out, lse = kernels.attention_with_lse(q, k, v, scale=0.25, causal=causal, q_offset=qo, k_offset=ko)
        ro, rl, dead = reference(q, k, v, 0.25, causal, qo, ko)
        live = ~dead
        err = float((out.double()[live] - ro[live]).abs().max() / ro[live].abs().max())
        assert err <= tol, (backend, dtype, (Sq, Sk, qo, ko), err)
        assert float((lse.double()[live] - rl[live]).abs().max()) <= max(tol, 1e-4) * 10
        assert bool(torch.isneginf(lse[dead]).all()) and bool((out[dead] == 0).all())
    if backend == "torch-efficient":
        # square/top-left causal uses the kernel's is_causal (no O(S^2) bias); offsets use the bias
        assert any(c["is_causal"] and c["bias"] is None for c in calls)
        assert any(c["bias"] is not None for c in calls)


def test_efficient_bias_layout_and_alignment():
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for Sk in (1, 7, 13, 16, 33):
            B, H, Sq, diag = 3, 5, 9, 4
            bias = kernels.efficient_bias(B, H, Sq, Sk, diag, dt, torch.device("cpu"))
            align = 16 // bias.element_size()
            assert bias.shape == (B, H, Sq, Sk) and bias.stride(-1) == 1
            assert bias.stride(0) == bias.stride(1) == 0  # one mask for every batch and head
            assert bias.stride(2) % align == 0 and bias.stride(2) >= Sk
            assert bias.data_ptr() % 16 == 0
            assert bias.untyped_storage().nbytes() == Sq * bias.stride(2) * bias.element_size()
            i = torch.arange(Sq).unsqueeze(1)
            j = torch.arange(Sk).unsqueeze(0)
            want = torch.zeros(Sq, Sk).masked_fill(j > i + diag, float("-inf"))
            assert torch.equal(bias[1, 2].float(), want)


def test_negative_control_unpadded_bias_is_rejected():
    """The pre-fix bias (a dense [Sq, Sk] mask expanded) fails the kernel's alignment check for odd
    Sk: the stand-in is strict enough to catch it."""
    calls = []
    op = fake_efficient_op(calls)
    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 13, 8)
    dense = torch.zeros(5, 13).expand(1, 2, 5, 13)
    with pytest.raises(RuntimeError, match="aligned"):
        op(q, k, k, dense, True, 0.0, False, scale=0.3)
    assert math.isfinite(float(op(q, k, k, kernels.efficient_bias(1, 2, 5, 13, 3, q.dtype, q.device),
                                  True, 0.0, False, scale=0.3)[0].sum()))
