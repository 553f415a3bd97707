"""Where a `Topology` comes from: `resolve_topology` (the order of sources) and `probe`.

Order (`resolve_topology`):
  1. an explicit ``topology=`` (a `Topology`, a path to a .json file, a spec, a machine name), else
     ``$STREAMATTN_TOPOLOGY`` naming a .json file;
  2. an emulation spec in ``$STREAMATTN_TOPOLOGY`` (``"2x4"``, ``"2x4:intra=20GB/s,..."``; also a
     shipped machine name) -- it must describe exactly the group's size;
  3. `probe` of the running group.
Every rank ends with the identical topology: the explicit / environment routes compare
fingerprints across the group, the probe has group rank 0 decide and broadcast the JSON.

`probe` (collective over the group; every rank must call it):
  - node grouping: each rank's host identity hash (`hostinfo.host_hash`) is all-gathered as int64;
    nodes are numbered in order of first appearance by rank (rank 0 is on node 0);
  - on CUDA ranks with NVML: per-peer NVLink / NVSwitch / PCIe level / P2P (`gpulinks`); without
    NVML or CUDA: SHM inside a node (CPU processes), UNKNOWN for GPUs NVML cannot describe;
  - network between nodes: ``/sys/class/infiniband`` (NCCL) or the socket interface in
    ``/sys/class/net`` (gloo), ETHERNET 1 Gbit/s declared when nothing is known;
  - with ``measure=True``: a send/recv test of one intra-node pair and one inter-node pair over the
    group's own backend (`measure.measure_pair`); the measured numbers replace the declared ones for
    the link class of the measured pair, with ``source="measured:<method>"``;
  - ``cache=True``: rank 0 looks the result up on disk (`cache`) and broadcasts it; a fresh measured
    result is written back (atomically, mode 0600).
All exchanges are int64 / float64 / uint8 tensors with a timeout on every wait; no pickle.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from typing import Dict, List, Optional, Tuple, Union

from .. import config
from . import cache as _cache
from . import comm
from .gpulinks import gpu_rows, import_nvml, local_gpu_bus_id, peak_flops_for
from .hostinfo import host_hash, network_link, read_infiniband, read_net_interface
from .machines import list_machines, load_machine
from .measure import DEFAULT_REPS, measure_pair
from .model import Link, LinkKind, Topology
from .spec import DEFAULT_INTRA, is_spec, parse_spec

TOPOLOGY_ENV = "STREAMATTN_TOPOLOGY"
NBYTES_ENV = "STREAMATTN_PROBE_BYTES"

UNKNOWN_GPU_LINK = Link(
    LinkKind.UNKNOWN, 10e9, 10e-6, source="declared:GPU link not identified (no NVML)"
)


# ------------------------------------------------------------------------------ resolve_topology
def _from_text(text: str, what: str) -> Topology:
    """A topology from a path, a spec, or a machine name."""
    text = text.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    if is_spec(text):  # checked first: "2x4:inter=1Gbit/s" contains a slash
        try:
            return parse_spec(text)
        except ValueError as e:
            raise ValueError(f"{what}={text!r}: {e}") from None
    if text.lower().endswith(".json") or os.path.sep in text or os.path.isfile(text):
        if not os.path.isfile(text):
            raise ValueError(f"{what}={text!r}: topology file not found")
        try:
            t = Topology.load(text)
        except ValueError as e:
            raise ValueError(f"{what}={text!r}: {e}") from None
        return t.replace(provenance=f"file:{os.path.abspath(text)}")
    if text in list_machines():
        return load_machine(text)
    raise ValueError(
        f"{what}={text!r} is neither an existing .json file, an emulation spec like '2x4' or "
        f"'2x4:intra=20GB/s,inter=1Gbit/s', nor a shipped machine ({', '.join(list_machines())})"
    )


def _resolve_local(topology, n: Optional[int]) -> Optional[Topology]:
    if topology is not None:
        if isinstance(topology, Topology):
            t, what = topology, "topology"
        elif isinstance(topology, (str, os.PathLike)):
            what = "topology"
            t = _from_text(os.fspath(topology), what)
        else:
            raise ValueError(
                f"topology must be a Topology, a path, a spec or a machine name, got "
                f"{type(topology).__name__}"
            )
    else:
        env = config.topology()
        if not env:
            return None
        what = TOPOLOGY_ENV
        t = _from_text(env, what)
    if n is not None and t.world_size != n:
        raise ValueError(
            f"{what} ({t.name or t.provenance or 'topology'}) describes {t.world_size} ranks but "
            f"the process group has {n}"
        )
    return t


def resolve_topology(group=None, topology: Union[Topology, str, os.PathLike, None] = None) -> Topology:
    """The topology of ``group`` (default: the world group) from the first source that applies:
    ``topology`` / ``$STREAMATTN_TOPOLOGY`` (file, spec or machine name), else `probe(group)`.

    Collective when torch.distributed is initialised: every rank must call it. Raises ValueError
    on every rank (never hangs) if any rank's source is malformed, has the wrong size, or differs
    from the other ranks'.
    """
    n = comm.world(group) if comm.is_distributed(group) else None
    if n is not None and comm.rank(group) < 0:
        raise ValueError("this process is not a member of the process group passed to resolve_topology")
    err: Optional[str] = None
    t: Optional[Topology] = None
    try:
        t = _resolve_local(topology, n)
    except ValueError as e:
        err = str(e)
    if n is None or n == 1:
        if err:
            raise ValueError(err)
        return t if t is not None else probe(group)
    # agree across ranks: [ok, explicit?, fingerprint prefix]
    fp = int(t.fingerprint()[:15], 16) if t is not None else 0
    rows = comm.all_gather_int64([0 if err else 1, 1 if t is not None else 0, fp], group=group)
    me = comm.rank(group)
    if err:
        raise ValueError(err)
    bad = [r for r, row in enumerate(rows) if row[0] == 0]
    if bad:
        raise ValueError(f"topology could not be resolved on rank(s) {bad} (see their error)")
    explicit = {row[1] for row in rows}
    if explicit == {0}:
        return probe(group)
    if len(explicit) != 1 or len({row[2] for row in rows}) != 1:
        detail = ", ".join(f"rank {r}: {'explicit' if row[1] else 'probe'}" for r, row in enumerate(rows))
        raise ValueError(
            "ranks resolved different topologies (check that topology= / "
            f"{TOPOLOGY_ENV} is the same on every rank): {detail}; this is rank {me}"
        )
    return t  # type: ignore[return-value]


# ------------------------------------------------------------------------------ probe
def _node_map(hosts: List[int]) -> Tuple[int, ...]:
    ids: Dict[int, int] = {}
    return tuple(ids.setdefault(h, len(ids)) for h in hosts)


def _measure_pairs(node: Tuple[int, ...]) -> Tuple[Optional[Tuple[int, int]], Optional[Tuple[int, int]]]:
    """(intra pair, inter pair) to measure, identical on every rank."""
    by_node: Dict[int, List[int]] = {}
    for r, n in enumerate(node):
        by_node.setdefault(n, []).append(r)
    intra = next(((rs[0], rs[1]) for _, rs in sorted(by_node.items()) if len(rs) > 1), None)
    nodes = sorted(by_node)
    inter = (by_node[nodes[0]][0], by_node[nodes[1]][0]) if len(nodes) > 1 else None
    return intra, inter


def _local_facts(group, be: str, peers_bus: Optional[Dict[int, Tuple[int, int, int, int]]], my_bus) -> dict:
    """What this rank reports to rank 0 (JSON): device name, GPU links to same-host peers, NICs."""
    facts: dict = {"device": "cpu", "links": {}, "net": None}
    try:
        if my_bus is not None:
            import torch

            facts["device"] = torch.cuda.get_device_name(torch.cuda.current_device())
            nvml = import_nvml()
            if nvml is not None:
                try:
                    if peers_bus:
                        rows = gpu_rows(nvml, my_bus, peers_bus)
                        facts["links"] = {str(r): lk.to_dict() for r, lk in rows.items()}
                finally:
                    try:
                        nvml.nvmlShutdown()
                    except Exception:
                        pass
    except Exception as e:  # never fail before a collective
        facts["error"] = f"gpu: {type(e).__name__}: {e}"
    try:
        facts["ib"] = [
            [p.device, p.port, p.rate_Bps, p.rate_text, p.state, p.link_layer] for p in read_infiniband()
        ]
        nif = read_net_interface()
        facts["netif"] = [nif.name, nif.speed_Bps, nif.arp_type] if nif else None
    except Exception as e:
        facts["error"] = f"net: {type(e).__name__}: {e}"
    return facts


def _build(
    n: int,
    node: Tuple[int, ...],
    facts: List[dict],
    be: str,
    gpu: bool,
) -> Topology:
    """Rank 0: the declared topology from every rank's facts."""
    from .hostinfo import IBPort, NetInterface

    # intra-node links, symmetric (slower of the two directions' views)
    pair_links: Dict[Tuple[int, int], Link] = {}
    for a in range(n):
        for b in range(a + 1, n):
            if node[a] != node[b]:
                continue
            views = []
            for x, y in ((a, b), (b, a)):
                d = facts[x].get("links", {}).get(str(y))
                if d:
                    views.append(Link.from_dict(d))
            if views:
                pair_links[(a, b)] = min(views, key=lambda lk: (lk.bandwidth_Bps, -lk.latency_s, lk.source))
            else:
                pair_links[(a, b)] = UNKNOWN_GPU_LINK if gpu else DEFAULT_INTRA
    if pair_links:
        counts = Counter(pair_links.values())
        intra = max(counts, key=lambda lk: (counts[lk], lk.bandwidth_Bps, lk.to_dict()["source"]))
    else:
        intra = UNKNOWN_GPU_LINK if gpu else DEFAULT_INTRA
    overrides = {k: v for k, v in pair_links.items() if v != intra}

    inter = None
    if len(set(node)) > 1:
        f0 = facts[0]
        ib = [IBPort(p[0], int(p[1]), p[2], p[3], p[4], p[5]) for p in f0.get("ib", []) or []]
        nif = NetInterface(*f0["netif"]) if f0.get("netif") else None
        rpn = max(Counter(node).values())
        inter = network_link(be, rpn, ib, nif)

    devices = {f.get("device", "cpu") for f in facts}
    device = devices.pop() if len(devices) == 1 else "mixed: " + ", ".join(sorted(devices))
    flops, flops_src = peak_flops_for(device) if gpu else (None, "")
    errors = sorted({f"rank {r}: {f['error']}" for r, f in enumerate(facts) if f.get("error")})
    notes = "probed; declared numbers unless source says measured"
    if errors:
        notes += "; errors: " + "; ".join(errors)
    return Topology(
        world_size=n,
        node=node,
        intra=intra,
        inter=inter,
        overrides=overrides,
        name="probe",
        provenance="probe",
        device=device,
        peak_flops=flops,
        peak_flops_source=flops_src,
        notes=notes,
    )


