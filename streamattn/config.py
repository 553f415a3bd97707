"""The settings registry: every STREAMATTN_* environment variable, declared once.

Each `Setting` has a name, a type, a default, a valid range and one line of doc. Settings are read
when used (tests and operators may change them per process) and validated on every read: a value
that is not of the type, not finite, or out of range raises ValueError naming the variable, the
value and the valid range. The README's settings table lists exactly this registry
(tests/test_config.py checks it, and that the source reads no undeclared STREAMATTN_ variable).

`agreed=True` marks the settings that change what a call runs (schedule, message layout, kernel,
transport): they travel in the per-call signature (streamattn.agreement), so ranks that differ
raise the same ValueError on every rank. This module imports nothing from the package.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

KERNELS = ("cpu-flash", "flash-attn", "torch-flash", "torch-efficient", "triton", "math")
TRANSPORTS = ("auto", "torch", "shm", "nvshmem", "shm-device", "nvshmem-device", "inorder")


@dataclass(frozen=True)
class Setting:
    """kind: "float" | "int" | "choice" | "text" | "path" | "flag" (flag: "1" on, "0"/unset off).
    low/high: inclusive bounds of numbers; choices: the accepted texts ("" = unset = default).
    scope: who reads it ("library", "probe", "bench", "build", "tests"); agreed: part of the per-call
    metadata every rank must agree on."""

    name: str
    kind: str
    default: object
    doc: str
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Tuple[str, ...] = ()
    scope: str = "library"
    agreed: bool = False

    def valid(self) -> str:
        """The valid range in words (README table, error messages)."""
        if self.kind in ("float", "int"):
            return f"{self.kind} in [{_num(self.low)}, {_num(self.high)}]"
        if self.kind == "choice":
            return "one of " + ", ".join(c if c else "(unset)" for c in self.choices)
        if self.kind == "flag":
            return "1 or 0"
        return "any text" if self.kind == "text" else "a directory path"

    def read(self, environ=None):
        """The current value (the default when unset or empty), validated."""
        raw = (os.environ if environ is None else environ).get(self.name, "")
        text = raw.strip()
        if not text:
            return self.default
        bad = f"{self.name}={raw!r}"
        if self.kind in ("float", "int"):
            try:
                value = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise ValueError(f"{bad} is not {'an integer' if self.kind == 'int' else 'a number'}; "
                                 f"valid: {self.valid()}") from None
            if not math.isfinite(value) or not (self.low <= value <= self.high):
                raise ValueError(f"{bad} is out of range; valid: {self.valid()}")
            return value
        if self.kind == "choice":
            value = text.lower()
            if value not in self.choices:
                raise ValueError(f"{bad}: expected {self.valid()}")
            return value
        if self.kind == "flag":
            if text not in ("0", "1"):
                raise ValueError(f"{bad}: expected 1 or 0")
            return text == "1"
        if self.kind == "path":
            return os.path.abspath(os.path.expanduser(text))
        return text


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


SETTINGS = {s.name: s for s in (
    # -- the library: every call --------------------------------------------------------------
    Setting("STREAMATTN_TIMEOUT_S", "float", 300.0,
            "seconds any single wait on a peer may take", low=0.001, high=1e6),
    Setting("STREAMATTN_VALIDATE", "choice", "first",
            "'every': run the full metadata exchange on every call (debugging); any rank asking "
            "makes all ranks do it", choices=("first", "every")),
    Setting("STREAMATTN_ULYSSES_CHUNKS", "int", 0,
            "head groups Ulysses pipelines over (1: one all-to-all; unset or 0: the plan's choice)",
            low=0, high=1024, agreed=True),
    Setting("STREAMATTN_RING_CHUNKS", "int", 0,
            "token runs every ring step's K/V block is cut into, each forwarded and attended as it "
            "arrives (ring and USP; 1: one message per step; unset or 0: the plan's choice)",
            low=0, high=1024, agreed=True),
    Setting("STREAMATTN_JOINT_FOLD", "choice", "auto",
            "joint (text) tokens folded into the sharded sequence (algorithms/joint_fold.py, "
            "non-causal calls, training too): auto (the planner's choice, algorithm='auto' only), "
            "always (whenever possible, forced algorithms too), never", choices=("auto", "always", "never"),
            agreed=True),
    Setting("STREAMATTN_JOINT_ALL", "choice", "auto",
            "ring / USP with joint (text) tokens, non-causal calls (training too: the backward "
            "needs only its final joint out and LSE): every ring member attends all joint queries, "
            "so no all-gather of joint rows over the ring follows (algorithms/ring.py): auto (the "
            "planner's choice, algorithm='auto' only), always "
            "(whenever possible, forced algorithms too), never", choices=("auto", "always", "never"),
            agreed=True),
    Setting("STREAMATTN_AUTOTUNE", "int", -1,
            "measure-and-pick: with N > 0, the first calls of a shape run the planner's top "
            "candidates N times each and keep the fastest (slowest rank, median); 0: the "
            "prediction; -1 (default): 3 where the ranks outnumber their machine's cores (CPU), "
            "0 elsewhere", low=-1, high=16, agreed=True),
    Setting("STREAMATTN_ALLTOALL", "choice", "p2p",
            "how a Ulysses exchange over a whole gloo group travels: p2p (one send/receive per "
            "peer) or collective (one all_to_all_single)", choices=("p2p", "collective"),
            agreed=True),
    Setting("STREAMATTN_TRANSPORT", "choice", "auto",
            "torch, shm, nvshmem, or auto (shm for CPU groups with several ranks on a node); "
            "shm-device, nvshmem-device: the stream-ordered csrc protocol; inorder: NCCL semantics "
            "on gloo (tests)",
            choices=TRANSPORTS, agreed=True),
    Setting("STREAMATTN_KERNEL", "choice", "",
            "force the local attention kernel (unset: chosen per device and dtype)",
            choices=("",) + KERNELS, agreed=True),
    Setting("STREAMATTN_TRITON", "choice", "",
            "1 forces the Triton merge/packing kernels (CPU: with TRITON_INTERPRET=1), 0 disables "
            "them (unset: on CUDA only)", choices=("", "0", "1"), agreed=True),
    Setting("STREAMATTN_SHM_SLOT_MB", "float", 4.0,
            "one-sided mailbox slot size in MiB (2 slots per peer; fixed when the group's shm "
            "transport is created)", low=1 / 256, high=1024.0, agreed=True),
    Setting("STREAMATTN_CORE_TURNS", "flag", True,
            "CPU groups whose machine runs more ranks than it has cores: each rank yields its core "
            "before every attention kernel, so a peer woken to move messages runs first "
            "(core_turns.py); 0: never (read when a group's shm transport is created)"),
    Setting("STREAMATTN_CPU_MALLOC", "choice", "retain",
            "CPU groups: retain keeps freed heap memory in the process between calls (glibc "
            "mmap threshold 32 MiB, trim threshold 64 MiB, set once at a group's first call; "
            "cpu_malloc.py); system leaves the C allocator alone", choices=("retain", "system")),
    Setting("STREAMATTN_TOPOLOGY", "text", "",
            "a topology .json file, an emulation spec (2x4, 2x4:intra=20GB/s,inter=1Gbit/s) or a "
            "shipped machine name (unset: probe); resolved at a group's first call", agreed=True),
    # -- topology probe and cache ---------------------------------------------------------------
    Setting("STREAMATTN_CACHE_DIR", "path", os.path.join("~", ".cache", "streamattn"),
            "where streamattn caches probed topologies, kernel calibrations and csrc/ builds with "
            "the NVSHMEM wheel check_compile.sh uses (directory 0700, files 0600, owned by you)",
            scope="probe"),
    Setting("STREAMATTN_HOST_ID", "text", "",
            "names this host for node grouping (unset: hostname + machine id)", scope="probe"),
    Setting("STREAMATTN_PROBE_TIMEOUT", "float", 0.0,
            "seconds for each wait of the topology probe (unset: STREAMATTN_TIMEOUT_S if set, "
            "else 60)", low=0.001, high=1e6, scope="probe"),
    Setting("STREAMATTN_PROBE_BYTES", "int", 8 << 20,
            "message size of the probe's bandwidth test", low=1, high=1 << 31, scope="probe",
            agreed=True),
    # -- benchmarks, emulated clusters, builds --------------------------------------------------
    Setting("STREAMATTN_BENCH_IFACE", "text", "",
            "set by the bench launcher: the emulated node's network interface", scope="bench"),
    Setting("STREAMATTN_EMULATED_NODE", "text", "",
            "set by the emulated-cluster launcher: this rank's node index", scope="bench"),
    Setting("STREAMATTN_EMULATED_LINKS", "text", "",
            "set by the emulated-cluster launcher: its shaped links (inter=<rate>,intra=<rate>,mtu=<n>,tcp=<congestion control>); "
            "a probed topology is cached per value", scope="bench"),
    Setting("STREAMATTN_GPU_CHECK_TRACE", "flag", False,
            "streamattn.bench.gpu_check: print a traceback for each failed configuration", scope="bench"),
    Setting("STREAMATTN_BUILD_CUDA", "flag", False,
            "pip install: also build the NVSHMEM CUDA extension (csrc/)", scope="build"),
    Setting("STREAMATTN_NVSHMEM_VERSION", "text", "3.8.0",
            "csrc/check_compile.sh: NVSHMEM wheel version to compile against", scope="build"),
    Setting("STREAMATTN_CSRC_NO_LINK", "flag", False,
            "csrc/check_compile.sh: skip the device-link step", scope="build"),
    # -- the test suite -------------------------------------------------------------------------
    Setting("STREAMATTN_TEST_FULL", "flag", False,
            "tests: run the full-size endurance tests (500-call random soak, 1,000 group cycles)",
            scope="tests"),
    Setting("STREAMATTN_PERF_BW", "text", "150mbit",
            "tests/test_perf.py: inter-node rate of the emulated cluster", scope="tests"),
    Setting("STREAMATTN_PERF_ITERS", "int", 15, "tests/test_perf.py: timed calls per configuration",
            low=1, high=1000, scope="tests"),
    Setting("STREAMATTN_PERF_MIN_SPEEDUP", "float", 1.3,
            "tests/test_perf.py: the speedup auto must reach over Ulysses across nodes (issue 12's "
            "bar)", low=1.0, high=100.0, scope="tests"),
    Setting("STREAMATTN_PERF_SEQ", "int", 0,
            "tests/test_perf.py: a fixed sequence length (unset: calibrated)", low=1, high=1 << 20,
            scope="tests"),
    Setting("STREAMATTN_CI_VENV", "path", ".venv",
            ".ci/run: the virtual environment it creates and installs into", scope="tests"),
    Setting("STREAMATTN_BENCH_TEST_TAG", "text", "",
            "tests/test_bench.py: marks the bench subprocesses a test started", scope="tests"),
)}


def get(name: str):
    """The validated current value of a declared setting."""
    return SETTINGS[name].read()


# One function per setting the library reads (read at call time).

def timeout_s() -> float:
    """STREAMATTN_TIMEOUT_S: the longest any single wait on a peer may take (default 300 s)."""
    return float(get("STREAMATTN_TIMEOUT_S"))


def wait_timeout_s() -> float:
    """What the transports wait: timeout_s(), or its default while the value is invalid (the call
    reports the invalid value on every rank through the agreement, streamattn.agreement)."""
    try:
        return timeout_s()
    except ValueError:
        return float(SETTINGS["STREAMATTN_TIMEOUT_S"].default)


def validate_every_call() -> bool:
    """STREAMATTN_VALIDATE=every: the full metadata exchange on every call (the per-call signature
    already catches a rank that changes its shape or options alone)."""
    return get("STREAMATTN_VALIDATE") == "every"


def ulysses_chunks() -> int:
    """STREAMATTN_ULYSSES_CHUNKS: head groups Ulysses pipelines over (0: unset, the plan decides)."""
    return int(get("STREAMATTN_ULYSSES_CHUNKS"))


def ulysses_chunks_override():
    """STREAMATTN_ULYSSES_CHUNKS when set (it forces the chunk count), else None: the plan's."""
    return ulysses_chunks() or None


