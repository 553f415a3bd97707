"""The Linux plumbing under the emulated cluster: `ip`/`tc` commands, the names and lock files that
mark what a cluster owns, the sweeper that removes what dead owners left, and the preflight that
refuses to run when namespaces or tbf are unavailable.

Names carry the owner's PID and a random token: namespaces ``streamattn-<pid>-<tok>-n<k>``, links
``sa{b,h,n}<pid:06x><tok><k:02d>``. The owner holds an flock on ``/run/streamattn/<pid>-<tok>.lock``
for its whole life; `cleanup_stale` removes what belongs to owners that are gone (kill -9 included).
Addresses come only from 198.18.0.0/15 (RFC 2544 benchmarking range).
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

from ..procs import pid_alive
from .signals import deferred_signals

NS_PREFIX = "streamattn-"
STATE_DIR = "/run/streamattn"
NET_RANGE = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range, nothing else

_NS_RE = re.compile(r"^streamattn-(\d+)-([0-9a-f]{4})-(n\d+|probe)$")
_LINK_RE = re.compile(r"^sa([bhnp])([0-9a-f]{6})([0-9a-f]{4})(\d{2})?$")


class ClusterUnavailable(RuntimeError):
    """The emulated cluster cannot be built here (reason in ``.reason``). Callers exit non-zero."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def run_cmd(argv: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, list(argv), p.stdout, p.stderr)
    return p


def describe_failure(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        return f"`{' '.join(e.cmd)}` failed (exit {e.returncode}): {(e.stderr or '').strip()}"
    return f"{type(e).__name__}: {e}"


def list_netns() -> List[str]:
    out = run_cmd(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links() -> List[str]:
    out = run_cmd(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def netns_pids(ns: str) -> List[int]:
    out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def lock_path(pid: int, tok: str) -> str:
    return os.path.join(STATE_DIR, f"{pid}-{tok}.lock")


def owner_alive(pid: int, tok: str) -> bool:
    """Is the cluster (pid, tok) still owned by a live process?

    The owner holds an flock on its lock file for its whole life (released by the kernel on any
    death, kill -9 included), which also survives PID reuse and PID namespaces. Without a lock file
    (e.g. a preflight probe) the owner's PID decides.
    """
    path = lock_path(pid, tok)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return pid_alive(pid)
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


class GlobalLock:
    """Serialises cluster creation and stale cleanup between processes on this host."""

    def __enter__(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        self.fd = os.open(os.path.join(STATE_DIR, "global.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def kill_pids(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def delete_netns(ns: str, deadline: float = 5.0) -> Optional[str]:
    """Kill everything inside ``ns`` and delete it; returns an error string or None."""
    end = time.monotonic() + deadline
    while True:
        pids = [p for p in netns_pids(ns) if p != os.getpid()]
        if not pids or time.monotonic() > end:
            break
        kill_pids(pids)
        time.sleep(0.05)
    p = run_cmd(["ip", "netns", "del", ns], check=False)
    if p.returncode != 0 and ns in list_netns():
        return f"ip netns del {ns}: {p.stderr.strip()}"
    return None


def delete_link(name: str) -> Optional[str]:
    p = run_cmd(["ip", "link", "del", name], check=False)
    if p.returncode != 0 and name in list_links():
        return f"ip link del {name}: {p.stderr.strip()}"
    return None


def cleanup_stale_locked(verbose: bool = False) -> List[str]:
    removed: List[str] = []
    owners = set()
    for ns in list_netns():
        m = _NS_RE.match(ns)
        if m and not owner_alive(int(m.group(1)), m.group(2)):
            owners.add((int(m.group(1)), m.group(2)))
            if delete_netns(ns) is None:
                removed.append(ns)
    for link in list_links():
        m = _LINK_RE.match(link)
        if m and not owner_alive(int(m.group(2), 16), m.group(3)):
            owners.add((int(m.group(2), 16), m.group(3)))
            if delete_link(link) is None:
                removed.append(link)
    try:
        lockfiles = os.listdir(STATE_DIR)
    except OSError:
        lockfiles = []
    for fname in lockfiles:
        m = re.fullmatch(r"(\d+)-([0-9a-f]{4})\.lock", fname)
        if m and not owner_alive(int(m.group(1)), m.group(2)):
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
    with GlobalLock():
        return cleanup_stale_locked(verbose)


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
    with deferred_signals():  # a Ctrl-C now is delivered after the probe namespace is gone
        try:
            for argv, what in steps:
                try:
                    run_cmd(argv)
                except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired) as e:
                    raise ClusterUnavailable(f"{what}: {describe_failure(e)}") from None
        finally:
            if ns in list_netns():
                run_cmd(["ip", "netns", "del", ns], check=False)
    _preflight_ok[need_netem] = True


def free_subnet() -> ipaddress.IPv4Network:
    """First /24 of 198.18.0.0/15 with no address of the root namespace in it."""
    out = run_cmd(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    used = set()
    for m in re.finditer(r"\binet\s+(\d+\.\d+\.\d+\.\d+)/(\d+)", out):
        addr = ipaddress.ip_address(m.group(1))
        if addr in NET_RANGE:
            used.add(ipaddress.ip_network(f"{addr}/24", strict=False))
    for net in NET_RANGE.subnets(new_prefix=24):
        if net not in used:
            return net
    raise ClusterUnavailable("no free /24 left in 198.18.0.0/15 for another emulated cluster")