def _apply_measurement(t: Topology, pair: Tuple[int, int], m) -> Topology:
    """Replace the link class of ``pair`` by the measured numbers (kind and sharing kept)."""
    old = t.link(*pair)
    new = Link(old.kind, m.bandwidth_Bps, m.latency_s, source=m.source, shared_by=old.shared_by)
    changes: dict = {}
    if t.intra == old:
        changes["intra"] = new
    if t.inter == old:
        changes["inter"] = new
    changes["overrides"] = {k: (new if v == old else v) for k, v in t.overrides.items()}
    return t.replace(**changes)


def probe(
    group=None,
    *,
    measure: bool = True,
    cache: bool = True,
    timeout_s: Optional[float] = None,
    nbytes: Optional[int] = None,
    reps: int = DEFAULT_REPS,
) -> Topology:
    """Probe the machine under ``group`` (default: world). Collective: every rank must call it,
    and every rank returns the identical `Topology`.

    Args:
        measure: run the send/recv test (``nbytes`` bytes, default ``$STREAMATTN_PROBE_BYTES`` or
            8 MiB, ``reps`` repetitions) on one intra-node and one inter-node pair.
        cache: read the on-disk cache (rank 0) and, after a measured probe, write it.
        timeout_s: seconds for every wait (default ``$STREAMATTN_PROBE_TIMEOUT`` or 60).
    """
    t_out = timeout_s or comm.default_timeout()
    if nbytes is None:
        nbytes = config.probe_bytes()
    n = comm.world(group)
    me = comm.rank(group)
    if me < 0:
        raise ValueError("this process is not a member of the process group passed to probe")
    be = comm.backend(group)

    my_bus = local_gpu_bus_id()
    my_host = host_hash()
    ident = [my_host, 1 if my_bus else 0] + list(my_bus or (-1, -1, -1, -1))
    rows = comm.all_gather_int64(ident, group=group, timeout_s=t_out)
    hosts = [r[0] for r in rows]
    node = _node_map(hosts)
    gpu = all(r[1] == 1 for r in rows)
    device_kind = "cuda" if gpu else "cpu"

    # 1. cache: rank 0 decides
    key = _cache.cache_key(hosts, n, be, device_kind, config.emulated_links())
    if cache and n > 1:
        payload = None
        if me == 0:
            try:  # anything wrong with the cache is a miss, never an error on one rank only
                hit = _cache.load(key, hosts)
                # the node map must be the one the host identities gathered now give
                if hit is not None and tuple(hit.node) == tuple(node) and hit.world_size == n:
                    hit = hit.replace(provenance=f"probe:cache {_cache.cache_path(key)}")
                    payload = hit.to_json().encode()
            except Exception as e:
                warnings.warn(f"streamattn: ignoring the topology cache: {type(e).__name__}: {e}")
                payload = None
        data = comm.broadcast_bytes(payload, src=0, group=group, timeout_s=t_out)
        if data:
            return Topology.from_json(data)

    # 2. local facts -> rank 0
    peers_bus = None
    if my_bus is not None:
        peers_bus = {
            r: tuple(rows[r][2:6]) for r in range(n) if r != me and hosts[r] == my_host and rows[r][1] == 1
        }
    facts_b = json.dumps(_local_facts(group, be, peers_bus, my_bus)).encode()
    all_facts = [json.loads(b.decode()) for b in comm.all_gather_bytes(facts_b, group=group, timeout_s=t_out)]

    # 3. measurements (collective; the pairs are the same on every rank)
    measured = []
    if measure and n > 1:
        intra_pair, inter_pair = _measure_pairs(node)
        for pair in (intra_pair, inter_pair):
            if pair is not None:
                m = measure_pair(pair[0], pair[1], group, nbytes=nbytes, reps=reps, timeout_s=t_out)
                measured.append((pair, m))

    # 4. rank 0 builds, everyone receives the same JSON
    payload = None
    if me == 0:
        try:
            topo = _build(n, node, all_facts, be, gpu)
            for pair, m in measured:
                topo = _apply_measurement(topo, pair, m)
            payload = b"OK" + topo.to_json().encode()
        except Exception as e:  # tell every rank instead of leaving them waiting
            payload = f"ER{type(e).__name__}: {e}".encode()
    data = comm.broadcast_bytes(payload, src=0, group=group, timeout_s=t_out)
    if not data.startswith(b"OK"):
        raise RuntimeError(f"streamattn.topology.probe failed on rank 0: {data[2:].decode(errors='replace')}")
    topo = Topology.from_json(data[2:])
    if me == 0 and cache and measure and n > 1:
        try:
            _cache.store(key, hosts, topo)
        except OSError as e:
            warnings.warn(f"streamattn: could not write the topology cache: {e}")
    return topo
