"""Emulated multi-node cluster on one Linux host: network namespaces, a bridge, veths and ``tc tbf``.

Layout of an ``EmulatedCluster(nodes=N, ranks_per_node=R, inter_bw=..., intra_bw=...)``::

    root namespace                              node namespace k (k = 0..N-1)
    ───────────────                             ──────────────────────────────
    bridge  sab<pid><tok>  198.18.S.1/24  ──┬── sah<pid><tok><k> ═ veth ═ san<pid><tok><k>  198.18.S.(10+k)/24
       (master_addr, e.g. TCPStore here)    │    tbf rate inter_bw          tbf rate inter_bw
                                            │    (egress toward node k)     (egress from node k)
                                            └── ... one veth pair per node
                                                                            lo up  [tbf rate intra_bw]

* Every node's uplink is shaped in both directions: a ``tbf`` on the namespace end of its veth
  (traffic leaving the node) and one on the bridge end (traffic entering the node). Node-to-node
  traffic therefore crosses two shapers of the same rate, like a host NIC and a switch port.
* Ranks of one node talk over ``lo`` of the node's namespace, even when they address each other by the
  veth address (Linux routes traffic to a local address over loopback). ``intra_bw`` shapes that
  ``lo`` with a tbf; leave it ``None`` for unshaped (memory-speed) intra-node traffic.
* Addresses come only from 198.18.0.0/15 (RFC 2544 benchmarking range). The first cluster on a host
  gets 198.18.0.0/24 (``master_addr`` 198.18.0.1); a cluster created while another one is alive gets
  the next free /24 of that range, so concurrent clusters never share a subnet.
* Names carry the owner's PID and a random token: namespaces ``streamattn-<pid>-<tok>-n<k>``, links
  ``sa{b,h,n}<pid:06x><tok><k:02d>`` (the bridge has no ``<k>``). A lock file
  ``/run/streamattn/<pid>-<tok>.lock`` is held (flock) while the owner lives; ``cleanup_stale()``
  removes what belongs to owners that are gone (e.g. after ``kill -9`` of a launcher).
* Teardown always runs: on normal exit and on exceptions (``__exit__``), on SIGINT/SIGTERM/SIGHUP
  (handlers tear down, then re-raise: ``KeyboardInterrupt`` for SIGINT, ``SystemExit(128+signum)``
  otherwise) and at interpreter exit (``atexit``). It kills the process groups started with
  ``popen`` and every process left inside the namespaces, then deletes namespaces, veths (their
  qdiscs go with them) and the bridge.
* Nothing runs unshaped by accident: ``preflight()`` raises ``ClusterUnavailable(reason)`` when not
  root, when ``ip``/``tc`` are missing, when a namespace cannot be created or ``tbf`` is unavailable,
  and the cluster verifies every qdisc after creating it.

Shaping is only meaningful below what the host can move unshaped: one TCP stream between two
namespaces peaks at about 13 Gbit/s on the 2-CPU development machine (CPU-bound), so rates above
~10 Gbit/s are not enforced in practice. Measured goodput is 95.6% of the configured rate on veth
links (TCP/IP/Ethernet headers; tbf counts L2 bytes) and ~100% on lo (MTU 65536).

Needs root. netem is absent from some kernels; ``inter_latency`` (an added one-way delay per shaped
hop) needs it and raises ``ClusterUnavailable`` when it is missing rather than silently ignoring it.
"""
from __future__ import annotations

import atexit
import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

__all__ = [
    "ClusterUnavailable",
    "EmulatedCluster",
    "RankPlacement",
    "cleanup_stale",
    "format_tc_rate",
    "measure_throughput",
    "parse_bandwidth",
    "parse_duration",
    "preflight",
    "tbf_burst_bytes",
]

NS_PREFIX = "streamattn-"
STATE_DIR = "/run/streamattn"
NET_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range, nothing else
MAX_NODES = 100  # 198.18.S.(10+k) must stay < 255 and k fits the 2-digit link suffix
TC_HZ = 250  # burst covers at least one 4 ms tick at the configured rate
DEFAULT_TBF_LATENCY = 0.05  # tbf queue bound (seconds of data at the rate)

_NS_RE = re.compile(r"^streamattn-(\d+)-([0-9a-f]{4})-(n\d+|probe)$")
_LINK_RE = re.compile(r"^sa([bhnp])([0-9a-f]{6})([0-9a-f]{4})(\d{2})?$")
_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None
)

