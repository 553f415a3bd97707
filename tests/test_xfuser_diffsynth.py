"""streamattn.compat.xfuser: the xDiT / yunchang stand-in, and DiffSynth-Studio's Wan USP path
(`WanVideoPipeline.enable_usp` + `model_fn_wan_video(use_unified_sequence_parallel=True)`, i.e. its
own xfuser code) on 4 gloo ranks against one process: bit-identical for Ulysses, <= 1e-6 for
Ring / USP, and a broken variant (zero-LSE Ring kernel) caught.

DiffSynth is pinned and installed without its dependencies by the README's test commands
(`pip install --no-deps diffsynth==2.1.12`). Inside the tasks, said as such (see
streamattn/testing/diffsynth_tasks.py): the dependencies the Wan DiT path never calls are stubbed
for diffsynth's imports only, and DiffSynth's two CPU-only blockers are patched (`initialize_usp`
knows only nccl/hccl -> the same calls with gloo; `torch.cpu.empty_cache` does not exist -> no-op).
"""
from __future__ import annotations

import importlib.util
import sys

import pytest

NEEDS = "pip install --no-deps diffsynth==2.1.12 (the README's test commands do)"


def test_install_registers_the_modules_and_uninstall_removes_them():
    import streamattn.compat.xfuser as sx

    had = {m: sys.modules.get(m) for m in ("xfuser", "yunchang")}
    real_yunchang = importlib.util.find_spec("yunchang") is not None  # install() leaves it alone
    names = sx.install()
    try:
        for n in ("xfuser.core.distributed", "xfuser.core.long_ctx_attention",
                  "yunchang.kernels", "yunchang.comm.all_to_all"):
            # importable (the stand-in, or the real package install() leaves alone: not yet
            # imported when this test runs first, so not in sys.modules)
            assert importlib.import_module(n) is not None, n
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.kernels import AttnType

        assert AttnType.FA.value == "fa" and xFuserLongContextAttention is sx.xFuserLongContextAttention
        assert set(names) >= {"xfuser", "yunchang"} or (real_yunchang and "xfuser" in names)
    finally:
        sx.uninstall()
    # every stand-in is gone again (a real package imported above may stay)
    assert not [n for n in names if getattr(sys.modules.get(n), "__streamattn_standin__", False)]
    assert sys.modules.get("xfuser") is had["xfuser"]


@pytest.mark.parametrize("u,r", [(4, 1), (2, 2), (1, 4)])
def test_xfuser_api_on_ranks(rank_pool, u, r):
    res = rank_pool(4).run("streamattn.testing.diffsynth_tasks:xfuser_api", timeout=300,
                           ulysses_degree=u, ring_degree=r)
    for rank, x in enumerate(res):
        assert x["sp_rank"] == rank and x["sp_size"] == 4 and x["ulysses_size"] == u
        assert x["gathered"] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
        assert x["a2a_ok"] and x["roundtrip_ok"], x


def _need_diffsynth():
    if importlib.util.find_spec("diffsynth") is None:
        pytest.fail(f"diffsynth is not installed: {NEEDS}")


@pytest.mark.parametrize("u,r,tol", [(4, 1, 0.0), (2, 2, 1e-6), (1, 4, 1e-6)])
def test_diffsynth_wan_usp_4_ranks_vs_1(rank_pool, u, r, tol):
    _need_diffsynth()
    res = rank_pool(4).run("streamattn.testing.diffsynth_tasks:wan_model", timeout=600,
                           ulysses_degree=u, ring_degree=r)
    for x in res:
        assert x["sp_world_size"] == 4
        if tol == 0.0:
            assert x["bit_identical"], x
        assert x["max_abs_diff"] <= tol, x


def test_diffsynth_negative_control_zero_lse_ring(rank_pool):
    _need_diffsynth()
    res = rank_pool(4).run("streamattn.testing.diffsynth_tasks:wan_model", timeout=600,
                           ulysses_degree=1, ring_degree=4, negative_control=True)
    assert res[0]["max_abs_diff"] > 1e-3, res[0]


@pytest.mark.parametrize("u,r", [(4, 1), (2, 2), (1, 4)])
def test_diffsynth_wan_video_pipeline_4_ranks_vs_1(rank_pool, u, r):
    """The whole WanVideoPipeline (tiny umT5, tiny VAE, prompt + negative prompt with CFG 5,
    3 steps, 5 frames of 64x64): Ulysses bit-identical; USP / Ring: final latents within 1e-6 of
    max |latents| (measured 6e-7..7e-7), the decoded video within 1e-5 (fp32 bar; measured up to
    4.4e-6: CFG x5 and the VAE amplify the rounding)."""
    _need_diffsynth()
    x = rank_pool(4).run("streamattn.testing.diffsynth_tasks:wan_pipeline", timeout=900,
                         ulysses_degree=u, ring_degree=r)[0]
    print(f"WanVideoPipeline {u}x{r}: latents {x['latents_max_abs_diff']:.3g} "
          f"(max {x['latents_max_abs_ref']:.3g}), video {x['max_abs_diff']:.3g}")
    assert x["sp_world_size"] == 4 and x["std"] > 0.01
    if u == 4:
        assert x["bit_identical"] and x["latents_bit_identical"], x
    assert x["latents_max_abs_diff"] <= 1e-6 * x["latents_max_abs_ref"], x
    assert x["max_abs_diff"] <= 1e-5 * x["max_abs_ref"], x


def test_diffsynth_wan_video_pipeline_negative_control(rank_pool):
    _need_diffsynth()
    x = rank_pool(4).run("streamattn.testing.diffsynth_tasks:wan_pipeline", timeout=900,
                         ulysses_degree=1, ring_degree=4, negative_control=True)[0]
    assert x["latents_max_abs_diff"] > 1e-3 * x["latents_max_abs_ref"], x
    assert x["max_abs_diff"] > 1e-3, x
