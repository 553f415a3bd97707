"""streamattn.attention in one process against the float64 reference (rank 0, section `local`)."""
from __future__ import annotations

from .cases import DIST_TOL
from .results import short


def check_single_rank(res, device, watch=None):
    """streamattn.attention in one process (no process group: the local path every rank of a
    group of one takes), causal and joint tokens, against the float64 reference."""
    import torch

    import streamattn
    from streamattn.reference import reference_attention

    gen = torch.Generator().manual_seed(5)
    for dname in ("float32", "bfloat16") if device.type == "cuda" else ("float32",):
        dt = getattr(torch, dname)
        for name, causal, T in (("causal", True, 0), ("joint", False, 13)):
            check = f"local {dname} {name}"
            if watch is not None:
                watch("local", check)
            try:
                q, k, v = (torch.randn(1, 203, 8, 64, generator=gen, dtype=torch.float64) for _ in range(3))
                kw = {}
                if T:
                    j = [torch.randn(1, T, 8, 64, generator=gen, dtype=torch.float64) for _ in range(3)]
                    kw = dict(joint_q=j[0], joint_k=j[1], joint_v=j[2])
                ref = reference_attention(q, k, v, causal=causal, **kw)
                ref = ref[0] if T else ref
                args = [t.to(device, dt) for t in (q, k, v)]
                out = streamattn.attention(*args, causal=causal,
                                           **{n: t.to(device, dt) for n, t in kw.items()})
                out = out[0] if T else out
                err = float((out.double().cpu() - ref).abs().max() / ref.abs().max())
                tol = DIST_TOL[dname]
                res.add("local", check, "PASS" if err <= tol else "FAIL", f"max err {err:.2e} (tol {tol:.0e})")
            except Exception as exc:  # noqa: BLE001
                res.add("local", check, "ERROR", short(exc))
    if watch is not None:
        watch.cancel()
