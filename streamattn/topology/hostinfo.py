"""What one process can learn about its host without talking to others: host identity and NICs.

- `host_identity()` / `host_hash()`: which ranks share a node. ``STREAMATTN_HOST_ID`` overrides the
  identity (used by tests and by launchers that put several "nodes" on one kernel).
- `read_infiniband()`: ports under ``/sys/class/infiniband`` (rate, state, link layer).
- `read_net_interface()`: the socket interface gloo uses and its speed from ``/sys/class/net``.
- `network_link()`: a declared inter-node `Link` from those (bandwidth bytes/s per direction).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import socket
from dataclasses import dataclass
from typing import List, Optional

from .. import config
from .model import Link, LinkKind
from .spec import DEFAULT_INTER

HOST_ID_ENV = "STREAMATTN_HOST_ID"


def host_identity() -> str:
    """A string naming this host: ``$STREAMATTN_HOST_ID`` if set, else hostname + machine-id
    (``/etc/machine-id``, ``/var/lib/dbus/machine-id``) or, failing those, the boot id."""
    override = config.host_id()
    if override:
        return "env:" + override
    ident = ""
    for p in ("/etc/machine-id", "/var/lib/dbus/machine-id", "/proc/sys/kernel/random/boot_id"):
        try:
            with open(p, "r") as f:
                ident = f.read().strip()
        except OSError:
            continue
        if ident:
            break
    return f"{socket.gethostname()}\0{ident}"


def host_hash(identity: Optional[str] = None) -> int:
    """Signed 64-bit hash of the host identity (fits an int64 tensor for all_gather)."""
    ident = host_identity() if identity is None else identity
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:8], "little", signed=True)


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def kernel_hash() -> int:
    """Signed 64-bit hash of the running kernel's boot id: equal for every process on one machine,
    whatever ``STREAMATTN_HOST_ID`` or network namespace says (an emulated cluster's "nodes" share
    the cores of one kernel). 0 when the boot id cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "r") as f:
            ident = f.read().strip()
    except OSError:
        return 0
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:8], "little", signed=True)


@dataclass(frozen=True)
class IBPort:
    device: str  # e.g. mlx5_0
    port: int
    rate_Bps: Optional[float]  # bytes/s per direction, from the "rate" file
    rate_text: str  # the file's text, e.g. "400 Gb/sec (4X NDR)"
    state: str  # e.g. "ACTIVE"
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)

    @property
    def active(self) -> bool:
        return self.state.upper() == "ACTIVE"


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "r") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def parse_ib_rate(text: str) -> Optional[float]:
    """``"400 Gb/sec (4X NDR)"`` -> 5e10 bytes/s per direction (sysfs rates are Gbit/s)."""
    m = re.match(r"\s*([0-9.]+)\s*([GMT]?)b/sec", text or "")
    if not m:
        return None
    scale = {"": 1, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    return float(m.group(1)) * scale / 8


def read_infiniband(root: str = "/sys/class/infiniband") -> List[IBPort]:
    """Every port of every RDMA device under ``root`` (empty list if there is none)."""
    out: List[IBPort] = []
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return out
    for dev in devices:
        pdir = os.path.join(root, dev, "ports")
        try:
            ports = sorted(os.listdir(pdir), key=lambda s: int(s) if s.isdigit() else 0)
        except OSError:
            continue
        for p in ports:
            base = os.path.join(pdir, p)
            rate = _read(os.path.join(base, "rate")) or ""
            state = _read(os.path.join(base, "state")) or ""
            state = state.split(":", 1)[-1].strip()  # "4: ACTIVE" -> "ACTIVE"
            layer = _read(os.path.join(base, "link_layer")) or ""
            out.append(
                IBPort(dev, int(p) if p.isdigit() else 0, parse_ib_rate(rate), rate, state, layer)
            )
    return out


@dataclass(frozen=True)
class NetInterface:
    name: str
    speed_Bps: Optional[float]  # bytes/s per direction; None if the driver does not say (veth, ...)
    arp_type: Optional[int]  # /sys/class/net/<if>/type: 1 Ethernet, 32 InfiniBand (IPoIB), 772 lo


def _default_route_iface(proc_route: str = "/proc/net/route") -> Optional[str]:
    text = _read(proc_route)
    if not text:
        return None
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) > 2 and f[1] == "00000000":
            return f[0]
    return None


