"""One command for a multi-node torchrun job on one machine: an emulated cluster (bench/cluster.py)
whose every node runs the same ``torchrun`` a real node would.

``launch_emulated(2, 2, ["-m", "streamattn.cli", "probe"])`` builds two node namespaces (veths on a
bridge in 198.18.0.0/15, each uplink shaped with ``tc tbf``), and in node k's namespace runs, as host
``sa-node<k>`` (its own UTS namespace: nodes have distinct host identities, nothing is declared)::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
             --rdzv-endpoint <node0 address>:<port> --rdzv-id <id> --local-addr <node k address> \\
             [--rdzv-conf is_host=true on node 0, false elsewhere]  <the user's args>

``--local-addr`` is what real multi-homed nodes need too: the node's own address on the cluster
network, which torchrun hands out as MASTER_ADDR (the emulated hostnames resolve nowhere). Gloo
uses the node's veth (``GLOO_SOCKET_IFNAME``, set by ``EmulatedCluster.popen``). Node 0's output
goes to stdout unchanged, the other nodes' with a ``[node k]`` prefix. The return code is the first
non-zero node exit code (0 when all succeed); a node that outlives ``timeout`` is killed and
reported. The cluster is always torn down (success, error, Ctrl-C; `EmulatedCluster`).

Each cluster has its own namespaces, so the fixed rendezvous port never collides with other
clusters or with the host; subnets are allocated by `EmulatedCluster` (next free /24).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import List, Optional, Sequence, TextIO

from .cluster import ClusterUnavailable, EmulatedCluster

DEFAULT_PORT = 29500
HOSTNAME_FMT = "sa-node{}"
# Variables a launched job must not inherit from the caller: a torchrun/srun context of the caller,
# or a host identity / topology that would override what the nodes discover for themselves.
_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
          "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "STREAMATTN_HOST_ID",
          "STREAMATTN_TOPOLOGY", "STREAMATTN_EMULATED_NODE", "STREAMATTN_EMULATED_LINKS")


def parse_shape(text: str):
    """``"2x2"`` -> (2, 2): nodes x processes per node."""
    parts = text.lower().split("x")
    try:
        n, g = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--emulate wants NODESxPROCS, e.g. 2x2, got {text!r}") from None
    if n < 1 or g < 1:
        raise ValueError(f"--emulate {text!r}: nodes and processes per node must be >= 1")
    return n, g


def torchrun_argv(cluster: EmulatedCluster, node: int, user_args: Sequence[str], *,
                  port: int = DEFAULT_PORT, rdzv_id: str = "streamattn") -> List[str]:
    """The torchrun command node ``node`` runs (the same a real node would, plus --local-addr, and
    --log-dir /dev/null: the ranks' output comes through the launcher's pipes, and torchrun's
    default log directory is a /tmp/torchelastic_* per node and run that nothing removes)."""
    return [sys.executable, "-m", "torch.distributed.run", "--log-dir", os.devnull,
            "--nnodes", str(cluster.nodes), "--nproc-per-node", str(cluster.ranks_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{cluster.node_ip(0)}:{port}",
            "--rdzv-id", rdzv_id, "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}",
            "--local-addr", cluster.node_ip(node), "--max-restarts", "0"] + list(user_args)


def _pump(src, dst: TextIO, prefix: str, lock: threading.Lock) -> None:
    for line in iter(src.readline, ""):
        with lock:
            dst.write(prefix + line)
            dst.flush()
    src.close()


def launch_emulated(nodes: int, procs_per_node: int, user_args: Sequence[str], *,
                    inter_bw="1gbit", intra_bw=None, mtu: Optional[int] = None,
                    congestion_control: Optional[str] = "default",
                    port: int = DEFAULT_PORT,
                    timeout: float = 1800.0, env: Optional[dict] = None,
                    stdout: Optional[TextIO] = None, cluster_hook=None) -> int:
    """Run ``torchrun ... user_args`` on every node of an emulated ``nodes x procs_per_node``
    cluster; return the job's exit code. Raises `ClusterUnavailable` (with the reason) when the
    cluster cannot be built here (not root, no netns / tc). ``mtu``: the nodes' link MTU (None =
    the cluster's default, jumbo frames); ``congestion_control``: TCP's inside the nodes
    (EmulatedCluster's argument). ``cluster_hook(cluster)``, if given, is
    called once the cluster is up (tests record its names to check the teardown)."""
    if not user_args:
        raise ValueError("nothing to run: give torchrun's script and arguments after --")
    out = stdout or sys.stdout
    base = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    base.update(env or {})
    base.setdefault("OMP_NUM_THREADS", "1")
    base["PYTHONUNBUFFERED"] = "1"
    lock = threading.Lock()
    with EmulatedCluster(nodes, procs_per_node, inter_bw, intra_bw, mtu=mtu,
                         congestion_control=congestion_control) as cluster:
        if cluster_hook is not None:
            cluster_hook(cluster)
        with lock:
            nodes_txt = ", ".join(f"{HOSTNAME_FMT.format(k)}={cluster.node_ip(k)}" for k in range(nodes))
            out.write(f"streamattn launch: {cluster!r}; nodes {nodes_txt}; rendezvous "
                      f"{cluster.node_ip(0)}:{port}\n")
            out.flush()
        procs, pumps = [], []
        rdzv_id = f"sa{cluster.pid}{cluster.token}"
        for k in range(nodes):
            argv = [sys.executable, "-m", "streamattn.bench.utsexec", HOSTNAME_FMT.format(k), "--"]
            argv += torchrun_argv(cluster, k, user_args, port=port, rdzv_id=rdzv_id)
            p = cluster.popen(k, argv, env=base, inherit_env=False, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, out, "" if k == 0 else f"[node {k}] ",
                                                     lock), daemon=True)
            t.start()
            pumps.append(t)
        deadline = time.monotonic() + timeout
        codes: List[Optional[int]] = [None] * nodes
        while any(c is None for c in codes):
            for k, p in enumerate(procs):
                if codes[k] is None:
                    codes[k] = p.poll()
            failed = [c for c in codes if c not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break  # one node failed: the others would wait for it until their own timeouts
            time.sleep(0.1)
        timed_out = any(c is None for c in codes) and not any(c not in (None, 0) for c in codes)
        # leaving the `with` kills whatever still runs in the namespaces and removes them
        cluster.close()
        for t in pumps:
            t.join(timeout=5)
    if timed_out:
        out.write(f"streamattn launch: the job did not finish within {timeout:g} s; killed\n")
        return 124
    bad = [(k, c) for k, c in enumerate(codes) if c not in (None, 0)]
    if bad:
        k, c = bad[0]
        out.write(f"streamattn launch: node {k} exited with code {c}; the other nodes were stopped\n")
        out.flush()
        return c if c > 0 else 128 - c
    return 0


__all__ = ["ClusterUnavailable", "DEFAULT_PORT", "launch_emulated", "parse_shape", "torchrun_argv"]
