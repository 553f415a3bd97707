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
~10 Gbit/s are not enforced in practice. tbf counts L2 bytes, so TCP's goodput is the configured
rate minus the headers: 99.3% on the veths at the default MTU 9000 (8948 payload bytes per 9014),
95.6% at MTU 1500 (1448 per 1514), ~100% on lo (MTU 65536).

TCP congestion control inside the nodes is pinned to ``cubic``, Linux's default (the
``congestion_control`` argument: ``"default"`` = cubic where the host lets a namespace choose it,
else what a new namespace inherits, with a warning; a name = that one or ClusterUnavailable;
``None`` = inherited). What the nodes run is read back (``EmulatedCluster.tcp_in_use``). A host may
default to ``bbr``, whose model the emulated link confuses: the veth delivers a tbf bucket at memory
speed, so BBR estimated 7-31 Gbit/s on a 200 Mbit/s link and ran with a cwnd far below the queue
the tbf holds. Measured on the 2x2 cluster at 200 Mbit/s (text-free 8192 tokens, auto's plan,
back to back): 751 ms per call under bbr, 725-730 ms under cubic; 2x4, flux 1024 + 256: 147 ms
against 144. Every plan and peer library runs under the same setting.

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
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..topology import units
from .netns import (
    NS_PREFIX,
    ClusterUnavailable,
    GlobalLock,
    cleanup_stale,
    cleanup_stale_locked,
    delete_link,
    delete_netns,
    describe_failure,
    free_subnet,
    list_links,
    lock_path,
    preflight,
    run_cmd,
    unavailable_reason,
)
from .signals import deferred_signals, exited_unreaped, signal_proc
from .throughput import measure_throughput

__all__ = [
    "ClusterUnavailable",
    "EmulatedCluster",
    "RankPlacement",
    "check_mtu",
    "cleanup_stale",
    "format_tc_rate",
    "measure_throughput",
    "check_congestion_control",
    "parse_congestion_control",
    "parse_rate_bits",
    "parse_seconds",
    "preflight",
    "tbf_burst_bytes",
    "unavailable_reason",
]

MAX_NODES = 100  # 198.18.S.(10+k) must stay < 255 and k fits the 2-digit link suffix
TC_HZ = 250  # burst covers at least one 4 ms tick at the configured rate
DEFAULT_TBF_LATENCY = 0.05  # tbf queue bound (seconds of data at the rate)
# Jumbo frames on the veths, as on the fabrics a multi-node DiT job runs over (InfiniBand and RoCE
# MTU 4096, Ethernet clusters 9000): TCP/IP/Ethernet headers are then 0.8% of the shaped bytes
# instead of 4.4% at 1500, and the kernel handles a sixth of the segments. Every plan (and every
# peer library) pays the same; `--mtu 1500` emulates a plain Ethernet LAN.
DEFAULT_MTU = 9000
DEFAULT_CONGESTION_CONTROL = "cubic"  # see the module docstring
_CC_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")
CONGESTION_CONTROL_HELP = (
    "TCP congestion control inside the emulated nodes (default: cubic, Linux's default, where the "
    "host allows it in a namespace; inherit: the host's, which may be bbr, and bbr misreads a "
    "shaped veth)")

Bandwidth = Union[str, float, int]
_NUMBER = re.compile(r"\s*[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*")


# ──────────────────────────────────────────────────────────────────── rates for tc


def _sysctl_argv(ns: str, key: str, value: Optional[str] = None) -> List[str]:
    """Read (value None) or write one sysctl inside namespace ``ns`` with this interpreter, so no
    procps is needed: /proc/sys/net shows the namespace of the process that opens it."""
    path = "/proc/sys/" + key.replace(".", "/")
    # a refused write raises at close(); its errno name (EPERM, ENOENT) is the last stderr line
    code = ("import sys; print(open(sys.argv[1]).read().strip())" if value is None else
            "import errno, sys\ntry:\n    with open(sys.argv[1], 'w') as f: f.write(sys.argv[2])\n"
            "except OSError as e:\n    sys.exit(errno.errorcode.get(e.errno, str(e)))")
    return ["ip", "netns", "exec", ns, sys.executable, "-I", "-S", "-c", code, path] + (
        [] if value is None else [value])


def _read_sysctl(ns: str, key: str, check: bool = True) -> str:
    return run_cmd(_sysctl_argv(ns, key), check=check).stdout.strip()