def read_net_interface(
    root: str = "/sys/class/net", ifname: Optional[str] = None
) -> Optional[NetInterface]:
    """The interface gloo's sockets use: ``ifname``, else ``$GLOO_SOCKET_IFNAME`` (first entry),
    else the default route's interface, else the first non-loopback interface that is up."""
    name = ifname or (os.environ.get("GLOO_SOCKET_IFNAME") or "").split(",")[0].strip() or None
    if name is None:
        name = _default_route_iface()
    if name is None:
        try:
            for cand in sorted(os.listdir(root)):
                if cand != "lo" and (_read(os.path.join(root, cand, "operstate")) or "") == "up":
                    name = cand
                    break
        except OSError:
            return None
    if name is None or not os.path.isdir(os.path.join(root, name)):
        return None
    speed = _read(os.path.join(root, name, "speed"))
    speed_Bps = None
    try:
        mbit = int(speed) if speed is not None else -1
        if mbit > 0:
            speed_Bps = mbit * 1e6 / 8
    except ValueError:
        pass
    t = _read(os.path.join(root, name, "type"))
    return NetInterface(name, speed_Bps, int(t) if t and t.isdigit() else None)


IB_LATENCY_S = 5e-6  # declared assumption for a small message over IB verbs via the library
ROCE_LATENCY_S = 10e-6  # declared assumption


def network_link(
    backend: str,
    ranks_per_node: int,
    ib_ports: Optional[List[IBPort]] = None,
    netif: Optional[NetInterface] = None,
) -> Link:
    """A declared inter-node link for this host.

    With an NCCL backend and active RDMA ports: INFINIBAND (or ROCE when the link layer is
    Ethernet) at the slowest active port's rate, ``shared_by`` = ranks per node / ports (rounded up).
    Otherwise (gloo and other socket transports): the socket interface's kind and speed, shared by
    all ranks of the node; speed unknown -> the 1 Gbit/s declared default.
    """
    rpn = max(1, int(ranks_per_node))
    active = [p for p in (ib_ports or []) if p.active and p.rate_Bps]
    if "nccl" in backend and active:
        roce = all(p.link_layer.lower() == "ethernet" for p in active)
        rate = min(p.rate_Bps for p in active)  # type: ignore[type-var]
        ports = ",".join(f"{p.device}/{p.port}" for p in active)
        return Link(
            LinkKind.ROCE if roce else LinkKind.INFINIBAND,
            rate,
            ROCE_LATENCY_S if roce else IB_LATENCY_S,
            source=f"spec:sysfs {len(active)} active port(s) {ports} at {active[0].rate_text}; "
            "latency assumed",
            shared_by=max(1, math.ceil(rpn / len(active))),
        )
    kind = LinkKind.ETHERNET
    if netif is not None and netif.arp_type == 32:
        kind = LinkKind.INFINIBAND  # IPoIB used through sockets
    if netif is not None and netif.speed_Bps:
        return Link(
            kind,
            netif.speed_Bps,
            DEFAULT_INTER.latency_s,
            source=f"spec:sysfs {netif.name} speed {netif.speed_Bps * 8 / 1e6:g} Mbit/s; "
            "latency assumed",
            shared_by=rpn,
        )
    where = f" ({netif.name}: speed unknown)" if netif is not None else ""
    return Link(
        kind,
        DEFAULT_INTER.bandwidth_Bps,
        DEFAULT_INTER.latency_s,
        source=f"declared:default 1 Gbit/s{where}",
        shared_by=rpn,
    )
