"""`streamattn bench --backward`: forward+backward side by side with the gradient error."""
from __future__ import annotations

import subprocess
import sys


def test_bench_backward_runs():
    res = subprocess.run([sys.executable, "-m", "streamattn.cli", "bench", "--backward", "--nproc", "2",
                          "--seq", "32", "--heads", "2", "--head-dim", "8", "--iters", "1",
                          "--algorithms", "ulysses,ring,yunchang"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0] + " " + line.split()[1]: line for line in res.stdout.splitlines()
            if line.startswith(("ring ", "ulysses ", "yunchang "))}
    for name in ("ring 1x2", "ulysses 2x1"):
        err = float(rows[name].split()[3])
        assert err < 1e-5, rows[name]
