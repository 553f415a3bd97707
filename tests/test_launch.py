"""`streamattn launch --emulate 2x2 -- ...`: on an emulated 2-node cluster every node runs
`torchrun --rdzv-backend c10d` as its own host; in that group `streamattn probe` finds 2 nodes,
`python -m streamattn.bench` runs a sweep and the tiny Flux pipeline example runs (4 ranks == 1 rank).
Each launch leaves no namespace, link or lock behind. Skips with the reason without root / netns."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import pytest

from streamattn.bench.cluster import unavailable_reason


@pytest.fixture(scope="module")
def emulated():
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"emulated cluster unavailable: {reason}")


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "STREAMATTN_TOPOLOGY")}
    env.update(OMP_NUM_THREADS="1", STREAMATTN_PROBE_BYTES=str(1 << 20))
    return env


def _torchelastic_dirs() -> set:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "torchelastic_*")))


def _leftovers(pid: int):
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    locks = os.listdir("/run/streamattn") if os.path.isdir("/run/streamattn") else []
    return ([line for line in ns.splitlines() if f"streamattn-{pid}-" in line]
            + [line for line in links.splitlines() if f"{pid:06x}" in line.split(":")[1]]
            + [f for f in locks if f.startswith(f"{pid}-")])


def _launch(args, tmp_path, timeout=900):
    argv = [sys.executable, "-m", "streamattn.cli", "launch", "--emulate", "2x2",
            "--inter-bw", "500mbit", "--"] + args
    before = _torchelastic_dirs()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(), cwd=str(tmp_path))
    try:
        out, _ = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _leftovers(p.pid) == [], "launch left emulated-cluster objects behind"
    assert _torchelastic_dirs() - before == set(), "launch left torchrun log directories behind"
    return p.returncode, out


def test_launch_probe_finds_two_nodes(emulated, tmp_path):
    rc, out = _launch(["-m", "streamattn.cli", "probe", "--out", str(tmp_path / "probe.json")], tmp_path)
    assert rc == 0, out
    assert "2 node(s) x 2 rank(s)" in out and "ETH" in out, out
    assert "Host sa-node0" in out
    d = json.loads((tmp_path / "probe.json").read_text())
    assert d["topology"]["world_size"] == 4
    assert "STREAMATTN_TOPOLOGY" not in out  # nothing declared: the nodes come from host identities


def test_launch_bench_sweep(emulated, tmp_path):
    args = ["-m", "streamattn.bench", "--seq", "256", "--heads", "4", "--head-dim", "16",
            "--joint-len", "16", "--iters", "1", "--no-overlap", "--algorithms", "auto,ulysses,usp",
            "--out", str(tmp_path / "bench")]
    rc, out = _launch(args, tmp_path)
    assert rc == 0, out
    assert "2 node(s) x 2" in out and "usp 2x2" in out, out
    recs = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert recs


def test_launch_flux_pipeline(emulated, tmp_path):
    rc, out = _launch(["-m", "streamattn.examples.pipeline", "--out", str(tmp_path / "flux.png"),
                       "--no-baseline", "--steps", "2"], tmp_path)
    assert rc == 0, out
    assert "max |pixel difference|" in out and ": OK;" in out, out
    assert (tmp_path / "flux.png").read_bytes()[:4] == b"\x89PNG"


def test_launch_bad_arguments_fail_fast(capsys):
    from streamattn.bench.launcher import parse_shape
    from streamattn.cli import main

    assert parse_shape("2x4") == (2, 4)
    assert main(["launch", "--emulate", "2x", "--", "-m", "x"]) == 2
    assert "NODESxPROCS" in capsys.readouterr().err
    assert main(["launch", "--emulate", "2x2"]) == 2
    assert "nothing to run" in capsys.readouterr().err
    # a bad MTU is refused before any namespace exists (root or not), by launch and by bench
    assert main(["launch", "--emulate", "2x2", "--mtu", "100", "--", "-m", "x"]) == 2
    assert "mtu must be an integer in [576, 65535], got 100" in capsys.readouterr().err
    assert main(["bench", "--emulate", "2x2", "--mtu", "70000"]) == 2
    assert "bad --emulate/--inter-bw/--intra-bw/--mtu" in capsys.readouterr().err
    # so is a congestion control that is not a name
    assert main(["launch", "--emulate", "2x2", "--congestion-control", "cubic;x", "--", "-m", "x"]) == 2
    assert "--congestion-control must be a name" in capsys.readouterr().err
    assert main(["bench", "--emulate", "2x2", "--congestion-control", "Cubic"]) == 2
    assert "--congestion-control must be a name" in capsys.readouterr().err


def test_torchrun_argv_is_the_real_multi_node_command():
    """What each emulated node runs is the README's real-node command plus --local-addr."""
    from streamattn.bench.launcher import torchrun_argv

    class FakeCluster:
        nodes, ranks_per_node = 2, 4

        def node_ip(self, k):
            return f"198.18.0.{10 + k}"

    argv = torchrun_argv(FakeCluster(), 1, ["-m", "streamattn.bench"], port=29500, rdzv_id="j")
    s = " ".join(argv)
    assert "--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 198.18.0.10:29500" in s
    assert "--local-addr 198.18.0.11" in s and "is_host=false" in s
    assert f"--log-dir {os.devnull}" in s
    assert argv[-2:] == ["-m", "streamattn.bench"]
