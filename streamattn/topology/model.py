"""The `Topology` model: which node every rank is on, and what links join every pair of ranks.

Units (everywhere in this package):
- bandwidth: bytes per second **per direction** (``bandwidth_Bps``). A "600 GB/s bidirectional"
  NVLink figure is stored as 300e9. 1 GB/s = 1e9 B/s (decimal), 1 Gbit/s = 125e6 B/s.
- latency: seconds (``latency_s``), one way, for a small message.
- compute: FLOP/s per rank (``peak_flops``), dense fp16/bf16 tensor-core rate unless noted.

Links are symmetric: ``link(a, b) == link(b, a)``. They are stored compactly: one link for every
pair of ranks on the same node (``intra``), one for every pair on different nodes (``inter``), and
optional per-pair ``overrides`` keyed by ``(min(a, b), max(a, b))``. So a 32-rank topology with
uniform links is a few hundred bytes of JSON.

Serialisation is JSON only (``to_json`` / ``from_json``), never pickle; the round trip is exact.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

FORMAT = "streamattn.topology/1"

GB = 1e9  # bytes per GB (decimal), used for printing and specs
US = 1e-6  # seconds per microsecond


class LinkKind(str, enum.Enum):
    """Physical kind of the path between two ranks, from fastest-typical to slowest-typical."""

    LOOPBACK = "loopback"  # a rank with itself
    NVLINK = "nvlink"  # direct NVLink between two GPUs (bandwidth = links x per-link rate)
    NVSWITCH = "nvswitch"  # NVLink through NVSwitch: every GPU pair at the full per-GPU rate
    PCIE_SWITCH = "pcie_switch"  # through one PCIe switch (nvidia-smi PIX)
    PCIE_MULTI_SWITCH = "pcie_multi_switch"  # several PCIe switches, no host bridge (PXB)
    PCIE_HOSTBRIDGE = "pcie_hostbridge"  # through the CPU's PCIe host bridge (PHB)
    PCIE_NUMA_NODE = "pcie_numa_node"  # host bridges of one NUMA node (NODE)
    PCIE_CROSS_SOCKET = "pcie_cross_socket"  # across the inter-socket link, e.g. UPI (SYS)
    SHM = "shm"  # CPU processes on one host through shared memory
    INFINIBAND = "infiniband"
    ROCE = "roce"
    ETHERNET = "ethernet"  # TCP/IP over Ethernet (also IPoIB when used through sockets)
    UNKNOWN = "unknown"

    @property
    def abbrev(self) -> str:
        """Short label for the matrix print (nvidia-smi style where one exists)."""
        return _ABBREV[self]

    @property
    def is_network(self) -> bool:
        """True for links that leave the node."""
        return self in (LinkKind.INFINIBAND, LinkKind.ROCE, LinkKind.ETHERNET)

    @property
    def is_nvlink(self) -> bool:
        return self in (LinkKind.NVLINK, LinkKind.NVSWITCH)

    @property
    def is_pcie(self) -> bool:
        return self.name.startswith("PCIE_")


_ABBREV = {
    LinkKind.LOOPBACK: "X",
    LinkKind.NVLINK: "NV",
    LinkKind.NVSWITCH: "NVS",
    LinkKind.PCIE_SWITCH: "PIX",
    LinkKind.PCIE_MULTI_SWITCH: "PXB",
    LinkKind.PCIE_HOSTBRIDGE: "PHB",
    LinkKind.PCIE_NUMA_NODE: "NODE",
    LinkKind.PCIE_CROSS_SOCKET: "SYS",
    LinkKind.SHM: "SHM",
    LinkKind.INFINIBAND: "IB",
    LinkKind.ROCE: "RoCE",
    LinkKind.ETHERNET: "ETH",
    LinkKind.UNKNOWN: "?",
}


@dataclass(frozen=True)
class Link:
    """One link class.

    Attributes:
        kind: physical kind.
        bandwidth_Bps: bytes/s per direction available to one pair of ranks when only that pair
            talks.
        latency_s: one-way latency of a small message, seconds.
        source: where the numbers come from: ``"declared"`` (a default or a user spec),
            ``"spec"`` / ``"spec:<detail>"`` (vendor data sheet figure for the identified hardware),
            ``"measured:<method>"`` (timed on this machine; the method names the transport, size,
            repetitions and statistic).
        shared_by: how many ranks of one node share this bandwidth when they all use the link at
            once (1 = dedicated per rank, e.g. one 400 Gb/s NIC per GPU; 8 = one NIC for 8 GPUs).
            A planner divides ``bandwidth_Bps`` by ``min(active, shared_by)`` for concurrent traffic.
    """

    kind: LinkKind
    bandwidth_Bps: float
    latency_s: float
    source: str = "declared"
    shared_by: int = 1

    def __post_init__(self):
        object.__setattr__(self, "kind", LinkKind(self.kind))
        object.__setattr__(self, "bandwidth_Bps", float(self.bandwidth_Bps))
        object.__setattr__(self, "latency_s", float(self.latency_s))
        if not (self.bandwidth_Bps > 0):
            raise ValueError(f"Link bandwidth must be > 0 B/s, got {self.bandwidth_Bps!r}")
        if not (self.latency_s >= 0) or math.isnan(self.latency_s):
            raise ValueError(f"Link latency must be >= 0 s, got {self.latency_s!r}")
        if not isinstance(self.shared_by, int) or self.shared_by < 1:
            raise ValueError(f"Link shared_by must be an int >= 1, got {self.shared_by!r}")

    def transfer_time(self, nbytes: float, concurrent: int = 1) -> float:
        """Seconds to move ``nbytes`` one way: latency + bytes / bandwidth, where the bandwidth is
        divided among ``min(concurrent, shared_by)`` ranks of the node using the link at once."""
        share = max(1, min(int(concurrent), self.shared_by))
        return self.latency_s + float(nbytes) * share / self.bandwidth_Bps

    @property
    def is_measured(self) -> bool:
        return self.source.startswith("measured:")

    def to_dict(self) -> dict:
        d = {
            "kind": self.kind.value,
            "bandwidth_Bps": self.bandwidth_Bps,
            "latency_s": self.latency_s,
            "source": self.source,
        }
        if self.shared_by != 1:
            d["shared_by"] = self.shared_by
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Link":
        if not isinstance(d, Mapping):
            raise ValueError(f"link must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"kind", "bandwidth_Bps", "latency_s", "source", "shared_by"}
        if unknown:
            raise ValueError(f"unknown link field(s) {sorted(unknown)}")
        try:
            kind = LinkKind(d["kind"])
        except ValueError:
            raise ValueError(
                f"unknown link kind {d['kind']!r}; known: {[k.value for k in LinkKind]}"
            ) from None
        return cls(
            kind=kind,
            bandwidth_Bps=float(d["bandwidth_Bps"]),
            latency_s=float(d["latency_s"]),
            source=str(d.get("source", "declared")),
            shared_by=int(d.get("shared_by", 1)),
        )

    def describe(self) -> str:
        """Human form: ``450.0 GB/s, 2.0 us [spec]``."""
        s = f"{_fmt_bw(self.bandwidth_Bps)}, {_fmt_lat(self.latency_s)} [{self.source}]"
        if self.shared_by > 1:
            s += f", shared by {self.shared_by} ranks"
        return s


LOOPBACK_LINK = Link(LinkKind.LOOPBACK, bandwidth_Bps=1e18, latency_s=0.0, source="declared")


def _fmt_bw(bps: float) -> str:
    return f"{bps / GB:.4g} GB/s"


def _fmt_lat(s: float) -> str:
    return f"{s / US:.4g} us"


@dataclass(frozen=True, eq=True)
class Topology:
    """Where every rank is and how every pair of ranks is connected.

    Attributes:
        world_size: number of ranks (of the process group the topology describes).
        node: ``node[r]`` is the node id (int >= 0) of rank ``r``. Node ids need not be
            consecutive and ranks of a node need not be consecutive (interleaved maps allowed).
        local_index: ``local_index[r]`` is rank ``r``'s index inside its node (e.g. its GPU
            index); unique within a node. Default: position of ``r`` among its node's ranks.
        intra: link between two distinct ranks on the same node.
        inter: link between two ranks on different nodes (None is allowed for one node).
        overrides: per-pair exceptions, keyed by ``(a, b)`` with ``a < b``.
        name: label (machine name, spec string, or "probe").
        provenance: how this topology was obtained ("machine:<name>", "spec:<spec>",
            "file:<path>", "probe", "probe:cache"); informational.
        device: device model of the ranks ("cpu", "NVIDIA H100 80GB HBM3", ...).
        peak_flops: per-rank compute rate, FLOP/s, dense fp16/bf16 unless notes say otherwise.
        peak_flops_source: where ``peak_flops`` comes from.
        notes: free text (citations for declared numbers).
    """

    world_size: int
    node: Tuple[int, ...]
    intra: Link
    inter: Optional[Link] = None
    local_index: Tuple[int, ...] = ()
    overrides: Mapping[Tuple[int, int], Link] = field(default_factory=dict)
    name: str = ""
    provenance: str = ""
    device: str = ""
    peak_flops: Optional[float] = None
    peak_flops_source: str = ""
    notes: str = ""

    # ---------------------------------------------------------------- construction / validation
    def __post_init__(self):
        ws = self.world_size
        if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
            raise ValueError(f"world_size must be an int >= 1, got {ws!r}")
        node = tuple(int(n) for n in self.node)
        if len(node) != ws:
            raise ValueError(f"node map has {len(node)} entries for world_size {ws}")
        if any(n < 0 for n in node):
            raise ValueError(f"node ids must be >= 0, got {list(node)}")
        object.__setattr__(self, "node", node)
        if self.local_index in ((), None):
            seen: Dict[int, int] = {}
            li = []
            for n in node:
                li.append(seen.get(n, 0))
                seen[n] = seen.get(n, 0) + 1
            local = tuple(li)
        else:
            local = tuple(int(i) for i in self.local_index)
            if len(local) != ws:
                raise ValueError(f"local_index has {len(local)} entries for world_size {ws}")
            pairs = list(zip(node, local))
            if len(set(pairs)) != ws:
                raise ValueError(f"local_index is not unique within a node: {list(local)}")
            if any(i < 0 for i in local):
                raise ValueError(f"local_index values must be >= 0, got {list(local)}")
        object.__setattr__(self, "local_index", local)
        if not isinstance(self.intra, Link):
            raise ValueError("intra must be a Link")
        if self.inter is not None and not isinstance(self.inter, Link):
            raise ValueError("inter must be a Link or None")
        if self.inter is None and len(set(node)) > 1:
            raise ValueError("topology spans several nodes but has no inter-node link")
        ov: Dict[Tuple[int, int], Link] = {}
        for key, link in dict(self.overrides).items():
            a, b = (int(key[0]), int(key[1]))
            if a == b or not (0 <= a < ws and 0 <= b < ws):
                raise ValueError(f"override pair {key} is not two distinct ranks in [0, {ws})")
            if not isinstance(link, Link):
                raise ValueError(f"override for {key} must be a Link")
            k = (min(a, b), max(a, b))
            if k in ov and ov[k] != link:
                raise ValueError(f"conflicting overrides for pair {k}")
            ov[k] = link
        object.__setattr__(self, "overrides", dict(sorted(ov.items())))
        if self.peak_flops is not None:
            object.__setattr__(self, "peak_flops", float(self.peak_flops))

    def __hash__(self):
        return hash(self.to_json())

    @classmethod
    def uniform(
        cls,
        node: Sequence[int],
        intra: Link,
        inter: Optional[Link] = None,
        **kw,
    ) -> "Topology":
        """Topology from a rank->node map and two link classes."""
        return cls(world_size=len(node), node=tuple(node), intra=intra, inter=inter, **kw)

    def replace(self, **changes) -> "Topology":
        """A copy with some fields replaced (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- queries
    def _check_rank(self, r: int) -> int:
        r = int(r)
        if not 0 <= r < self.world_size:
            raise ValueError(f"rank {r} out of range [0, {self.world_size})")
        return r

    def link(self, a: int, b: int) -> Link:
        """The link between ranks ``a`` and ``b`` (symmetric; LOOPBACK for a == b)."""
        a, b = self._check_rank(a), self._check_rank(b)
        if a == b:
            return LOOPBACK_LINK
        key = (a, b) if a < b else (b, a)
        ov = self.overrides.get(key)
        if ov is not None:
            return ov
        if self.node[a] == self.node[b]:
            return self.intra
        assert self.inter is not None
        return self.inter

    def node_of(self, rank: int) -> int:
        return self.node[self._check_rank(rank)]

    def nodes(self) -> List[int]:
        """Sorted distinct node ids."""
        return sorted(set(self.node))

    def ranks_of_node(self, n: int) -> List[int]:
        """Ranks on node ``n``, ascending (empty list for an unknown node id)."""
        return [r for r, m in enumerate(self.node) if m == n]

    def is_intra(self, a: int, b: int) -> bool:
        """True if ranks ``a`` and ``b`` are on the same node."""
        return self.node[self._check_rank(a)] == self.node[self._check_rank(b)]

    @property
    def num_nodes(self) -> int:
        return len(set(self.node))

    @property
    def ranks_per_node(self) -> Optional[int]:
        """Ranks on every node, or None if nodes hold different numbers of ranks."""
        counts = {self.node.count(n) for n in set(self.node)}
        return counts.pop() if len(counts) == 1 else None

    @property
    def is_consecutive(self) -> bool:
        """True if every node's ranks form one contiguous block of rank ids."""
        for n in set(self.node):
            rs = self.ranks_of_node(n)
            if rs[-1] - rs[0] + 1 != len(rs):
                return False
        return True

    def links_of(self, ranks: Iterable[int]) -> List[Tuple[int, int, Link]]:
        """Every ``(a, b, link)`` with ``a < b`` among ``ranks``."""
        rs = sorted({self._check_rank(r) for r in ranks})
        return [(a, b, self.link(a, b)) for i, a in enumerate(rs) for b in rs[i + 1:]]

    def slowest_link(self, ranks: Iterable[int], nbytes: Optional[float] = None) -> Link:
        """The slowest link among all pairs of ``ranks``.

        Slowest = lowest ``bandwidth_Bps`` (ties: highest latency). With ``nbytes`` given, slowest =
        largest ``transfer_time(nbytes)``. A single rank gives the LOOPBACK link.
        """
        ranks = list(ranks)
        if not ranks:
            raise ValueError("slowest_link needs at least one rank")
        pairs = self.links_of(ranks)
        if not pairs:
            return LOOPBACK_LINK
        if nbytes is None:
            key = lambda p: (p[2].bandwidth_Bps, -p[2].latency_s)  # noqa: E731
            return min(pairs, key=key)[2]
        return max(pairs, key=lambda p: p[2].transfer_time(nbytes))[2]

    def distinct_links(self) -> List[Link]:
        """Every distinct link used by some pair, fastest first."""
        seen: Dict[Link, None] = {}
        ws = self.world_size
        if ws > 1:
            if any(self.node.count(n) > 1 for n in set(self.node)):
                seen[self.intra] = None
            if self.num_nodes > 1 and self.inter is not None:
                seen[self.inter] = None
            for link in self.overrides.values():
                seen[link] = None
        # drop class links that every pair overrides
        used = {self.link(a, b) for a in range(ws) for b in range(a + 1, ws)} if ws <= 256 else None
        out = [lk for lk in seen if used is None or lk in used]
        return sorted(out, key=lambda lk: (-lk.bandwidth_Bps, lk.latency_s, lk.kind.value))

    def subtopology(self, ranks: Sequence[int]) -> "Topology":
        """The topology of the sub-group made of ``ranks`` (new rank i = ``ranks[i]``)."""
        rs = [self._check_rank(r) for r in ranks]
        if len(set(rs)) != len(rs) or not rs:
            raise ValueError(f"subtopology needs distinct ranks, got {list(ranks)}")
        index = {r: i for i, r in enumerate(rs)}
        ov = {
            (index[a], index[b]): lk
            for (a, b), lk in self.overrides.items()
            if a in index and b in index
        }
        nodes = [self.node[r] for r in rs]
        return dataclasses.replace(
            self,
            world_size=len(rs),
            node=tuple(nodes),
            local_index=tuple(self.local_index[r] for r in rs),
            overrides=ov,
        )

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical JSON (equal topologies have equal fingerprints)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        groups: Dict[Link, List[List[int]]] = {}
        for (a, b), link in self.overrides.items():
            groups.setdefault(link, []).append([a, b])
        overrides = [{"link": lk.to_dict(), "pairs": pairs} for lk, pairs in groups.items()]
        overrides.sort(key=lambda g: g["pairs"][0])
        default_local = Topology(self.world_size, self.node, self.intra, self.inter).local_index
        d = {
            "format": FORMAT,
            "name": self.name,
            "provenance": self.provenance,
            "world_size": self.world_size,
            "node": list(self.node),
        }
        if self.local_index != default_local:
            d["local_index"] = list(self.local_index)
        d["intra"] = self.intra.to_dict()
        d["inter"] = self.inter.to_dict() if self.inter is not None else None
        if overrides:
            d["overrides"] = overrides
        d["device"] = self.device
        d["peak_flops"] = self.peak_flops
        d["peak_flops_source"] = self.peak_flops_source
        d["notes"] = self.notes
        return d

    def to_json(self, indent: Optional[int] = None) -> str:
        """Canonical JSON text (no NaN/Infinity; exact float round trip)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Topology":
        if not isinstance(d, Mapping):
            raise ValueError(f"topology JSON must be an object, got {type(d).__name__}")
        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"unsupported topology format {fmt!r}; expected {FORMAT!r}")
        known = {
            "format", "name", "provenance", "world_size", "node", "local_index", "intra",
            "inter", "overrides", "device", "peak_flops", "peak_flops_source", "notes",
        }
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown topology field(s) {sorted(unknown)}")
        for req in ("world_size", "node", "intra"):
            if req not in d:
                raise ValueError(f"topology JSON lacks required field {req!r}")
        ov: Dict[Tuple[int, int], Link] = {}
        for g in d.get("overrides", []) or []:
            link = Link.from_dict(g["link"])
            for a, b in g["pairs"]:
                ov[(int(a), int(b))] = link
        pf = d.get("peak_flops")
        return cls(
            world_size=int(d["world_size"]),
            node=tuple(int(n) for n in d["node"]),
            local_index=tuple(int(i) for i in d.get("local_index", ()) or ()),
            intra=Link.from_dict(d["intra"]),
            inter=Link.from_dict(d["inter"]) if d.get("inter") is not None else None,
            overrides=ov,
            name=str(d.get("name", "")),
            provenance=str(d.get("provenance", "")),
            device=str(d.get("device", "")),
            peak_flops=float(pf) if pf is not None else None,
            peak_flops_source=str(d.get("peak_flops_source", "")),
            notes=str(d.get("notes", "")),
        )

    @classmethod
    def from_json(cls, text) -> "Topology":
        """Parse JSON text (str or bytes). Raises ValueError on malformed input."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"topology is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed topology JSON: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, path) -> "Topology":
        """Read a topology JSON file."""
        with open(path, "r", encoding="utf-8") as f:
            return cls.from_json(f.read())

    def save(self, path) -> None:
        """Write this topology as indented JSON."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json(indent=1) + "\n")

    # ---------------------------------------------------------------- printing
    def _labels(self) -> Dict[Link, str]:
        links = self.distinct_links()
        by_kind: Dict[LinkKind, List[Link]] = {}
        for lk in links:
            by_kind.setdefault(lk.kind, []).append(lk)
        labels = {}
        for kind, lks in by_kind.items():
            if len(lks) == 1:
                labels[lks[0]] = kind.abbrev
            else:
                for i, lk in enumerate(lks):
                    labels[lk] = f"{kind.abbrev}{i + 1}"
        return labels

    def summary(self) -> str:
        rpn = self.ranks_per_node
        shape = f"{self.num_nodes} node(s) x {rpn} rank(s)" if rpn else f"{self.num_nodes} nodes (uneven)"
        head = f"Topology {self.name!r}: {self.world_size} ranks, {shape}"
        if not self.is_consecutive:
            head += ", interleaved rank->node map"
        return head

    def __str__(self) -> str:
        labels = self._labels()
        labels[LOOPBACK_LINK] = "X"
        ws = self.world_size
        names = [f"r{r}" for r in range(ws)]
        width = max([len(n) for n in names] + [len(v) for v in labels.values()]) + 1
        lines = [self.summary()]
        header = " " * (width + 1) + "".join(n.rjust(width) for n in names) + "  node  local"
        lines.append(header)
        for a in range(ws):
            row = names[a].ljust(width + 1)
            row += "".join(labels[self.link(a, b)].rjust(width) for b in range(ws))
            row += f"  {self.node[a]:>4}  {self.local_index[a]:>5}"
            lines.append(row)
        lines.append("")
        lines.append("Legend (bandwidth per direction, 1 GB/s = 1e9 B/s; one-way latency):")
        lines.append("  X     = self")
        for lk, lab in sorted(labels.items(), key=lambda kv: -kv[0].bandwidth_Bps):
            if lk is LOOPBACK_LINK or lk == LOOPBACK_LINK:
                continue
            lines.append(f"  {lab:<5} = {lk.kind.value}: {lk.describe()}")
        if self.peak_flops:
            lines.append(
                f"Compute: {self.peak_flops / 1e12:.4g} TFLOP/s per rank ({self.device or '?'}; "
                f"{self.peak_flops_source or 'source unknown'})"
            )
        if self.provenance:
            lines.append(f"Source: {self.provenance}")
        return "\n".join(lines)