def _write_sysctl(ns: str, key: str, value: str) -> None:
    run_cmd(_sysctl_argv(ns, key, value))


def parse_rate_bits(value: Bandwidth) -> float:
    """A link rate in bits/s, as tc takes it.

    A number (or a string that is only a number) is bits/s, as in tc; a string with a unit goes
    through the one bandwidth parser (`topology.units`: ``200mbit``, ``1Gbit/s``, ``2GB/s``,
    ``64kibit``; ``100Mbps`` is rejected as ambiguous).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"bandwidth must be a number or a string, got {type(value).__name__}")
    if isinstance(value, str) and not _NUMBER.fullmatch(value):
        return 8.0 * units.parse_bandwidth(value)
    bits = float(value)
    if not 0 < bits < float("inf"):
        raise ValueError(f"bandwidth must be positive and finite, got {value!r}")
    return bits


def parse_seconds(value: Union[str, float, int]) -> float:
    """Seconds from a number (or a bare number string) or a string with a unit (``'5ms'``)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"duration must be a number or a string, got {type(value).__name__}")
    secs = units.parse_time(value) if isinstance(value, str) and not _NUMBER.fullmatch(value) else float(value)
    if not secs >= 0:
        raise ValueError(f"duration must be >= 0, got {value!r}")
    return secs


def format_tc_rate(bits_per_s: float) -> str:
    """tc's syntax for a rate in bits/s (integer bits, which tc accepts for any magnitude)."""
    return f"{max(1, int(round(bits_per_s)))}bit"


def check_congestion_control(cc) -> Optional[str]:
    """An EmulatedCluster's congestion_control: "default", a name (``cubic``, ``bbr``, ``reno``)
    or None (inherited). Raises ValueError otherwise."""
    if cc is None or cc == "default" or (isinstance(cc, str) and _CC_NAME.fullmatch(cc) and cc != "inherit"):
        return cc
    raise ValueError(f"congestion_control must be 'default', a TCP congestion control name such as "
                     f"'cubic', or None (inherited), got {cc!r}")


def parse_congestion_control(text: Optional[str]) -> Optional[str]:
    """The CLI's --congestion-control: a name or ``inherit`` (None); not given: "default".
    Raises ValueError otherwise."""
    if text is None:
        return "default"
    if text == "inherit":
        return None
    if text == "default" or not _CC_NAME.fullmatch(text):
        raise ValueError(f"--congestion-control must be a name such as cubic or bbr, or inherit; got {text!r}")
    return text


def check_mtu(mtu=None) -> int:
    """``mtu`` as an int (None: ``DEFAULT_MTU``), or ValueError: a veth takes 68..65535; below
    IPv4's 576 TCP crawls."""
    if mtu is None:
        return DEFAULT_MTU
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535:
        raise ValueError(f"mtu must be an integer in [576, 65535], got {mtu!r}")
    return mtu


