"""CPU calibration: what the local kernel, copies and merges cost on this machine.

Measured in the process that plans (per process; the api makes every rank use rank 0's numbers)
and cached per process. `load_cache` / `save_cache` keep a machine's calibration as JSON under
STREAMATTN_CACHE_DIR (mode 0600, written atomically, validated on load).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional, Tuple

import torch

from . import config
from .files import write_private
from .datasheet import DEVICE_MEMORY_BW
from .schedule import as_dtype, attention_flops
from .sharding import run_granule
from .topology import Topology

_CPU_RATE: Dict[tuple, float] = {}


SLOW_KERNEL_S = 0.005  # one [1, 1, 64, 64] call: ~50 us natively, 0.1 s and more interpreted


def measure_cpu_rate(dtype=torch.float32, *, refresh: bool = False) -> float:
    """FLOP/s of this process's local CPU attention kernel (`kernels.attention_with_lse`), timed
    once per process on a small shape ([1, 4, 512, 64], best of 5 after 2 warm-ups) and cached.
    Rounded to 2 significant digits. Differs between processes: see `planner.make_plan`.
    A kernel that needs over SLOW_KERNEL_S for a [1, 1, 64, 64] block (Triton under
    TRITON_INTERPRET=1) is timed on that block only: the full probe took 38 s there."""
    dt = as_dtype(dtype)
    key = (dt, torch.get_num_threads())
    if key in _CPU_RATE and not refresh:
        return _CPU_RATE[key]
    from .kernels import attention_with_lse

    def best(B, H, S, D, warm, reps):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(dt) for _ in range(3))
        for _ in range(warm):
            attention_with_lse(q, k, v, scale=D ** -0.5)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            attention_with_lse(q, k, v, scale=D ** -0.5)
            times.append(time.perf_counter() - t0)
        return attention_flops(B, S * S, H, D) / max(min(times), 1e-9), min(times)

    rate, small_s = best(1, 1, 64, 64, 1, 2)
    if small_s <= SLOW_KERNEL_S:
        rate = best(1, 4, 512, 64, 2, 5)[0]
    rate = float(f"{rate:.2g}")
    _CPU_RATE[key] = rate
    return rate


_CPU_MEM: Dict[int, float] = {}


def measure_cpu_memory_bandwidth(*, refresh: bool = False) -> float:
    """Bytes/s of a 32 MiB float32 tensor copy in this process (read + write counted),
    best of 5, cached per process, 2 significant digits."""
    key = torch.get_num_threads()
    if key in _CPU_MEM and not refresh:
        return _CPU_MEM[key]
    src = torch.ones(8 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    bw = float(f"{2 * src.numel() * 4 / max(min(times), 1e-9):.2g}")
    _CPU_MEM[key] = bw
    return bw


def resolve_memory_bandwidth(topology: Topology, memory_bandwidth: Optional[float]) -> Tuple[Optional[float], str]:
    """(bytes/s per rank, source) of local memory: given, else the device table, else measured on
    a CPU topology, else None (memory-bound work not modelled)."""
    if memory_bandwidth is not None:
        if not memory_bandwidth > 0:
            raise ValueError(f"memory_bandwidth must be > 0 B/s, got {memory_bandwidth!r}")
        return float(memory_bandwidth), "given"
    dev = (topology.device or "").upper()
    for key, bw, src in DEVICE_MEMORY_BW:
        if key.upper() in dev:
            return bw, src
    if dev in ("", "CPU", "EMULATED") and not topology.peak_flops:
        return measure_cpu_memory_bandwidth(), "measured:local CPU copy (streamattn.costmodel)"
    return None, "unknown device: memory-bound work not modelled"


def resolve_rate(topology: Topology, compute_rate: Optional[float], dtype=torch.float32) -> Tuple[float, str]:
    """(FLOP/s per rank, where it comes from): compute_rate, else topology.peak_flops, else the
    measured CPU rate (per process!)."""
    if compute_rate is not None:
        if not compute_rate > 0:
            raise ValueError(f"compute_rate must be > 0 FLOP/s, got {compute_rate!r}")
        return float(compute_rate), "given"
    if topology.peak_flops:
        return float(topology.peak_flops), topology.peak_flops_source or "topology peak_flops"
    return measure_cpu_rate(dtype), "measured:local CPU kernel (streamattn.calibration.measure_cpu_rate)"



# ------------------------------------------------------------------------- block-shape calibration
# The kernel's rate depends on the block shape (a [1, 4, 512, 64] probe runs at a different rate
# than a [1, 6, 4096, 32] Ulysses block or a [1, 24, 1024, 32] ring block), and on a CPU every rank
# of the machine computes at once, sharing its cores. So the planner times the kernel at the block
# shape each candidate runs, in every rank at the same moment (the first call of a shape, right
# after the metadata exchange), and uses rank 0's numbers (see `agreed_block_times`).

CACHE_FORMAT = 4  # 4: on an oversubscribed machine, at least the CPU time / core share; 3: windowed means
Shape = Tuple[int, int, int, int, int]  # (batch, heads, query rows, key rows, head dim)


def block_shape(problem, algorithm: str, u: int, r: int, t: int = 1) -> Shape:
    """The attention block a candidate's ranks compute most of the time: Ulysses the whole
    sequence (plus the text tokens) for H/u heads; Ring/USP a group's tokens against a group's
    tokens (S/r) for H/u heads; Torus a Ulysses group's tokens (S/(t*r)) for H/(u*t) heads."""
    S, T = problem.seq_total, problem.joint_len
    B, H, D = problem.batch, problem.heads, problem.head_dim
    if algorithm == "torus":
        n = max(1, S // (t * r))
        return (B, max(1, H // (u * t)), n, n, D)
    if r == 1:
        return (B, max(1, H // u), S + T, S + T, D)
    n = max(1, S // r)
    return (B, max(1, H // u), n, n, D)


def run_shape(shape: Shape, runs: int) -> Shape:
    """The kernel call of one token run of a ring step whose block arrives in `runs` runs
    (ring.ring_core attends each run as it arrives): the block's query rows against a run's keys.
    Rated apart because a call's fixed cost does not shrink with its keys: on one core,
    [1,12,256,256,32] cut into 4 runs took 1.31x the whole block's time, into 8 runs 1.59x
    ([1,12,1024,1024,32]: 1.05x and 1.12x)."""
    B, h, sq, sk, D = shape
    g = run_granule(sk, runs)  # the runs are cut in whole granules (sharding.run_lengths)
    n = -(-sk // max(1, runs))
    return (B, h, sq, -(-n // g) * g, D)


def run_rate(rates: Dict[Shape, float], block: Shape, run: Shape) -> Optional[float]:
    """FLOP/s of the kernel on `run`, a token run of `block` (run_shape), from `rates`
    ({shape: FLOP/s}): its own rate when listed, else a call's time interpolated in its keys
    between the block's and the shortest run of the block listed -- a fixed part per call plus a
    part per key, so the planner times only the finest runs of each block (the shapes measured on
    4 ranks / 2 cores, [1,12,256,k,32] for k = 256, 128, 64, 32: 2.57, 1.47, 0.86, 0.54 ms;
    interpolated from the ends 1.41 and 0.83). None when the block or every run of it is missing."""
    if run in rates:
        return rates[run]
    B, h, sq, n, D = block
    if block not in rates:
        return None
    finest = min((s for s in rates if s[:3] == block[:3] and s[4] == D and s[3] < n),
                 key=lambda s: s[3], default=None)
    if finest is None:
        return None
    t_block = attention_flops(B, sq * n, h, D) / rates[block]
    t_finest = attention_flops(B, sq * finest[3], h, D) / rates[finest]
    t = t_finest + (t_block - t_finest) * (run[3] - finest[3]) / (n - finest[3])
    return attention_flops(B, sq * run[3], h, D) / max(t, 1e-12)


MAX_ROWS = 1024  # query rows timed per block; the kernel's time is linear in the query rows
WINDOW_S = 0.02  # a shape is timed over this long (see time_block) ...
WINDOW_CALLS = 20  # ... or over this many calls when they take less, but never under MIN_WINDOW_S
MIN_WINDOW_S = 0.002


def time_block(shape: Shape, dtype, window_s: float = WINDOW_S, share: float = 1.0) -> float:
    """Seconds of one `kernels.attention_with_lse` call on `shape`, in this process with its
    current thread count: one warm-up call, then calls back to back for a window -- `window_s`, or
    WINDOW_CALLS calls when those take less (tiny blocks, whose rate hardly decides a plan), never
    under MIN_WINDOW_S -- and their mean; on at most MAX_ROWS query rows, scaled linearly to all of
    them (so planning a long sequence does not cost several of its own calls).

    share: the part of a core each of this machine's compute threads gets while every rank
    computes (planner.core_share; 1 when there are cores enough). Below 1 the result is at least
    the window's CPU time per call / (threads x share): the wall time a call takes when the cores
    are shared fairly.

    Why a window and a mean, not the best of a few calls: on an oversubscribed CPU (an emulated
    cluster: 8 ranks on 2 cores) a call shorter than a scheduler slice often runs while the other
    ranks are descheduled, and the best of a few such calls is the rate of a rank that has a core
    to itself -- 3-4x faster than what every rank gets while all compute at once. A window of
    several slices, in every rank at the same moment, sees the share each rank really gets."""
    from .kernels import attention_with_lse

    B, h, sq, sk, D = shape
    rows = min(sq, MAX_ROWS)
    dt = as_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, h, rows, D, generator=g).to(dt)
    k, v = (torch.randn(B, h, sk, D, generator=g).to(dt) for _ in range(2))
    threads = torch.get_num_threads()
    cpu_clock = time.thread_time if threads == 1 else time.process_time  # torch computes in-thread
    t0 = time.perf_counter()
    attention_with_lse(q, k, v, scale=D ** -0.5)
    window_s = min(window_s, max(MIN_WINDOW_S, WINDOW_CALLS * (time.perf_counter() - t0)))
    calls, t0, c0 = 0, time.perf_counter(), cpu_clock()
    while True:
        attention_with_lse(q, k, v, scale=D ** -0.5)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= window_s:
            break
    per_call = elapsed / calls
    if share < 1.0:
        # The windows of the ranks never overlap exactly (a scheduler slice is ~ a window), so a
        # rank often ran part of its window with a core to spare: measured on 4 ranks / 2 cores,
        # planner predictions of 0.38-0.70x the measured call. The CPU time it used does not
        # depend on that; at the fair share it takes cpu / (threads x share) of wall time.
        per_call = max(per_call, (cpu_clock() - c0) / calls / (threads * share))
    return per_call * sq / rows


def _machine_key(concurrent: int) -> str:
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    text = json.dumps({"format": CACHE_FORMAT, "host": platform.node(), "cpu": model, "cores": cores,
                       "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "concurrent": int(concurrent)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_path(concurrent: int) -> str:
    return os.path.join(config.cache_dir(), f"calibration-{_machine_key(concurrent)}.json")


def cache_entry(shape: Shape, dtype) -> str:
    """The cache's key of one shape and dtype, e.g. ``'1,6,1024,1024,32:float32'``."""
    return ",".join(map(str, shape)) + ":" + str(as_dtype(dtype)).replace("torch.", "")


def load_cache(concurrent: int) -> Dict[str, float]:
    """{entry: seconds} of this machine's calibration with `concurrent` ranks computing at once;
    {} when absent or invalid (wrong key, wrong types, non-positive or non-finite times)."""
    path = cache_path(concurrent)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != CACHE_FORMAT or d.get("key") != _machine_key(concurrent):
            return {}
        out = {}
        for k, v in d["entries"].items():
            if not isinstance(k, str) or not isinstance(v, (int, float)) or not 0 < v < 1e4:
                return {}
            out[k] = float(v)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_cache(concurrent: int, entries: Dict[str, float]) -> Optional[str]:
    """Merge `entries` into the cache file: owner-only (0600, directory 0700), written atomically
    (temporary file in the same directory, fsync, os.replace). Returns the path, or None when the
    directory is not writable (calibration then stays per process)."""
    path = cache_path(concurrent)
    merged = dict(load_cache(concurrent))
    merged.update({k: float(v) for k, v in entries.items()})
    d = os.path.dirname(path)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        write_private(path, json.dumps({"format": CACHE_FORMAT, "key": _machine_key(concurrent),
                                        "entries": merged}, sort_keys=True), ".calibration-")
    except OSError:
        return None
    return path


def block_times(shapes, dtype, concurrent: int, *, use_cache: bool = True,
                rounds: int = 2, measure=None, before_each=None,
                cached=None, share: float = 1.0) -> Tuple[list, Dict[str, float]]:
    """Seconds of one kernel call on each shape: from this machine's cache, else measured now,
    the missing shapes interleaved over `rounds` rounds (the best window per shape), so load that comes and
    goes while calibrating biases no shape against another. Returns (times, newly measured
    {entry: seconds}). measure: the shapes to time (default: those the cache lacks; a group
    passes the union over its ranks, so that every rank times the same shapes); before_each():
    called before each window (a group's barrier, so that every rank times a shape while all
    compute, not while some have finished); cached: the cache as the caller read it; share: see
    time_block."""
    if cached is None:
        cached = load_cache(concurrent) if use_cache else {}
    cached = dict(cached)
    if measure is None:
        measure = [s for s in shapes if cache_entry(s, dtype) not in cached]
    todo = list(dict.fromkeys(measure))
    new: Dict[str, float] = {}
    for _ in range(max(1, rounds)):
        for s in todo:
            key = cache_entry(s, dtype)
            if before_each is not None:
                before_each()
            new[key] = min(new.get(key, float("inf")), time_block(s, dtype, share=share))
    cached.update(new)
    return [cached[cache_entry(s, dtype)] for s in shapes], new