Bandwidth = Union[str, float, int]


class ClusterUnavailable(RuntimeError):
    """The emulated cluster cannot be built here (reason in ``.reason``). Callers exit non-zero."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ─────────────────────────────────────────────────────────────────────────── units


_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_IPREFIX = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}


def parse_bandwidth(value: Bandwidth) -> float:
    """Bandwidth in bits/s.

    Numbers are bits/s. Strings: ``200mbit``, ``1gbit``, ``1Gbit/s``, ``500Mbit/s``, ``100Mbps``,
    ``2GB/s``, ``2GBps``, ``1.5 gbit``, ``64kibit``. Prefixes k/M/G/T are decimal (case-insensitive),
    ki/Mi/Gi/Ti binary. A lowercase ``b`` (or ``bit``) means bits, an uppercase ``B`` (or ``byte``)
    means bytes. Note: unlike tc, ``mbps`` here means megabits/s (tc reads it as megabytes/s).
    """
    if isinstance(value, bool):
        raise TypeError("bandwidth must be a number or a string, not bool")
    if isinstance(value, (int, float)):
        bits = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*", value)
        if not m:
            raise ValueError(f"cannot parse bandwidth {value!r} (try '200mbit', '1Gbit/s', '2GB/s')")
        number, unit = float(m.group(1)), m.group(2)
        if unit.lower().endswith("/s"):
            unit = unit[:-2]
        elif unit.lower().endswith("ps"):
            unit = unit[:-2]
        scale, rest = None, unit
        for p, f in _IPREFIX.items():
            if unit.lower().startswith(p) and len(unit) > 2:
                scale, rest = f, unit[2:]
                break
        if scale is None:
            if unit and unit[0].lower() in "kmgt" and len(unit) > 1:
                scale, rest = _PREFIX[unit[0].lower()], unit[1:]
            else:
                scale, rest = 1.0, unit
        if rest in ("", "b") or rest.lower() in ("bit", "bits"):
            per = 1.0
        elif rest == "B" or rest.lower() in ("byte", "bytes"):
            per = 8.0
        else:
            raise ValueError(f"cannot parse bandwidth {value!r}: unknown unit {unit!r}")
        bits = number * scale * per
    else:
        raise TypeError(f"bandwidth must be a number or a string, got {type(value).__name__}")
    if not bits > 0 or bits != bits or bits == float("inf"):
        raise ValueError(f"bandwidth must be positive and finite, got {value!r}")
    return bits


def format_tc_rate(bits_per_s: float) -> str:
    """tc's syntax for a rate in bits/s (integer bits, which tc accepts for any magnitude)."""
    return f"{max(1, int(round(bits_per_s)))}bit"