def ring_chunks_override():
    """STREAMATTN_RING_CHUNKS when set (it forces the token runs per ring step), else None."""
    return int(get("STREAMATTN_RING_CHUNKS")) or None


def joint_fold_mode() -> str:
    """STREAMATTN_JOINT_FOLD: "auto", "always" or "never" (planner.make_plan's joint_fold)."""
    return get("STREAMATTN_JOINT_FOLD")


def joint_all_mode() -> str:
    """STREAMATTN_JOINT_ALL: "auto", "always" or "never" (planner.make_plan's joint_all)."""
    return get("STREAMATTN_JOINT_ALL")


def alltoall_mode() -> str:
    """STREAMATTN_ALLTOALL: how a Ulysses exchange over a whole torch (gloo) group travels: "p2p"
    (one send/receive per peer) or "collective" (one all_to_all_single)."""
    return get("STREAMATTN_ALLTOALL")


def transport() -> str:
    """STREAMATTN_TRANSPORT: torch | shm | nvshmem | auto."""
    return get("STREAMATTN_TRANSPORT")


def core_turns() -> bool:
    """STREAMATTN_CORE_TURNS: yield before CPU kernels when ranks outnumber cores (default on)."""
    return bool(get("STREAMATTN_CORE_TURNS"))


def kernel() -> str:
    """STREAMATTN_KERNEL: a forced local kernel, or "" (automatic)."""
    return get("STREAMATTN_KERNEL")


