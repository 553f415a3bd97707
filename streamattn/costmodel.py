"""The cost model: exact bytes and FLOPs of every algorithm, timed on a `Topology`.

What each algorithm sends (forward, mirroring streamattn/algorithms/ message for message):
- Ulysses scatter (one exchange inside every Ulysses group of u members): member j sends member i
  q, k, v of its S_j tokens for i's heads in ONE message of B*S_j*(H/u + 2*hk_i)*D elements, where
  hk_i = K/V heads member i's query heads use (GQA: when kv_heads < u, K/V heads are replicated).
- compute: attention of the group's tokens (plus the joint tokens, sliced by head locally, no
  communication) for H/u heads.
- Ulysses gather: member i sends member j the output of j's tokens for i's heads, B*S_j*(H/u)*D.
- joint all-gather (Ulysses): every member sends its B*T*(H/u)*D joint output to every other member.
- Ring of r members: r-1 steps; in step t every member sends the K/V block it holds (stacked,
  2*B*S_src*hk*D elements) to the next member while it attends the block; the last step only
  computes. Joint tokens: the local queries attend the joint K/V once (before the loop for "front",
  after it for "rear"); then every member attends the joint queries to its own block and all-gathers
  the partial (out, lse) in the accumulation dtype: (B*h*T*D + B*h*T) elements to every other member.
- USP: Ulysses scatter, ring of r over member j of every group, Ulysses gather, joint all-gather.

Time model:
- compute: FLOPs / rate, FLOPs = 4*B*(visible query-key pairs)*h*D per attention block (causal
  blocks count only the pairs the mask keeps). rate = topology.peak_flops, a declared or measured
  rate passed in, or `measure_cpu_rate()`.
- one communication step (all its messages in flight at once) costs the time of its slowest
  resource, each via `Link.transfer_time(nbytes, concurrent)` = latency + bytes / bandwidth share:
    * pair: every message alone on its link;
    * port: a rank's messages to all peers of one node leave through ONE port (its NVSwitch ports,
      its PCIe x16 link, its shared-memory copy engine): their bytes add up on the fastest of those
      links (direct NVLink pairs, kind ``nvlink``, have dedicated wires and are exempt);
    * shared paths: network links (the NIC: ``shared_by`` ranks of a node share one uplink) and
      PCIe cross-socket links. The inter-socket path is ONE physical link per direction: the figure in
      the topology is what one GPU pair gets, and the k ranks of a socket that cross it at once share
      it (modelled as ``shared_by = ranks of the socket`` when the topology leaves it at 1).
    Both directions are checked (sends at the sender, receives at the receiver).
- blocking steps (all-to-alls, joint gathers, compute between them) add up; a ring step costs
  max(compute, comm).

Not modelled: kernel launch overheads, compute efficiency below the declared rate, the backward
pass, NCCL protocol effects, and contention between different link kinds inside one GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .algorithms.ulysses import head_ranges
from .plan import Candidate, Step
from .topology import Link, LinkKind, Topology

# ------------------------------------------------------------------------------------------ dtypes
_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def as_dtype(dtype) -> torch.dtype:
    """torch.dtype from a dtype or a name ("bf16", "bfloat16", "fp16", "fp32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().replace("torch.", "")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(_DTYPE_NAMES))}")
    return _DTYPE_NAMES[key]


def dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=as_dtype(dtype)).element_size()


def acc_bytes(dtype) -> int:
    """Bytes of the accumulation dtype (float32; float64 stays float64)."""
    return 8 if as_dtype(dtype) == torch.float64 else 4


# ------------------------------------------------------------------------------------------ FLOPs
def visible_pairs(q_off: int, sq: int, k_off: int, sk: int, causal: bool) -> int:
    """Query-key pairs attention computes: all sq*sk, or with a causal mask over global positions
    (query at q_off+i sees key at k_off+j iff k_off+j <= q_off+i) only the visible ones."""
    if sq <= 0 or sk <= 0:
        return 0
    if not causal:
        return sq * sk
    d = q_off - k_off + 1  # row i sees min(max(d + i, 0), sk) keys

    def s(a, b):  # sum of (d + i) for i in [a, b)
        return 0 if b <= a else (b - a) * d + (a + b - 1) * (b - a) // 2

    lo = min(sq, max(0, -d + 1))       # first row with d + i >= 1
    hi = min(sq, max(lo, sk - d))      # first row with d + i >= sk
    return s(lo, hi) + (sq - hi) * sk


