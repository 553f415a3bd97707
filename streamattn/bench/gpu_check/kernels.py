"""Every local kernel backend against a float64 reference of the LSE contract (rank 0, section
`kernel`)."""
from __future__ import annotations

import math
import os

from .cases import CPU_BACKENDS, HALF_ONLY, KERNEL_CASES, KERNEL_TOL
from .results import short


def reference_lse(q, k, v, scale, causal, q_offset, k_offset):
    """float64 (out, lse) of the LSE contract, written independently of streamattn.kernels."""
    import torch

    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + q_offset
        j = torch.arange(k.shape[2], device=q.device).unsqueeze(0) + k_offset
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isneginf(lse)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, vd)
    out = torch.where(dead.unsqueeze(-1), torch.zeros_like(out), out)
    return out, lse, dead


def _backend_usable(backend, device):
    from streamattn import kernels

    if device.type == "cpu":
        return backend in CPU_BACKENDS, "CPU self-test"
    if backend == "cpu-flash":
        return False, "CPU only"
    if backend == "flash-attn" and kernels.flash_attn_func() is None:
        return False, "flash-attn not installed (or built for another torch)"
    if backend == "triton":
        from streamattn import triton_kernels

        if not triton_kernels.available():
            return False, "triton not importable"
    return True, ""


def check_kernels(res, device, dtypes, backends, watch=None):
    import torch

    from streamattn import config, kernels

    with config.override(STREAMATTN_KERNEL=os.environ.get("STREAMATTN_KERNEL")):  # restored after
        gen = torch.Generator(device="cpu").manual_seed(0)
        try:
            for backend in backends:
                ok, why = _backend_usable(backend, device)
                if not ok:
                    res.add("kernel", backend, "N/A", why)
                    continue
                os.environ["STREAMATTN_KERNEL"] = backend
                kernels.select_backend.cache_clear()
                for dname in dtypes:
                    dt = getattr(torch, dname)
                    if backend in HALF_ONLY and dname == "float32":
                        res.add("kernel", f"{backend} {dname}", "N/A", "fp16/bf16 only")
                        continue
                    tol_out, tol_lse = KERNEL_TOL[dname]
                    for name, B, Hq, Hk, Sq, Sk, D, causal, qo, ko in KERNEL_CASES:
                        check = f"{backend} {dname} {name}"
                        if watch is not None:
                            watch("kernel", check)
                        try:
                            q = torch.randn(B, Hq, Sq, D, generator=gen).to(device, dt)
                            k = torch.randn(B, Hk, Sk, D, generator=gen).to(device, dt)
                            v = torch.randn(B, Hk, Sk, D, generator=gen).to(device, dt)
                            scale = D ** -0.5
                            out, lse = kernels.attention_with_lse(q, k, v, scale=scale, causal=causal,
                                                                  q_offset=qo, k_offset=ko)
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)
                            ro, rl, dead = reference_lse(q, k, v, scale, causal, qo, ko)
                            problems = []
                            if tuple(out.shape) != tuple(q.shape) or out.dtype != dt:
                                problems.append(f"out {tuple(out.shape)} {out.dtype}")
                            if tuple(lse.shape) != (B, Hq, Sq) or lse.dtype != torch.float32:
                                problems.append(f"lse {tuple(lse.shape)} {lse.dtype} (want float32)")
                            live = ~dead
                            e_out = e_lse = 0.0
                            if bool(live.any()):
                                ref_live = ro[live]
                                e_out = float((out.double()[live] - ref_live).abs().max()
                                              / ref_live.abs().max().clamp_min(1e-30))
                                e_lse = float((lse.double()[live] - rl[live]).abs().max())
                            if bool(dead.any()):
                                if not bool(torch.isneginf(lse[dead]).all()):
                                    problems.append("dead rows: lse not -inf")
                                if not bool((out[dead] == 0).all()):
                                    problems.append("dead rows: out not 0")
                            if not math.isfinite(e_out) or e_out > tol_out:
                                problems.append(f"out err {e_out:.2e} > {tol_out:.0e}")
                            if not math.isfinite(e_lse) or e_lse > tol_lse:
                                problems.append(f"lse err {e_lse:.2e} > {tol_lse:.0e}")
                            detail = f"out {e_out:.1e} lse {e_lse:.1e} dead rows {int(dead.sum())}"
                            res.add("kernel", check, "FAIL" if problems else "PASS",
                                    "; ".join(problems) + (" | " if problems else "") + detail)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            res.add("kernel", check, "ERROR", short(exc))
        finally:
            if watch is not None:
                watch.cancel()
            kernels.select_backend.cache_clear()
