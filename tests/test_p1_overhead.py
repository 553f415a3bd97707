"""Issue 12: on a group of one the op costs what the local kernel costs (within 2%)."""
from __future__ import annotations

import time

from streamattn import algorithms
from streamattn.testing.cases import overhead_p1

# a ~60-100 ms kernel on 2 cores; the paired ratio (overhead_p1) spreads 0.986-1.016 between runs
# here, so a ratio above the bar is measured once more and the better of the two counts: a real
# overhead of 2% shows in both
SHAPE = dict(seq=2048, heads=16, head_dim=64, iters=15)
BAR = 1.02


def op_over_kernel() -> dict:
    r = overhead_p1(0, 1, **SHAPE)
    if r["ratio"] > BAR:
        r = min(r, overhead_p1(0, 1, **SHAPE), key=lambda x: x["ratio"])
    return r


def test_p1_overhead_within_2_percent_of_the_kernel():
    r = op_over_kernel()
    assert r["ratio"] <= BAR, r


def test_p1_overhead_check_sees_a_planted_8_percent(monkeypatch):
    """Negative control: 8% of the kernel's time added to every call of the op is measured above
    the bar (measured 1.08-1.09 here). The ratio of two separate medians once measured it at 1.007
    on CI's machine, a slow stretch landing on the kernel's half; the paired ratio holds."""
    kernel_s = overhead_p1(0, 1, **SHAPE)["kernel_s"]
    real = algorithms.attend

    def slower(*a, **kw):
        out = real(*a, **kw)
        end = time.perf_counter() + 0.08 * kernel_s
        while time.perf_counter() < end:
            pass
        return out

    monkeypatch.setattr(algorithms, "attend", slower)
    r = op_over_kernel()
    assert r["ratio"] > BAR, r