def attention_flops(batch: int, pairs: int, heads: int, head_dim: int) -> float:
    """4*B*pairs*h*D: two matmuls (QK^T and PV) of 2 FLOPs per multiply-add."""
    return 4.0 * batch * pairs * heads * head_dim


def call_flops(problem) -> float:
    """FLOPs of the whole attention call on one device (image + joint tokens, all heads)."""
    S, T = problem.seq_total, problem.joint_len
    return attention_flops(problem.batch, visible_pairs(0, S + T, 0, S + T, problem.causal),
                           problem.heads, problem.head_dim)


# ------------------------------------------------------------------------------------ CPU rate
_CPU_RATE: Dict[tuple, float] = {}


def measure_cpu_rate(dtype=torch.float32, *, refresh: bool = False) -> float:
    """FLOP/s of this process's local CPU attention kernel (`kernels.attention_with_lse`), timed
    once per process on a small shape ([1, 4, 512, 64], best of 5 after 2 warm-ups) and cached.
    Rounded to 2 significant digits. Differs between processes: see `planner.make_plan`."""
    dt = as_dtype(dtype)
    key = (dt, torch.get_num_threads())
    if key in _CPU_RATE and not refresh:
        return _CPU_RATE[key]
    from .kernels import attention_with_lse

    B, H, S, D = 1, 4, 512, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(dt) for _ in range(3))
    scale = D ** -0.5
    for _ in range(2):
        attention_with_lse(q, k, v, scale=scale)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        attention_with_lse(q, k, v, scale=scale)
        times.append(time.perf_counter() - t0)
    rate = attention_flops(B, S * S, H, D) / max(min(times), 1e-9)
    rate = float(f"{rate:.2g}")
    _CPU_RATE[key] = rate
    return rate


# Memory bandwidth per device (bytes/s), vendor data-sheet figures; matched by substring of
# Topology.device. Used for the memory-bound local work (packing copies, LSE merges).
DEVICE_MEMORY_BW = (
    ("H100 SXM", 3.35e12, "spec:NVIDIA H100 SXM data sheet, HBM3 3.35 TB/s"),
    ("H100 PCIE", 2.0e12, "spec:NVIDIA H100 PCIe data sheet, HBM2e 2.0 TB/s"),
    ("H100", 3.35e12, "spec:NVIDIA H100 SXM data sheet, HBM3 3.35 TB/s"),
    ("A100", 2.039e12, "spec:NVIDIA A100 80GB SXM data sheet, HBM2e 2,039 GB/s (40GB: 1,555)"),
    ("L20", 864e9, "spec:NVIDIA L20 product sheet, GDDR6 864 GB/s"),
    ("L40", 864e9, "spec:NVIDIA L40 data sheet, GDDR6 864 GB/s"),
)
_CPU_MEM: Dict[int, float] = {}


def measure_cpu_memory_bandwidth(*, refresh: bool = False) -> float:
    """Bytes/s of a 32 MiB float32 tensor copy in this process (read + write counted),
    best of 5, cached per process, 2 significant digits."""
    key = torch.get_num_threads()
    if key in _CPU_MEM and not refresh:
        return _CPU_MEM[key]
    src = torch.ones(8 << 20)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    bw = float(f"{2 * src.numel() * 4 / max(min(times), 1e-9):.2g}")
    _CPU_MEM[key] = bw
    return bw