def triton() -> str:
    """STREAMATTN_TRITON: "1" forces, "0" disables, "" automatic."""
    return get("STREAMATTN_TRITON")


def shm_slot_bytes() -> int:
    """STREAMATTN_SHM_SLOT_MB in bytes, rounded down to a multiple of 64 (at least 4096)."""
    b = int(float(get("STREAMATTN_SHM_SLOT_MB")) * 2**20)
    return max(4096, b - b % 64)


def topology() -> str:
    """STREAMATTN_TOPOLOGY: a topology file, spec or machine name, or "" (probe)."""
    return get("STREAMATTN_TOPOLOGY")


def cache_dir() -> str:
    """STREAMATTN_CACHE_DIR as an absolute path."""
    return os.path.abspath(os.path.expanduser(get("STREAMATTN_CACHE_DIR")))


def emulated_links() -> str:
    """STREAMATTN_EMULATED_LINKS: the emulated cluster's shaped links, or "" (real links)."""
    return get("STREAMATTN_EMULATED_LINKS")


def host_id() -> str:
    """STREAMATTN_HOST_ID, or "" (derive from the host)."""
    return get("STREAMATTN_HOST_ID")


def probe_timeout_s() -> float:
    """STREAMATTN_PROBE_TIMEOUT, else STREAMATTN_TIMEOUT_S if set, else 60 s."""
    t = float(get("STREAMATTN_PROBE_TIMEOUT"))
    if t:
        return t
    if os.environ.get("STREAMATTN_TIMEOUT_S", "").strip():
        return timeout_s()
    return 60.0


def probe_bytes() -> int:
    """STREAMATTN_PROBE_BYTES: bytes per message of the probe's bandwidth test."""
    return int(get("STREAMATTN_PROBE_BYTES"))


# Kept for callers of the old module constant.
DEFAULT_TIMEOUT_S = SETTINGS["STREAMATTN_TIMEOUT_S"].default


@contextlib.contextmanager
def override(**values):
    """Set (value str()-ed) or unset (value None) environment variables for the block, restoring
    them after; settings are read at call time, so calls inside see the new values."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