def parse_duration(value: Union[str, float, int]) -> float:
    """Seconds from a number (seconds) or a string like ``'5ms'``, ``'200us'``, ``'0.1s'``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        secs = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us|µs|ns)?\s*", value)
        if not m:
            raise ValueError(f"cannot parse duration {value!r} (try '5ms')")
        secs = float(m.group(1)) * {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6,
                                     "ns": 1e-9}[m.group(2)]
    else:
        raise TypeError(f"duration must be a number or a string, got {type(value).__name__}")
    if secs < 0:
        raise ValueError(f"duration must be >= 0, got {value!r}")
    return secs


def tbf_burst_bytes(bits_per_s: float, mtu: int = 1500) -> int:
    """Bucket size for a tbf at this rate: one 4 ms tick of data, at least 2·MTU and 64 KiB+.

    The 64 KiB floor lets a whole GSO/TSO super-packet (veth and lo pass them) through without tbf
    having to segment it; 2·MTU covers lo (MTU 65536), where tbf would otherwise drop full packets.
    Measured here (one TCP stream, node→node): burst 2·MTU = 3000 B gives 190 Mbit/s on a 200mbit
    link but only 345 Mbit/s on a 1gbit link; this rule (100 kB / 500 kB) gives 191 and 956 Mbit/s,
    i.e. the line rate minus TCP/IP/Ethernet headers (1448/1514 = 95.6%).
    """
    return int(max(bits_per_s / 8.0 / TC_HZ, 2 * mtu, 65536 + 2 * 1514))


# ──────────────────────────────────────────────────────────────────────── commands


def _run(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, list(argv), p.stdout, p.stderr)
    return p


def _err(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"`{' '.join(e.cmd)}` failed (exit {e.returncode}): {(e.stderr or '').strip()}"
    return f"{type(e).__name__}: {e}"


def _list_netns() -> List[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _list_links() -> List[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _netns_pids(ns: str) -> List[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(pid: int, tok: str) -> str:
    return os.path.join(STATE_DIR, f"{pid}-{tok}.lock")


def _owner_alive(pid: int, tok: str) -> bool:
    """Is the cluster (pid, tok) still owned by a live process?

    The owner holds an flock on its lock file for its whole life (released by the kernel on any
    death, kill -9 included), which also survives PID reuse and PID namespaces. Without a lock file
    (e.g. a preflight probe) the owner's PID decides.
    """
    path = _lock_path(pid, tok)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return _pid_alive(pid)
    except OSError:
        return True  # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return True  # held (EWOULDBLOCK) or undecidable: the owner is alive
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return False


class _GlobalLock:
    """Serialises cluster creation and stale cleanup between processes on this host."""

    def __enter__(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        self.fd = os.open(os.path.join(STATE_DIR, "global.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _delete_netns(ns: str, deadline: float = 5.0) -> Optional[str]:
    """Kill everything inside ``ns`` and delete it; returns an error string or None."""
    end = time.monotonic() + deadline
    while True:
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids or time.monotonic() > end:
            break
        _kill_pids(pids)
        time.sleep(0.05)
    p = _run(["ip", "netns", "del", ns], check=False)
    if p.returncode != 0 and ns in _list_netns():
        return f"ip netns del {ns}: {p.stderr.strip()}"
    return None


def _delete_link(name: str) -> Optional[str]:
    p = _run(["ip", "link", "del", name], check=False)
    if p.returncode != 0 and name in _list_links():
        return f"ip link del {name}: {p.stderr.strip()}"
    return None


def _cleanup_stale_locked(verbose: bool = False) -> List[str]:
    removed: List[str] = []
    owners = set()
    for ns in _list_netns():
        m = _NS_RE.match(ns)
        if m and not _owner_alive(int(m.group(1)), m.group(2)):
            owners.add((int(m.group(1)), m.group(2)))
            if _delete_netns(ns) is None:
                removed.append(ns)
    for link in _list_links():
        m = _LINK_RE.match(link)
        if m and not _owner_alive(int(m.group(2), 16), m.group(3)):
            owners.add((int(m.group(2), 16), m.group(3)))
            if _delete_link(link) is None:
                removed.append(link)
    try:
        lockfiles = os.listdir(STATE_DIR)
    except OSError:
        lockfiles = []
    for fname in lockfiles:
        m = re.fullmatch(r"(\d+)-([0-9a-f]{4})\.lock", fname)
        if m and not _owner_alive(int(m.group(1)), m.group(2)):
            try:
                os.unlink(os.path.join(STATE_DIR, fname))
            except OSError:
                pass
    if verbose and removed:
        print(f"streamattn: removed stale emulated-cluster objects: {' '.join(removed)}",
              file=sys.stderr)
    return removed


def cleanup_stale(verbose: bool = False) -> List[str]:
    """Remove namespaces and links of emulated clusters whose owner process is gone.

    Processes still running inside a stale namespace are killed first. Returns the removed names.
    Requires root; a no-op (empty list) when nothing is stale.
    """
    with _GlobalLock():
        return _cleanup_stale_locked(verbose)


# ─────────────────────────────────────────────────────────────────────── preflight

_preflight_ok: Dict[bool, bool] = {}


def unavailable_reason(need_netem: bool = False) -> Optional[str]:
    """Why an emulated cluster cannot be built here (preflight's reason), or None if it can."""
    try:
        preflight(need_netem)
    except ClusterUnavailable as e:
        return e.reason
    return None


def preflight(need_netem: bool = False) -> None:
    """Raise ``ClusterUnavailable`` unless namespaces, veths, a bridge and tbf all work here.

    Everything is tried inside a throw-away namespace, so the root namespace is never touched.
    The result is cached per process.
    """
    if _preflight_ok.get(need_netem):
        return
    if not sys.platform.startswith("linux"):
        raise ClusterUnavailable(f"emulated cluster needs Linux network namespaces (this is {sys.platform})")
    if os.geteuid() != 0:
        raise ClusterUnavailable("emulated cluster needs root (network namespaces, veths, tc); run as root")
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            raise ClusterUnavailable(f"`{tool}` not found; install {pkg} (apt-get install -y iproute2)")
    try:
        os.makedirs(STATE_DIR, exist_ok=True)
    except OSError as e:
        raise ClusterUnavailable(f"cannot create {STATE_DIR}: {e}")
    tok = secrets.token_hex(2)
    ns = f"{NS_PREFIX}{os.getpid()}-{tok}-probe"
    a, b = f"sap{os.getpid():06x}{tok}00", f"sap{os.getpid():06x}{tok}01"
    steps = [
        (["ip", "netns", "add", ns], "cannot create a network namespace"),
        (["ip", "-n", ns, "link", "set", "lo", "up"], "cannot bring up lo in a namespace"),
        (["ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b],
         "cannot create a veth pair"),
        (["ip", "-n", ns, "link", "add", "name", "sapbr", "type", "bridge"],
         "cannot create a Linux bridge"),
        (["ip", "-n", ns, "link", "set", a, "master", "sapbr"], "cannot enslave a veth to a bridge"),
        (["tc", "-n", ns, "qdisc", "add", "dev", b, "root", "handle", "1:", "tbf", "rate", "100mbit",
          "burst", "68564", "latency", "50ms"], "tc tbf is unavailable (sch_tbf)"),
    ]
    if need_netem:
        steps.append((["tc", "-n", ns, "qdisc", "add", "dev", b, "parent", "1:1", "handle", "10:",
                       "netem", "delay", "1ms"],
                      "tc netem is unavailable in this kernel, so inter_latency cannot be emulated"))
    with _deferred_signals():  # a Ctrl-C now is delivered after the probe namespace is gone
        try:
            for argv, what in steps:
                try:
                    _run(argv)
                except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
                    raise ClusterUnavailable(f"{what}: {_err(e)}") from None
        finally:
            if ns in _list_netns():
                _run(["ip", "netns", "del", ns], check=False)
    _preflight_ok[need_netem] = True


# ───────────────────────────────────────────────────────────────────────── cluster


@dataclass(frozen=True)
class RankPlacement:
    """Where global rank ``rank`` lives in an emulated cluster, and the environment it needs."""

    rank: int
    world_size: int
    node: int
    local_rank: int
    ranks_per_node: int
    netns: str
    ifname: str
    ip: str
    master_addr: str

    @property
    def env(self) -> Dict[str, str]:
        """torchrun-style variables plus ``GLOO_SOCKET_IFNAME`` for this rank."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.ranks_per_node),
            "NODE_RANK": str(self.node),
            "GROUP_RANK": str(self.node),
            "MASTER_ADDR": self.master_addr,
            "GLOO_SOCKET_IFNAME": self.ifname,
            "STREAMATTN_EMULATED_NODE": str(self.node),
        }


class EmulatedCluster:
    """``nodes`` emulated nodes with ``ranks_per_node`` ranks each, joined by shaped links.

    Parameters
    ----------
    nodes, ranks_per_node:
        cluster shape (``2x4`` = ``EmulatedCluster(2, 4)``); ``1 <= nodes <= 100``.
    inter_bw:
        each node's uplink rate, both directions (``"200mbit"``, ``"1Gbit/s"``, ``2e8`` bits/s).
    intra_bw:
        rate of ``lo`` inside every node (ranks of one node talk over lo); ``None`` = unshaped.
    inter_latency:
        extra one-way delay added on each shaped uplink hop (node→bridge and bridge→node, so
        node-to-node RTT grows by 4×); needs netem, else ``ClusterUnavailable``. ``None`` = none.
    tbf_latency:
        tbf queue bound (how much data, in seconds at the rate, a shaper may hold before dropping).
    install_signal_handlers:
        tear down on SIGINT/SIGTERM/SIGHUP (main thread only), then re-raise.
    """

    def __init__(
        self,
        nodes: int,
        ranks_per_node: int = 1,
        inter_bw: Bandwidth = "1gbit",
        intra_bw: Optional[Bandwidth] = None,
        inter_latency: Optional[Union[str, float]] = None,
        *,
        tbf_latency: Union[str, float] = DEFAULT_TBF_LATENCY,
        mtu: int = 1500,
        install_signal_handlers: bool = True,
        kill_grace: float = 2.0,
    ):
        if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be an int in [1, {MAX_NODES}], got {nodes!r}")
        if not isinstance(ranks_per_node, int) or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be a positive int, got {ranks_per_node!r}")
        self.nodes = nodes
        self.ranks_per_node = ranks_per_node
        self.world_size = nodes * ranks_per_node
        self.inter_bw = parse_bandwidth(inter_bw)
        self.intra_bw = None if intra_bw is None else parse_bandwidth(intra_bw)
        self.inter_latency = None if inter_latency is None else parse_duration(inter_latency)
        if self.inter_latency == 0:
            self.inter_latency = None
        self.tbf_latency = parse_duration(tbf_latency)
        self.mtu = int(mtu)
        self.install_signal_handlers = install_signal_handlers
        self.kill_grace = kill_grace

        self.pid = os.getpid()
        self.token = secrets.token_hex(2)
        self.bridge = f"sab{self.pid:06x}{self.token}"
        self.netns = [f"{NS_PREFIX}{self.pid}-{self.token}-n{k}" for k in range(nodes)]
        self.host_ifnames = [f"sah{self.pid:06x}{self.token}{k:02d}" for k in range(nodes)]
        self.ifnames = [f"san{self.pid:06x}{self.token}{k:02d}" for k in range(nodes)]
        self.subnet: Optional[ipaddress.IPv4Network] = None

        self._state = "new"  # new → up → closed
        self._lock_fd: Optional[int] = None
        self._created_ns: List[str] = []
        self._created_links: List[str] = []
        self._procs: List[subprocess.Popen] = []
        self._prev_handlers: Dict[int, object] = {}
        self._close_lock = threading.RLock()

    # ── description
    def __repr__(self) -> str:
        intra = "unshaped" if self.intra_bw is None else format_tc_rate(self.intra_bw)
        return (f"EmulatedCluster({self.nodes}x{self.ranks_per_node}, inter={format_tc_rate(self.inter_bw)}, "
                f"intra={intra}, subnet={self.subnet}, state={self._state})")

    @property
    def master_addr(self) -> str:
        """Address of the bridge in the root namespace (host a TCPStore / MASTER_ADDR here)."""
        self._require_subnet()
        return str(self.subnet.network_address + 1)

    def node_ip(self, node: int) -> str:
        self._require_subnet()
        self._check_node(node)
        return str(self.subnet.network_address + 10 + node)

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world size {self.world_size}")
        return rank // self.ranks_per_node

    def rank_env(self, rank: int) -> RankPlacement:
        """Placement of global ``rank`` (node-major: ranks 0..R-1 on node 0, ...), with ``.env``."""
        node = self.node_of(rank)
        return RankPlacement(rank=rank, world_size=self.world_size, node=node,
                             local_rank=rank % self.ranks_per_node,
                             ranks_per_node=self.ranks_per_node, netns=self.netns[node],
                             ifname=self.ifnames[node], ip=self.node_ip(node),
                             master_addr=self.master_addr)

    def _check_node(self, node: int) -> None:
        if not isinstance(node, int) or not 0 <= node < self.nodes:
            raise ValueError(f"node must be in [0, {self.nodes}), got {node!r}")

    def _require_subnet(self) -> None:
        if self.subnet is None:
            raise RuntimeError("cluster is not up (use `with EmulatedCluster(...) as c:`)")

    # ── processes
    def popen(self, node: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              *, inherit_env: bool = True, **kw) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace (``ip netns exec <ns> argv...``).

        ``argv`` is an argument list (never a shell string). The environment is ``os.environ``
        (unless ``inherit_env=False``) updated with ``env``, with ``GLOO_SOCKET_IFNAME`` set to the
        node's veth. The child gets its own session/process group, killed at teardown.
        Extra keyword arguments go to ``subprocess.Popen``.
        """
        if self._state != "up":
            raise RuntimeError(f"cluster is {self._state}, cannot start processes")
        self._check_node(node)
        if isinstance(argv, (str, bytes)) or not all(isinstance(a, (str, os.PathLike)) for a in argv):
            raise TypeError("argv must be a list of strings (no shell strings)")
        if kw.get("shell"):
            raise ValueError("shell=True is not supported")
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update({k: str(v) for k, v in (env or {}).items()})
        full_env["GLOO_SOCKET_IFNAME"] = self.ifnames[node]
        full_env.setdefault("STREAMATTN_EMULATED_NODE", str(node))
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(["ip", "netns", "exec", self.netns[node]] + [os.fspath(a) for a in argv],
                             env=full_env, **kw)
        self._procs.append(p)
        return p

    def popen_rank(self, rank: int, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
                   **kw) -> subprocess.Popen:
        """``popen`` on the node of ``rank`` with the rank's torchrun-style environment added."""
        place = self.rank_env(rank)
        full = dict(place.env)
        full.update(env or {})
        return self.popen(place.node, argv, full, **kw)

    # ── lifecycle
    def __enter__(self) -> "EmulatedCluster":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def start(self) -> "EmulatedCluster":
        if self._state != "new":
            raise RuntimeError(f"cluster is {self._state}; create a new EmulatedCluster")
        # Signals arriving while the cluster is built are held back and re-delivered afterwards,
        # by which time our tear-down handler is installed (or everything is already undone).
        with _deferred_signals() as deferred:
            preflight(need_netem=self.inter_latency is not None)
            try:
                with _GlobalLock():
                    _cleanup_stale_locked(verbose=True)
                    self._take_owner_lock()
                    self.subnet = _free_subnet()
                    self._state = "up"  # from here on, close() undoes whatever was made
                    atexit.register(self.close)
                    self._build()
                self._verify()
            except BaseException as e:
                self._teardown()
                if isinstance(e, (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired)):
                    raise ClusterUnavailable(f"building the emulated cluster failed: {_err(e)}") from e
                raise
            if self.install_signal_handlers:
                for s, prev in deferred.saved.items():  # what the deferral restores on exit
                    self._prev_handlers[s] = prev
                    deferred.saved[s] = self._on_signal
        return self

    def close(self) -> None:
        """Tear everything down (idempotent; safe from signal handlers and atexit)."""
        with self._close_lock:
            if self._state != "up":
                return
            with _deferred_signals() as deferred:
                self._teardown()
                for s, prev in self._prev_handlers.items():  # put the caller's handlers back
                    if deferred.saved.get(s) == self._on_signal:
                        deferred.saved[s] = prev
                self._prev_handlers.clear()

    def _take_owner_lock(self) -> None:
        path = _lock_path(self.pid, self.token)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.pid} {' '.join(sys.argv)}\n".encode())
        self._lock_fd = fd

    def _tbf(self, ns: Optional[str], dev: str, rate: float, mtu: int) -> List[List[str]]:
        tc = ["tc"] if ns is None else ["tc", "-n", ns]
        lat_ms = max(1.0, self.tbf_latency * 1e3)
        cmds = [tc + ["qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf",
                      "rate", format_tc_rate(rate), "burst", str(tbf_burst_bytes(rate, mtu)),
                      "latency", f"{lat_ms:g}ms"]]
        return cmds

    def _netem(self, ns: Optional[str], dev: str) -> List[List[str]]:
        tc = ["tc"] if ns is None else ["tc", "-n", ns]
        return [tc + ["qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem",
                      "delay", f"{self.inter_latency * 1e6:.0f}us", "limit", "100000"]]

    def _build(self) -> None:
        net = self.subnet
        _run(["ip", "link", "add", "name", self.bridge, "type", "bridge",
              "forward_delay", "0", "stp_state", "0"])
        self._created_links.append(self.bridge)
        _run(["ip", "addr", "add", f"{net.network_address + 1}/{net.prefixlen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for k in range(self.nodes):
            ns, host, inner = self.netns[k], self.host_ifnames[k], self.ifnames[k]
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "link", "add", host, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", inner, "mtu", str(self.mtu), "netns", ns])
            self._created_links.append(host)
            _run(["ip", "link", "set", host, "master", self.bridge])
            _run(["ip", "link", "set", host, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{net.network_address + 10 + k}/{net.prefixlen}",
                  "dev", inner])
            _run(["ip", "-n", ns, "link", "set", inner, "up"])
            cmds = self._tbf(ns, inner, self.inter_bw, self.mtu) + self._tbf(None, host, self.inter_bw, self.mtu)
            if self.inter_latency is not None:
                cmds += self._netem(ns, inner) + self._netem(None, host)
            if self.intra_bw is not None:
                cmds += self._tbf(ns, "lo", self.intra_bw, 65536)
            for c in cmds:
                _run(c)

    def _verify(self) -> None:
        """Refuse to run unshaped: every expected tbf must be there with the configured rate."""
        def check(ns: Optional[str], dev: str) -> None:
            tc = ["tc"] if ns is None else ["tc", "-n", ns]
            out = _run(tc + ["qdisc", "show", "dev", dev]).stdout
            if " tbf " not in f" {out} ":
                raise ClusterUnavailable(f"tbf missing on {dev} after setup: {out.strip()!r}")
        for k in range(self.nodes):
            check(self.netns[k], self.ifnames[k])
            check(None, self.host_ifnames[k])
            if self.intra_bw is not None:
                check(self.netns[k], "lo")

    def _teardown(self) -> None:
        errors: List[str] = []
        # 1. processes we started: TERM their process groups, then KILL. A child is only reaped
        #    after its group got SIGKILL, so its PID (= the group id) cannot have been reused.
        live = [p for p in self._procs if p.returncode is None]
        for p in live:
            _signal_proc(p, signal.SIGTERM)
        end = time.monotonic() + self.kill_grace
        while live and time.monotonic() < end and not all(_exited_unreaped(p) for p in live):
            time.sleep(0.02)
        for p in live:
            _signal_proc(p, signal.SIGKILL)  # also whatever is left of its group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} did not die")
        self._procs.clear()
        # 2. namespaces (anything still inside is killed); their veth ends and qdiscs go with them
        for ns in reversed(self._created_ns):
            e = _delete_netns(ns)
            if e:
                errors.append(e)
        # 3. root-side links (normally already gone with their peers) and the bridge
        present = set(_list_links())
        for link in reversed(self._created_links):
            if link in present:
                e = _delete_link(link)
                if e:
                    errors.append(e)
        self._created_ns.clear()
        self._created_links.clear()
        if self._lock_fd is not None:
            try:
                os.unlink(_lock_path(self.pid, self.token))
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        self._state = "closed"
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        if errors:
            print("streamattn: emulated-cluster teardown incomplete (run "
                  "`python -m streamattn.bench.cluster --cleanup`):\n  " + "\n  ".join(errors),
                  file=sys.stderr)

    # ── signals
    def _on_signal(self, signum, frame) -> None:
        prev = self._prev_handlers.get(signum)
        self.close()  # puts the previous handlers back too
        if callable(prev):
            prev(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_proc(p: subprocess.Popen, sig: int) -> None:
    """Signal an unreaped child and its process group (its own group when start_new_session)."""
    if p.returncode is not None:
        return  # reaped: its PID may belong to someone else now
    _killpg(p.pid, sig)
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


def _exited_unreaped(p: subprocess.Popen) -> bool:
    """Has the child exited? Checked without reaping it (waitid WNOWAIT)."""
    if p.returncode is not None:
        return True
    try:
        r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return r is not None


class _deferred_signals:
    """Hold back SIGINT/SIGTERM/SIGHUP for the duration of a critical section (main thread only).

    Python-level rather than ``pthread_sigmask``: a process-directed signal may be taken by any
    thread (torch starts several), and Python then runs the handler in the main thread anyway.
    On exit the handlers in ``saved`` are installed (callers may edit it) and held signals are
    re-delivered with ``signal.raise_signal``. Ignored signals are left alone.
    """

    def __enter__(self):
        self.saved: Dict[int, object] = {}
        self.pending: List[int] = []
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                prev = signal.getsignal(s)
                if prev is signal.SIG_IGN or prev is None:
                    continue
                self.saved[s] = prev
                signal.signal(s, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.pending.append(signum)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(self.pending):
            signal.raise_signal(s)


def _free_subnet() -> ipaddress.IPv4Network:
    """First /24 of 198.18.0.0/15 with no address of the root namespace in it."""
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    used = set()
    for m in re.finditer(r"\binet\s+(\d+\.\d+\.\d+\.\d+)/(\d+)", out):
        addr = ipaddress.ip_address(m.group(1))
        if addr in NET_RANGE:
            used.add(ipaddress.ip_network(f"{addr}/24", strict=False))
    for net in NET_RANGE.subnets(new_prefix=24):
        if net not in used:
            return net
    raise ClusterUnavailable("no free /24 left in 198.18.0.0/15 for another emulated cluster")


# ──────────────────────────────────────────────────────────────────── throughput

_RECEIVER = r"""
import socket, sys, time
ip, warm, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(timeout)
c, _ = s.accept(); c.settimeout(timeout)
buf = bytearray(1 << 20); view = memoryview(buf)
n = 0; t0 = None; tw = None; nw = 0
while True:
    k = c.recv_into(view)
    now = time.perf_counter()
    if not k:
        break
    if t0 is None:
        t0 = now
    n += k
    if tw is None and now - t0 >= warm:
        tw, nw = now, n
t1 = time.perf_counter()
if tw is None or t1 <= tw:
    tw, nw = t0, 0
print(n, n - nw, t1 - tw, flush=True)
"""

_SENDER = r"""
import socket, sys, time
ip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((ip, port), timeout=30)
buf = b"\0" * (1 << 16)
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
s.recv(1)
s.close()
"""


def measure_throughput(cluster: EmulatedCluster, src_node: int, dst_node: int,
                       seconds: float = 2.0, warmup: Optional[float] = None) -> float:
    """TCP goodput in bits/s from ``src_node`` to ``dst_node`` (plain sockets, one stream).

    A receiver in ``dst_node``'s namespace binds the node's address; a sender in ``src_node``'s
    namespace streams zeros for ``seconds`` and closes. The rate counts the bytes received after
    ``warmup`` (default 10% of ``seconds``, skipping the tbf's initial burst and TCP slow start)
    until EOF. ``src_node == dst_node`` measures the node's loopback (intra-node) path.
    """
    if warmup is None:
        warmup = 0.1 * seconds
    py = sys.executable
    timeout = seconds + 30.0
    recv = cluster.popen(dst_node, [py, "-c", _RECEIVER, cluster.node_ip(dst_node), str(warmup),
                                    str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    send = None
    try:
        port_line = recv.stdout.readline().strip()
        if not port_line.isdigit():
            recv.wait(timeout=5)
            raise RuntimeError(f"throughput receiver failed: {recv.stderr.read().strip()}")
        send = cluster.popen(src_node, [py, "-c", _SENDER, cluster.node_ip(dst_node), port_line,
                                        str(seconds)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        out, err = recv.communicate(timeout=timeout)
        _, serr = send.communicate(timeout=10)
        if recv.returncode != 0 or send.returncode != 0:
            raise RuntimeError(f"throughput test failed: receiver: {err.strip()} sender: {serr.strip()}")
        total, counted, elapsed = out.split()
        return int(counted) * 8.0 / float(elapsed)
    finally:
        for p in (recv, send):
            if p is not None and p.returncode is None:
                _signal_proc(p, signal.SIGKILL)
                p.wait()


# ──────────────────────────────────────────────────────────────────────────── CLI


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m streamattn.bench.cluster",
                                 description="Emulated-cluster utilities (root only).")
    ap.add_argument("--cleanup", action="store_true", help="remove stale streamattn namespaces/links")
    ap.add_argument("--check", action="store_true", help="run preflight and report")
    ap.add_argument("--measure", metavar="NxR", help="bring up a cluster and measure node0→node1")
    ap.add_argument("--inter-bw", default="1gbit")
    ap.add_argument("--intra-bw", default=None)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    try:
        if a.check:
            preflight()
            print("emulated cluster: available")
        if a.cleanup:
            removed = cleanup_stale()
            print("removed: " + (" ".join(removed) if removed else "nothing"))
        if a.measure:
            n, r = (int(x) for x in a.measure.lower().split("x"))
            with EmulatedCluster(n, r, a.inter_bw, a.intra_bw) as c:
                print(c)
                rate = parse_bandwidth(a.inter_bw)
                for src, dst in [(0, 1 % n), (1 % n, 0)]:
                    bps = measure_throughput(c, src, dst, a.seconds)
                    print(f"node{src}→node{dst}: {bps / 1e6:.1f} Mbit/s "
                          f"({100 * bps / rate:.0f}% of {format_tc_rate(rate)})")
                if a.intra_bw:
                    bps = measure_throughput(c, 0, 0, a.seconds)
                    print(f"node0 lo: {bps / 1e6:.1f} Mbit/s "
                          f"({100 * bps / parse_bandwidth(a.intra_bw):.0f}% of {a.intra_bw})")
    except ClusterUnavailable as e:
        print(f"emulated cluster unavailable: {e.reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