def resolve_memory_bandwidth(topology: Topology, memory_bandwidth: Optional[float]) -> Tuple[Optional[float], str]:
    """(bytes/s per rank, source) of local memory: given, else the device table, else measured on
    a CPU topology, else None (memory-bound work not modelled)."""
    if memory_bandwidth is not None:
        if not memory_bandwidth > 0:
            raise ValueError(f"memory_bandwidth must be > 0 B/s, got {memory_bandwidth!r}")
        return float(memory_bandwidth), "given"
    dev = (topology.device or "").upper()
    for key, bw, src in DEVICE_MEMORY_BW:
        if key.upper() in dev:
            return bw, src
    if dev in ("", "CPU", "EMULATED") and not topology.peak_flops:
        return measure_cpu_memory_bandwidth(), "measured:local CPU copy (streamattn.costmodel)"
    return None, "unknown device: memory-bound work not modelled"


def resolve_rate(topology: Topology, compute_rate: Optional[float], dtype=torch.float32) -> Tuple[float, str]:
    """(FLOP/s per rank, where it comes from): compute_rate, else topology.peak_flops, else the
    measured CPU rate (per process!)."""
    if compute_rate is not None:
        if not compute_rate > 0:
            raise ValueError(f"compute_rate must be > 0 FLOP/s, got {compute_rate!r}")
        return float(compute_rate), "given"
    if topology.peak_flops:
        return float(topology.peak_flops), topology.peak_flops_source or "topology peak_flops"
    return measure_cpu_rate(dtype), "measured:local CPU kernel (streamattn.costmodel.measure_cpu_rate)"


