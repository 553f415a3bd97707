"""bench/gpu_check.py on a CPU box: it imports, skips cleanly (exit 0) without a GPU, and its own code
paths work (--cpu-selftest: cpu-flash / math kernels, gloo with the torch and shm transports). None
of this says anything about GPUs; the script's GPU results come only from running it on one."""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "bench", "gpu_check.py")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_imports():
    mod = _load()
    assert callable(mod.main) and set(mod.ALGORITHMS) >= {"ulysses", "ring", "usp", "torus"}
    assert mod.parse_args(["--no-bench"]).no_bench


def test_skips_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "SKIP" in out.stdout and "no CUDA GPU visible" in out.stdout
    assert "PASS" not in out.stdout  # nothing was claimed


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-box check")
def test_main_returns_zero_without_gpu(capsys):
    assert _load().main([]) == 0
    assert "SKIP" in capsys.readouterr().out


def test_cpu_selftest_kernels_pass(tmp_path):
    mod = _load()
    out = tmp_path / "rows.json"
    assert mod.main(["--cpu-selftest", "--no-bench", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    kern = [r for r in rows if r["section"] == "kernel"]
    assert len(kern) == 2 * len(mod.KERNEL_CASES) and all(r["status"] == "PASS" for r in kern)
    assert any("dead rows 120" in r["detail"] for r in kern)


def test_cpu_selftest_negative_control(monkeypatch, capsys):
    """A kernel that returns LSE = 0 must make the check FAIL and the exit code 1."""
    from streamattn import kernels

    real = kernels._RUNNERS["math"]

    def zero_lse(*a):
        out, lse = real(*a)
        return out, torch.zeros_like(lse)

    monkeypatch.setitem(kernels._RUNNERS, "math", zero_lse)
    assert _load().main(["--cpu-selftest", "--no-bench", "--backends", "math"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "lse err" in text and "gpu_check: FAIL" in text


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed next to this python")
def test_cpu_selftest_distributed_two_ranks():
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), SCRIPT,
           "--cpu-selftest", "--no-kernels", "--algorithms", "ulysses,ring,torus",
           "--bench-seq", "128", "--bench-joint", "8", "--bench-heads", "4", "--bench-dim", "16",
           "--bench-dtype", "float32", "--bench-iters", "2", "--bench-warmup", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", STREAMATTN_TIMEOUT_S="60"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for transport in ("torch", "shm"):
        for algo in ("ulysses", "ring", "torus"):
            hits = [l for l in lines if l.startswith("dist") and f"{transport:<7} {algo:<7}" in l]
            assert len(hits) == 2 and all(" PASS " in l for l in hits), hits
            assert any(l.startswith("bench") and f"{transport:<7} {algo:<7} latency" in l
                       and "median" in l for l in lines)
    assert "gpu_check: PASS" in out.stdout
