"""The CPU example a new user runs: `python -m streamattn.examples.tiny_flux` (tiny arguments;
the printed table is the same data as --json)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")


def test_tiny_flux_example_runs(capsys):
    from streamattn.examples import tiny_flux

    rc = tiny_flux.main(["--nproc", "2", "--size", "8", "--text-len", "8", "--heads", "4",
                         "--head-dim", "16", "--steps", "3", "--repeats", "1", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    r0 = res["ranks"][0]
    assert len(r0["t_single"]) == len(res["t_exact_max"]) == len(res["t_stale_max"]) == 3
    assert max(r0["exact_vs_single_x"]) < 1e-4 and max(r0["exact_vs_single_v"]) < 1e-4
    assert r0["stale_vs_exact_x"][0] == 0.0                  # the warm-up step is exact
    assert 0 < max(r0["stale_vs_exact_v"][1:]) < 5e-2        # then approximate, close