# ---------------------------------------------------------------------------------- placements
def consecutive_groups(world: int, u: int) -> tuple:
    return tuple(tuple(g * u + j for j in range(u)) for g in range(world // u))


def per_node_groups(topology: Topology, u: int) -> tuple:
    """Groups of u taken from each node's ranks in turn (nodes in id order, ranks ascending)."""
    order = sorted(range(topology.world_size), key=lambda r: (topology.node[r], r))
    return tuple(tuple(order[g * u:(g + 1) * u]) for g in range(topology.world_size // u))


def groups_contiguous(groups) -> bool:
    """Every group's members are consecutive ranks in ascending order (causal needs this: the
    group's tokens must be contiguous positions in member order)."""
    return all(list(g) == list(range(g[0], g[0] + len(g))) for g in groups)


# ---------------------------------------------------------------------------------- messages
Msg = Tuple[int, int, int]  # (src, dst, nbytes)


@dataclass
class _Phase:
    name: str
    msgs: List[Msg]
    compute: Dict[int, float]  # rank -> FLOPs in this phase
    overlapped: bool = False
    mem: Dict[int, float] = dataclasses.field(default_factory=dict)  # rank -> local memory bytes


def merge_bytes(dtype) -> int:
    """Memory traffic per output element of one `merge.update_out_and_lse` as written (unfused
    torch ops on the float32 accumulator): out.mul_ (r+w 4+4), block_out.to(acc) (r e, w 4),
    * w_new (r+w 4+4), add_ (r 4+4, w 4) = 32 + e bytes."""
    return 32 + dtype_bytes(dtype)


def _fitted_kv(q_range, kv_range, group_size: int) -> int:
    """K/V heads a member holds after `ulysses.fit_kv_heads`: its own K/V heads when its query heads
    map onto them in the standard GQA way, else one K/V head per query head (expanded)."""
    hq, hk = q_range[1] - q_range[0], kv_range[1] - kv_range[0]
    want = [(q_range[0] + i) // group_size - kv_range[0] for i in range(hq)]
    if hq % hk == 0 and want == [i // (hq // hk) for i in range(hq)]:
        return hk
    return hq


def _phases(problem, u: int, groups) -> List[_Phase]:
    """Every step of the call for Ulysses groups `groups` (u members each; rings = member j of
    every group, in group order), with exact message sizes, per-rank FLOPs and per-rank local
    memory traffic (packing copies, LSE merges)."""
    B, H, Hk, D = problem.batch, problem.heads, problem.kv_heads, problem.head_dim
    T, causal = problem.joint_len, problem.causal
    e, ea = dtype_bytes(problem.dtype), acc_bytes(problem.dtype)
    mb = merge_bytes(problem.dtype)
    seq, offs = problem.seq_lens, problem.offsets
    r = len(groups)
    q_ranges, kv_ranges = head_ranges(H, Hk, u)
    hq = H // u
    hk = [b - a for a, b in kv_ranges]  # K/V heads member j receives in the all-to-all
    hkf = [_fitted_kv(q_ranges[j], kv_ranges[j], H // Hk) for j in range(u)]  # ... and holds after
    phases: List[_Phase] = []
    seg_lens = [sum(seq[m] for m in g) for g in groups]
    seg_offs = [offs[g[0]] for g in groups]
    members = [(gi, j, m) for gi, g in enumerate(groups) for j, m in enumerate(g)]

    if u > 1:
        msgs = [(g[j], g[i], B * seq[g[j]] * (hq + 2 * hk[i]) * D * e)
                for g in groups for j in range(u) for i in range(u) if i != j]
        # pack every peer's slice (read + write), then concatenate what arrived (read + write)
        mem = {m: 2 * e * B * D * (seq[m] * sum(hq + 2 * hk[i] for i in range(u))
                                   + seg_lens[gi] * (hq + 2 * hk[j]))
               for gi, j, m in members}
        phases.append(_Phase(f"Ulysses all-to-all q,k,v (u={u})", msgs, {}, mem=mem))

    if r == 1:  # pure Ulysses (or local): the group's tokens + joint, for hq heads
        L = seg_lens[0] + T
        fl = attention_flops(B, visible_pairs(0, L, 0, L, causal), hq, D)
        mem = {m: (2 * e * B * L * (hq + 2 * hkf[j]) * D if T else 0) for gi, j, m in members}
        phases.append(_Phase("attention (whole sequence, H/u heads)", [], {m: fl for m in groups[0]},
                             mem=mem))
    else:
        front = T and problem.joint_strategy == "front"
        rear = T and problem.joint_strategy != "front"
        joint_local = {m: attention_flops(B, seg_lens[gi] * T, hq, D) for gi, j, m in members} if T else {}
        joint_merge = {m: mb * B * hq * seg_lens[gi] * D for gi, j, m in members}
        stack = {m: 2 * e * 2 * B * seg_lens[gi] * hkf[j] * D for gi, j, m in members}
        if front:
            phases.append(_Phase("attention of local queries to joint K/V", [], joint_local,
                                 mem=joint_merge))
        phases.append(_Phase("ring: stack K,V into one message", [], {}, mem=stack))
        for t in range(r):
            msgs, comp, mem = [], {}, {}
            for j in range(u):
                ring = [g[j] for g in groups]
                for gi, m in enumerate(ring):
                    src = (gi - t) % r
                    pairs = visible_pairs(seg_offs[gi], seg_lens[gi], seg_offs[src], seg_lens[src], causal)
                    comp[m] = attention_flops(B, pairs, hq, D)
                    skipped = causal and seg_offs[src] > seg_offs[gi] + seg_lens[gi] - 1
                    mem[m] = 0 if skipped else mb * B * hq * seg_lens[gi] * D
                    if t == r - 1 and not rear:  # final cast of the accumulator
                        mem[m] += (ea + e) * B * hq * seg_lens[gi] * D
                    if t < r - 1:
                        msgs.append((m, ring[(gi + 1) % r], 2 * B * seg_lens[src] * hkf[j] * D * e))
            name = f"ring step {t + 1}/{r}" + (" (compute only)" if t == r - 1 else "")
            phases.append(_Phase(name, msgs, comp, overlapped=t < r - 1, mem=mem))
        if rear:
            mem = {m: joint_merge[m] + (ea + e) * B * hq * seg_lens[gi] * D for gi, j, m in members}
            phases.append(_Phase("attention of local queries to joint K/V", [], joint_local, mem=mem))
        if T:
            comp = {}
            for gi, j, m in members:
                fl = attention_flops(B, T * seg_lens[gi], hq, D)
                if gi == 0:
                    fl += attention_flops(B, T * T, hq, D)
                comp[m] = fl
            phases.append(_Phase("joint queries to own block", [], comp))
            n = (B * hq * T * D + B * hq * T) * ea
            msgs = [(ring_m, other, n) for j in range(u) for ring_m in [g[j] for g in groups]
                    for other in [g[j] for g in groups] if other != ring_m]
            mem = {m: (r - 1) * mb * B * hq * T * D for gi, j, m in members}
            phases.append(_Phase(f"ring all-gather of joint (out, lse) (r={r})", msgs, {}, mem=mem))

    if u > 1:
        msgs = [(g[i], g[j], B * seq[g[j]] * hq * D * e)
                for g in groups for j in range(u) for i in range(u) if i != j]
        # copy every outgoing piece contiguous, then concatenate the received heads
        mem = {m: 2 * e * B * D * (hq * (seg_lens[gi] - seq[m]) + H * seq[m]) for gi, j, m in members}
        phases.append(_Phase(f"Ulysses all-to-all output (u={u})", msgs, {}, mem=mem))
        if T:
            msgs = [(g[i], g[j], B * T * hq * D * e)
                    for g in groups for j in range(u) for i in range(u) if i != j]
            mem = {m: 2 * e * B * T * H * D for gi, j, m in members}
            phases.append(_Phase(f"Ulysses all-gather of joint output (u={u})", msgs, {}, mem=mem))
    return phases


def messages(problem, u: int, groups) -> List[Tuple[str, List[Msg]]]:
    """(step name, [(src, dst, nbytes)]) for every communication step, in order."""
    return [(p.name, list(p.msgs)) for p in _phases(problem, u, groups) if p.msgs]


def bytes_sent(problem, u: int, groups) -> List[int]:
    """Exact payload bytes every rank sends in one forward call."""
    out = [0] * problem.world_size
    for _, msgs in messages(problem, u, groups):
        for a, _, n in msgs:
            out[a] += n
    return out


# ---------------------------------------------------------------------------------- timing
_NETWORK = (LinkKind.INFINIBAND, LinkKind.ROCE, LinkKind.ETHERNET)
_PORTLESS = (LinkKind.NVLINK, LinkKind.LOOPBACK) + _NETWORK  # links not behind a shared port


class CostModel:
    """Times communication steps and whole candidates on one topology at one compute rate."""

    def __init__(self, topology: Topology, rate: float, memory_bandwidth: Optional[float] = None):
        self.topology = topology
        self.rate = float(rate)
        self.mem_bw = memory_bandwidth
        self._socket = self._sockets(topology)
        self._eff: Dict[Tuple[Link, int], Link] = {}

    @staticmethod
    def _sockets(t: Topology) -> Tuple[int, ...]:
        """Socket id of every rank: ranks of one node joined by links that are not cross-socket."""
        parent = list(range(t.world_size))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for n in t.nodes():
            rs = t.ranks_of_node(n)
            for i, a in enumerate(rs):
                for b in rs[i + 1:]:
                    if t.link(a, b).kind != LinkKind.PCIE_CROSS_SOCKET:
                        parent[find(a)] = find(b)
        return tuple(find(r) for r in range(t.world_size))

    def _domain(self, link: Link, rank: int):
        return self.topology.node[rank] if link.kind in _NETWORK else self._socket[rank]

    def _effective(self, link: Link, domain_size: int) -> Link:
        if link.kind == LinkKind.PCIE_CROSS_SOCKET and link.shared_by == 1 and domain_size > 1:
            key = (link, domain_size)
            if key not in self._eff:
                self._eff[key] = dataclasses.replace(link, shared_by=domain_size)
            return self._eff[key]
        return link

    def comm_time(self, msgs: Sequence[Msg]) -> Tuple[float, str, Dict[str, int]]:
        """(seconds, bottleneck, largest bytes one rank sends per link kind) for messages that are
        all in flight at once."""
        t = self.topology
        if not msgs:
            return 0.0, "", {}
        best = (0.0, "")
        out_by: Dict[Tuple[int, Link], int] = defaultdict(int)
        in_by: Dict[Tuple[int, Link], int] = defaultdict(int)
        kind_bytes: Dict[Tuple[int, str], int] = defaultdict(int)
        for a, b, n in msgs:
            lk = t.link(a, b)
            out_by[(a, lk)] += n
            in_by[(b, lk)] += n
            kind_bytes[(a, lk.kind.value)] += n
            tt = lk.transfer_time(n)
            if tt > best[0]:
                best = (tt, f"{lk.kind.value} pair {a}->{b}: {_mb(n)} at {_gbs(lk.bandwidth_Bps)}")
        for side, table in (("sends", out_by), ("receives", in_by)):
            # ports: every non-network, non-direct-NVLink link of a rank shares its one port
            port: Dict[int, List] = defaultdict(lambda: [0, None])
            users: Dict[Tuple[Link, object], set] = defaultdict(set)
            for (rank, lk), n in table.items():
                if lk.kind not in _PORTLESS:
                    p = port[rank]
                    p[0] += n
                    if p[1] is None or (lk.bandwidth_Bps, -lk.latency_s) > (p[1].bandwidth_Bps, -p[1].latency_s):
                        p[1] = lk
                if lk.kind in _NETWORK or lk.kind == LinkKind.PCIE_CROSS_SOCKET:
                    users[(lk, self._domain(lk, rank))].add(rank)
            for rank, (n, lk) in port.items():
                tt = lk.transfer_time(n)
                if tt > best[0]:
                    best = (tt, f"port of rank {rank} ({side}): {_mb(n)} at {_gbs(lk.bandwidth_Bps)}")
            for (rank, lk), n in table.items():
                if lk.kind not in _NETWORK and lk.kind != LinkKind.PCIE_CROSS_SOCKET:
                    continue
                dom = self._domain(lk, rank)
                conc = len(users[(lk, dom)])
                size = sum(1 for x in range(t.world_size) if self._domain(lk, x) == dom)
                eff = self._effective(lk, size)
                tt = eff.transfer_time(n, concurrent=conc)
                if tt > best[0]:
                    share = min(conc, eff.shared_by)
                    what = "uplink" if lk.kind in _NETWORK else "inter-socket path"
                    best = (tt, f"{lk.kind.value} {what} of rank {rank} ({side}): {_mb(n)} at "
                                f"{_gbs(lk.bandwidth_Bps)}" + (f" / {share} sharing" if share > 1 else ""))
        per_kind: Dict[str, int] = {}
        for (a, k), n in kind_bytes.items():
            per_kind[k] = max(per_kind.get(k, 0), n)
        return best[0], best[1], per_kind

    def cost(self, problem, algorithm: str, u: int, groups, placement: str = "consecutive") -> Candidate:
        """A costed `Candidate` for Ulysses groups `groups` of u members."""
        steps: List[Step] = []
        total = compute = comm = 0.0
        busiest: Dict[int, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        worst = (0.0, "")
        comm_cache: Dict[tuple, tuple] = {}
        for ph in _phases(problem, u, groups):
            ranks = set(ph.compute) | set(ph.mem)
            c = max((ph.compute.get(x, 0.0) / self.rate
                     + (ph.mem.get(x, 0.0) / self.mem_bw if self.mem_bw else 0.0) for x in ranks),
                    default=0.0)
            key = tuple(ph.msgs)
            if key not in comm_cache:
                comm_cache[key] = self.comm_time(ph.msgs)
            m, bott, per_kind = comm_cache[key]
            for a, b, n in ph.msgs:
                busiest[a][self.topology.link(a, b).kind.value] += n
            st = max(c, m) if ph.overlapped else c + m
            if m > worst[0]:
                worst = (m, f"{ph.name}: {bott}")
            steps.append(Step(ph.name, st, c, m, ph.overlapped, bott,
                              tuple(sorted(per_kind.items()))))
            total += st
            compute += c
            comm += m
        kinds = defaultdict(int)
        for per in busiest.values():
            for k, n in per.items():
                kinds[k] = max(kinds[k], n)
        return Candidate(algorithm, u, problem.world_size // u, tuple(tuple(g) for g in groups),
                         placement, "", total, compute, comm, worst[1],
                         tuple(sorted(kinds.items())), tuple(steps))


def _mb(n: float) -> str:
    return f"{n / 1e6:.4g} MB"


def _gbs(bps: float) -> str:
    return f"{bps / 1e9:.4g} GB/s"
