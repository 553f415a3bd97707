"""streamattn.cpu_malloc: a CPU group's first call keeps freed heap memory in the process, so the
next call's buffers are not faulted in (and zeroed by the kernel) again. Each case runs in a fresh
interpreter: the allocator's thresholds are process-wide and set once."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# Buffers of a call's sizes, freed together. Before anything is measured the process is put in
# glibc's default state, but fixed (no dynamic thresholds): mmap at 128 KiB and more, trim at
# 128 KiB free, which is what a fresh process does until its first large free and therefore
# makes the "before" count deterministic (the negative control: the count sees faults).
PROBE = r"""
import ctypes, json, resource, sys, torch
from streamattn import cpu_malloc
mallopt = ctypes.CDLL(None).mallopt
assert (mallopt(cpu_malloc.M_MMAP_THRESHOLD, 128 << 10) == 1
        and mallopt(cpu_malloc.M_TRIM_THRESHOLD, 128 << 10) == 1)

def faults_per_cycle():
    def cycle():
        xs = [torch.empty(n).fill_(1.0) for n in (1 << 20, 3 << 18, 1 << 19, 1 << 20)]
        del xs
    for _ in range(3):
        cycle()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        cycle()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20

before = faults_per_cycle()
state = cpu_malloc.apply()
print(json.dumps({"before": before, "state": state, "again": cpu_malloc.apply(),
                  "after": faults_per_cycle()}))
"""
PAGES = (4 << 20) * 3.75 / 4096  # the bytes of one cycle's buffers, in 4 KiB pages


def probe(setting=None):
    env = dict(os.environ)
    env.pop("STREAMATTN_CPU_MALLOC", None)
    if setting is not None:
        env["STREAMATTN_CPU_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_retain_stops_refaulting_the_buffers_of_each_call():
    r = probe()
    assert r["before"] > 0.5 * PAGES, r  # negative control: the fixed defaults fault every page
    assert r["state"] == r["again"] == "retain"
    assert r["after"] < 0.02 * PAGES, r


def test_system_leaves_the_allocator_alone():
    r = probe("system")
    assert r["state"] == "system"
    assert r["after"] > 0.5 * PAGES, r


def test_a_cpu_group_call_retains_freed_memory(rank_pool):
    res = rank_pool(2).run("streamattn.testing.cases:cpu_malloc_state")
    assert [r["state"] for r in res] == ["retain", "retain"]
