"""`streamattn probe --nproc N` (spawned local ranks) and `streamattn probe` inside torchrun: both
print the topology matrix and write the JSON file (0600)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from streamattn.cli import main


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", STREAMATTN_PROBE_BYTES=str(1 << 16))
    env.pop("STREAMATTN_TOPOLOGY", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _check(out: str, path, world: int, how: str):
    assert "r0" in out and f"r{world - 1}" in out and "Legend" in out, out
    assert how in out, out
    d = json.loads(path.read_text())
    assert d["topology"]["world_size"] == world
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_probe_nproc_spawns_ranks(tmp_path):
    path = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, "-m", "streamattn.cli", "probe", "--nproc", "2",
                        "--out", str(path)], capture_output=True, text=True, timeout=300, env=_env(),
                       cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    _check(p.stdout, path, 2, "probe by 2 spawned gloo ranks")
    assert "measured" in json.dumps(json.loads(path.read_text())["topology"])


def test_probe_inside_torchrun(tmp_path):
    path = tmp_path / "probe.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "streamattn.cli", "probe", "--out", str(path)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                       env=dict(_env(), TMPDIR=str(tmp_path)), cwd=str(tmp_path))  # torchrun's logs
    assert p.returncode == 0, p.stdout + p.stderr
    _check(p.stdout, path, 2, "probe by the launched group (2 ranks")
    assert p.stdout.count("Legend") == 1  # rank 0 alone reports


def test_probe_in_group_rejects_nproc(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["probe", "--nproc", "2", "--out", "-"]) == 2
    assert "do not apply" in capsys.readouterr().err
