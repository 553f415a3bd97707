"""streamattn.bench.gpu_check (the package) on a CPU box: it imports, skips cleanly (exit 0) without a GPU
(`python -m streamattn.bench.gpu_check` and the checkout shim bench/gpu_check.py), and its own code
paths work (--cpu-selftest: cpu-flash / math kernels, gloo with the torch and shm transports). None
of this says anything about GPUs; the script's GPU results come only from running it on one."""
from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PACKAGE = "streamattn.bench.gpu_check"
COMMAND = [sys.executable, "-m", PACKAGE]  # its __main__.py
SHIM = os.path.join(ROOT, "bench", "gpu_check.py")  # runpy.run_module of the package


def _load(submodule=None):
    return importlib.import_module(PACKAGE + (f".{submodule}" if submodule else ""))


def test_module_imports():
    mod = _load()
    assert callable(mod.main) and set(mod.ALGORITHMS) >= {"ulysses", "ring", "usp", "torus"}
    assert mod.parse_args(["--no-bench"]).no_bench


def test_skips_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    # the shim imports the package from sys.path like an installed one: this checkout's first
    shim_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for cmd, cmd_env in ((COMMAND, env), ([sys.executable, SHIM], shim_env)):
        out = subprocess.run(cmd, capture_output=True, text=True, env=cmd_env, timeout=300)
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


def test_cpu_selftest_distributed_two_ranks(tmp_path):
    # the way main() spawns one rank per GPU: torchrun -m the package
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", PACKAGE, "--cpu-selftest", "--no-kernels", "--algorithms", "ulysses,ring,torus",
           "--bench-seq", "128", "--bench-joint", "8", "--bench-heads", "4", "--bench-dim", "16",
           "--bench-dtype", "float32", "--bench-iters", "2", "--bench-warmup", "1",
           "--json", str(tmp_path / "rows.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", STREAMATTN_TIMEOUT_S="60",
                                  TMPDIR=str(tmp_path)))  # torchrun's log directory
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for transport in ("torch", "shm", "inorder", "shm-device"):
        for algo in ("ulysses", "ring", "torus"):
            hits = [l for l in lines if l.startswith("dist") and f"{transport:<7} {algo:<7}" in l]
            assert len(hits) == 2 and all(" PASS " in l for l in hits), hits
            assert any(l.startswith("bench") and f"{transport:<7} {algo:<7} latency" in l
                       and "median" in l for l in lines)
    assert "gpu_check: PASS" in out.stdout
    assert any(l.startswith("final") and " PASS " in l for l in lines)  # heaps closed, group destroyed
    import json

    data = json.loads((tmp_path / "rows.json").read_text())
    assert data["complete"] and data["code"] == 0


def test_rows_survive_a_kill_mid_run(tmp_path):
    """Rows are printed as measured and the JSON rewritten atomically after each: SIGKILL half-way
    leaves the rows printed so far and a readable JSON (complete: false)."""
    import json
    import signal
    import time

    out = tmp_path / "rows.json"
    proc = subprocess.Popen([*COMMAND, "--cpu-selftest", "--no-bench", "--json", str(out)],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if sum(l.startswith("kernel ") for l in seen) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(30)
    rest = proc.stdout.read()
    proc.stdout.close()
    printed = [l for l in seen + rest.splitlines(True) if l.startswith("kernel ")]
    assert proc.returncode == -signal.SIGKILL and len(printed) >= 3, seen
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["env"]["torch"]
    assert len([r for r in data["rows"] if r["section"] == "kernel"]) >= 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".gpu_check.")]  # no temp left


def test_watchdog_ends_a_hung_case(tmp_path):
    import json

    out = tmp_path / "rows.json"
    code = (
        "import importlib, sys, time\n"
        f"g = importlib.import_module({PACKAGE!r})\n"
        "def hang(res, device, watch=None):\n"
        "    watch('local', 'a case that hangs'); time.sleep(60)\n"
        "g.check_single_rank = hang\n"
        f"sys.exit(g.main(['--cpu-selftest', '--no-kernels', '--case-timeout', '2', '--json', {str(out)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 124, r.stdout + r.stderr
    assert "TIMEOUT" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows[-1]["status"] == "TIMEOUT" and rows[-1]["check"] == "a case that hangs"


def test_transport_not_used_after_its_first_error(monkeypatch):
    mod = _load()
    calls = []

    def case(rank, world, device, algorithm, **kw):
        calls.append((os.environ["STREAMATTN_TRANSPORT"], algorithm))
        if os.environ["STREAMATTN_TRANSPORT"] == "shm" and algorithm == "ring":
            raise RuntimeError("peer 1 vanished")
        return 0.0, os.environ["STREAMATTN_TRANSPORT"]

    distributed = _load("distributed")  # check_distributed looks these up in its own module
    monkeypatch.setattr(distributed, "_one_dist_case", case)
    monkeypatch.setattr(distributed, "gather", lambda obj, group: [obj])
    res = mod.Results(echo=False)
    broken = mod.Broken()
    mod.check_distributed(res, 0, 2, torch.device("cpu"), ["shm", "inorder"], ["ulysses", "ring", "torus"],
                          "float32", None, broken)
    status = {r["check"]: r["status"] for r in res.rows}
    assert status["shm     ring    causal"] == "ERROR" or status["shm     ring    gqa-joint-uneven"] == "ERROR"
    assert all(v == "SKIP" for k, v in status.items() if k.startswith("shm     torus"))
    assert all(v == "PASS" for k, v in status.items() if k.startswith("inorder"))
    assert ("shm", "torus") not in calls
    # NCCL itself failing stops every other transport too
    broken.mark("torch", "NCCL watchdog fired")
    assert "NCCL (torch) failed earlier" in broken.reason("inorder")


def test_prebuild_failure_drops_nvshmem_device(monkeypatch):
    import types

    import torch.distributed as dist

    mod = _load()

    def fail():
        raise RuntimeError("the NVSHMEM extension needs a CUDA GPU")

    lifecycle = _load("lifecycle")  # prebuild_extension looks these up in its own module
    monkeypatch.setattr(lifecycle, "_csrc_build", lambda: types.SimpleNamespace(load_extension=fail))
    monkeypatch.setattr(lifecycle, "gather", lambda obj, group: [obj])
    monkeypatch.setattr(dist, "barrier", lambda group=None: None)
    res, broken = mod.Results(echo=False), mod.Broken()
    mod.prebuild_extension(res, 0, None, broken, seconds=60)
    assert res.rows[-1]["status"] == "ERROR" and "CUDA GPU" in res.rows[-1]["detail"]
    assert "CUDA GPU" in broken.reason("nvshmem-device") and broken.reason("nvshmem") is None
