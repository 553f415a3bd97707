"""Rank pools for the benchmark: the ranks of an emulated cluster inside their node namespaces."""
from __future__ import annotations


def emulated_pool(cluster, *, threads: int = 1, timeout: float = 600.0, env=None):
    """A RankPool of cluster.world_size ranks, rank r inside the namespace of its node (node-major
    placement), gloo on the node's veth (GLOO_SOCKET_IFNAME), the TCPStore on the bridge address,
    and STREAMATTN_TOPOLOGY="NxR:inter=<the shaped rate>" so streamattn counts bytes as
    intra/inter-node and its planner costs the link at the rate it is shaped to (a bare "NxR" spec
    declares 1 Gbit/s, whatever --inter-bw says). The cluster's teardown kills anything left in the
    namespaces; close the pool first."""
    from ..testing import RankPool

    spec = f"{cluster.nodes}x{cluster.ranks_per_node}"
    if getattr(cluster, "inter_bw", None):
        spec += f":inter={cluster.inter_bw / 1e6:g}Mbit/s"

    def node_env(rank):
        place = cluster.rank_env(rank)
        e = dict(place.env)
        e.update(STREAMATTN_TOPOLOGY=spec, STREAMATTN_BENCH_IFACE=place.ifname)
        return e

    return RankPool(cluster.world_size, env=env, threads=threads, timeout=timeout,
                    launcher=lambda r: ["ip", "netns", "exec", cluster.rank_env(r).netns],
                    store_host=cluster.master_addr, bind_host=cluster.master_addr,
                    node_env=node_env)
