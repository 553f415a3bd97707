"""How fast an emulated link really is: one TCP stream between two nodes' namespaces (plain sockets),
counted after a warm-up that skips tbf's initial burst and TCP slow start."""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import Optional

from .signals import signal_proc

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


def measure_throughput(cluster, src_node: int, dst_node: int,
                       seconds: float = 2.0, warmup: Optional[float] = None) -> float:
    """TCP goodput in bits/s from ``src_node`` to ``dst_node`` of an `EmulatedCluster` (one stream).

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
                signal_proc(p, signal.SIGKILL)
                p.wait()
