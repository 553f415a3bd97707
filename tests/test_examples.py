"""The CPU example a new user runs: `python -m streamattn.examples.tiny_flux` (tiny arguments).
The test lends main() the session's rank pool instead of spawning one (same task, same output)."""
from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("diffusers")


@pytest.mark.parametrize("P", [2])
def test_tiny_flux_example_runs(rank_pool, monkeypatch, capsys, P):
    import streamattn.testing
    from streamattn.examples import tiny_flux

    pool = rank_pool(P)
    monkeypatch.setattr(streamattn.testing, "RankPool",
                        lambda n, **kw: contextlib.nullcontext(pool) if n == P else None)
    rc = tiny_flux.main(["--nproc", str(P), "--size", "8", "--text-len", "8", "--heads", "4",
                         "--head-dim", "16", "--steps", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [l.split() for l in out.splitlines() if l[:4].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    exact_vs_1, stale_v = [float(r[4]) for r in rows], [float(r[5]) for r in rows]
    assert max(exact_vs_1) < 1e-4, out
    assert stale_v[0] == 0.0 and 0 < max(stale_v[1:]) < 5e-2, out   # warm-up exact, then close
    assert "after warm-up" in out