def tbf_burst_bytes(bits_per_s: float, mtu: int = 1500) -> int:
    """Bucket size for a tbf at this rate: one 4 ms tick of data, at least 2·MTU and 64 KiB+.

    The 64 KiB floor lets a whole GSO/TSO super-packet (veth and lo pass them) through without tbf
    having to segment it; 2·MTU covers lo (MTU 65536), where tbf would otherwise drop full packets.
    Measured here (one TCP stream, node→node): burst 2·MTU = 3000 B gives 190 Mbit/s on a 200mbit
    link but only 345 Mbit/s on a 1gbit link; this rule (100 kB / 500 kB) gives 191 and 956 Mbit/s,
    i.e. the line rate minus TCP/IP/Ethernet headers (1448/1514 = 95.6% at MTU 1500).
    """
    return int(max(bits_per_s / 8.0 / TC_HZ, 2 * mtu, 65536 + 2 * 1514))


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
    links: str = ""

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
            "STREAMATTN_EMULATED_LINKS": self.links,
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
    mtu:
        MTU of the nodes' veths (default ``DEFAULT_MTU`` = 9000, jumbo frames as on cluster
        fabrics, also for None; 1500 for a plain Ethernet LAN). 576..65535.
    congestion_control:
        TCP congestion control inside every node: ``"default"`` (cubic, Linux's default, where the
        host allows it in a namespace, else inherited with a warning), a name (that one, or
        ``ClusterUnavailable``), or ``None`` (what a new namespace inherits from the host's initial
        one). ``tcp_in_use`` says what the nodes run once the cluster is up.
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
        mtu: Optional[int] = None,
        congestion_control: Optional[str] = "default",
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
        self.inter_bw = parse_rate_bits(inter_bw)
        self.intra_bw = None if intra_bw is None else parse_rate_bits(intra_bw)
        self.inter_latency = None if inter_latency is None else parse_seconds(inter_latency)
        if self.inter_latency == 0:
            self.inter_latency = None
        self.tbf_latency = parse_seconds(tbf_latency)
        self.mtu = check_mtu(mtu)
        self.congestion_control = check_congestion_control(congestion_control)
        self.tcp_in_use: Optional[str] = None  # read back from the nodes by start()
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
    @property
    def links(self) -> str:
        """The shaped links, "inter=<rate>,intra=<rate or unshaped>,mtu=<veth MTU>,tcp=<congestion
        control>": a probed topology is cached per value (topology.cache.cache_key), so a job at
        another rate, MTU or congestion control (another goodput) probes afresh."""
        intra = "unshaped" if self.intra_bw is None else format_tc_rate(self.intra_bw)
        return (f"inter={format_tc_rate(self.inter_bw)},intra={intra},mtu={self.mtu},"
                f"tcp={self.tcp_in_use or self.congestion_control or 'inherited'}")

    def __repr__(self) -> str:
        return (f"EmulatedCluster({self.nodes}x{self.ranks_per_node}, {self.links.replace(',', ', ')}, "
                f"subnet={self.subnet}, state={self._state})")

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
                             master_addr=self.master_addr, links=self.links)

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
        full_env.setdefault("STREAMATTN_EMULATED_LINKS", self.links)
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
        with deferred_signals() as deferred:
            preflight(need_netem=self.inter_latency is not None)
            try:
                with GlobalLock():
                    cleanup_stale_locked(verbose=True)
                    self._take_owner_lock()
                    self.subnet = free_subnet()
                    self._state = "up"  # from here on, close() undoes whatever was made
                    atexit.register(self.close)
                    self._build()
                self._verify()
            except BaseException as e:
                self._teardown()
                if isinstance(e, (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired)):
                    raise ClusterUnavailable(f"building the emulated cluster failed: {describe_failure(e)}") from e
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
            with deferred_signals() as deferred:
                self._teardown()
                for s, prev in self._prev_handlers.items():  # put the caller's handlers back
                    if deferred.saved.get(s) == self._on_signal:
                        deferred.saved[s] = prev
                self._prev_handlers.clear()

    def _take_owner_lock(self) -> None:
        path = lock_path(self.pid, self.token)
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
        run_cmd(["ip", "link", "add", "name", self.bridge, "type", "bridge",
              "forward_delay", "0", "stp_state", "0"])
        self._created_links.append(self.bridge)
        run_cmd(["ip", "addr", "add", f"{net.network_address + 1}/{net.prefixlen}", "dev", self.bridge])
        run_cmd(["ip", "link", "set", self.bridge, "up"])
        for k in range(self.nodes):
            ns, host, inner = self.netns[k], self.host_ifnames[k], self.ifnames[k]
            run_cmd(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            if self.congestion_control is not None and not self._set_congestion_control(ns):
                self.congestion_control = None  # "default" refused here: every node inherits
            run_cmd(["ip", "link", "add", host, "mtu", str(self.mtu), "type", "veth",
                  "peer", "name", inner, "mtu", str(self.mtu), "netns", ns])
            self._created_links.append(host)
            run_cmd(["ip", "link", "set", host, "master", self.bridge])
            run_cmd(["ip", "link", "set", host, "up"])
            run_cmd(["ip", "-n", ns, "addr", "add", f"{net.network_address + 10 + k}/{net.prefixlen}",
                  "dev", inner])
            run_cmd(["ip", "-n", ns, "link", "set", inner, "up"])
            cmds = self._tbf(ns, inner, self.inter_bw, self.mtu) + self._tbf(None, host, self.inter_bw, self.mtu)
            if self.inter_latency is not None:
                cmds += self._netem(ns, inner) + self._netem(None, host)
            if self.intra_bw is not None:
                cmds += self._tbf(ns, "lo", self.intra_bw, 65536)
            for c in cmds:
                run_cmd(c)

    @property
    def _wanted_cc(self) -> Optional[str]:
        """The algorithm the nodes are to run (None: whatever they inherit)."""
        return DEFAULT_CONGESTION_CONTROL if self.congestion_control == "default" else self.congestion_control

    def _set_congestion_control(self, ns: str) -> bool:
        """Pin the namespace's TCP congestion control (net.ipv4.tcp_congestion_control is per
        namespace; a new one inherits the host's initial namespace's). A namespace may only choose
        what the host lists in net.ipv4.tcp_allowed_congestion_control (EPERM otherwise) among
        what the kernel has (ENOENT). Returns False when "default" could not be set (inherited)."""
        cc = self._wanted_cc
        try:
            _write_sysctl(ns, "net.ipv4.tcp_congestion_control", cc)
            return True
        except subprocess.CalledProcessError as e:
            why = ((e.stderr or "").strip().splitlines() or ["?"])[-1]
            allowed = _read_sysctl(ns, "net.ipv4.tcp_allowed_congestion_control", check=False) or "unknown"
            what = {"EPERM": "not among those the host allows a namespace to choose",
                    "ENOENT": "not in this kernel"}.get(why, why)
            if self.congestion_control == "default":
                print(f"streamattn: the emulated nodes keep the host's TCP congestion control: {cc} "
                      f"is {what} (net.ipv4.tcp_allowed_congestion_control: {allowed})",
                      file=sys.stderr)
                return False
            raise ClusterUnavailable(
                f"cannot set TCP congestion control {cc!r} in the emulated nodes: {what} "
                f"(net.ipv4.tcp_allowed_congestion_control: {allowed}); pass congestion_control=None "
                "(--congestion-control inherit) to keep the host's") from e

    def _verify(self) -> None:
        """Refuse to run unshaped: every expected tbf must be there with the configured rate."""
        def check(ns: Optional[str], dev: str) -> None:
            tc = ["tc"] if ns is None else ["tc", "-n", ns]
            out = run_cmd(tc + ["qdisc", "show", "dev", dev]).stdout
            if " tbf " not in f" {out} ":
                raise ClusterUnavailable(f"tbf missing on {dev} after setup: {out.strip()!r}")
        want = self._wanted_cc
        running = {_read_sysctl(ns, "net.ipv4.tcp_congestion_control") for ns in self.netns}
        if len(running) != 1 or (want is not None and running != {want}):
            raise ClusterUnavailable(f"TCP congestion control in the emulated nodes is {sorted(running)} "
                                     f"after setting {want or 'nothing'}")
        self.tcp_in_use = running.pop()
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
            signal_proc(p, signal.SIGTERM)
        end = time.monotonic() + self.kill_grace
        while live and time.monotonic() < end and not all(exited_unreaped(p) for p in live):
            time.sleep(0.02)
        for p in live:
            signal_proc(p, signal.SIGKILL)  # also whatever is left of its group
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} did not die")
        self._procs.clear()
        # 2. namespaces (anything still inside is killed); their veth ends and qdiscs go with them
        for ns in reversed(self._created_ns):
            e = delete_netns(ns)
            if e:
                errors.append(e)
        # 3. root-side links (normally already gone with their peers) and the bridge
        present = set(list_links())
        for link in reversed(self._created_links):
            if link in present:
                e = delete_link(link)
                if e:
                    errors.append(e)
        self._created_ns.clear()
        self._created_links.clear()
        if self._lock_fd is not None:
            try:
                os.unlink(lock_path(self.pid, self.token))
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
    ap.add_argument("--mtu", type=int, default=DEFAULT_MTU)
    ap.add_argument("--congestion-control", default=None, metavar="NAME", help=CONGESTION_CONTROL_HELP)
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
            cc = parse_congestion_control(a.congestion_control)
            with EmulatedCluster(n, r, a.inter_bw, a.intra_bw, mtu=a.mtu, congestion_control=cc) as c:
                print(c)
                rate = parse_rate_bits(a.inter_bw)
                for src, dst in [(0, 1 % n), (1 % n, 0)]:
                    bps = measure_throughput(c, src, dst, a.seconds)
                    print(f"node{src}→node{dst}: {bps / 1e6:.1f} Mbit/s "
                          f"({100 * bps / rate:.0f}% of {format_tc_rate(rate)})")
                if a.intra_bw:
                    bps = measure_throughput(c, 0, 0, a.seconds)
                    print(f"node0 lo: {bps / 1e6:.1f} Mbit/s "
                          f"({100 * bps / parse_rate_bits(a.intra_bw):.0f}% of {a.intra_bw})")
    except ClusterUnavailable as e:
        print(f"emulated cluster unavailable: {e.reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
