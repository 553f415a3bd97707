"""The cost model: the message schedule (streamattn.schedule) timed on a `Topology`.

The schedule module states what every algorithm sends and computes; the calibration module
(streamattn.calibration) what the local work costs on a CPU; streamattn.datasheet the vendor
figures. This module only times them.

One-sided (shm, nvshmem) and two-sided (torch) transports are costed alike: both put every posted
message in flight at once (gloo's send/recv threads progress inter-node messages during compute;
the one-sided puts land at post time). One difference is not modelled: an shm mailbox holds
DEPTH x slot bytes per peer (2 x 4 MiB), and larger intra-node messages progress only inside
exchange()/wait() calls, not during compute.

Time model:
- compute: FLOPs / rate, FLOPs = 4*B*(visible query-key pairs)*h*D per attention block (causal
  blocks count only the pairs the mask keeps; fully masked causal ring steps cost nothing). rate =
  topology.peak_flops, a declared or measured rate passed in, or `measure_cpu_rate()`; on CPUs
  the planner sets it per candidate from the kernel timed at that candidate's block shape
  (streamattn.calibration, `make_plan(block_rates=...)`).
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
- sync_s (CPU groups: measured by planner.agreed_calibration, 0 otherwise): what one synchronising
  exchange costs beyond its bytes on this group -- on an oversubscribed CPU (8 ranks on 2 cores)
  a waiting rank needs its peer to be scheduled, milliseconds, not the links' microseconds. Every
  communication step adds it once, and so does the per-call agreement.
- overlap (CPU groups: cores / the threads the ranks of one machine run, when that is below 1;
  1 otherwise): the share of an overlapped step's communication that really hides behind its
  compute. A step's hidden part (compute + comm - its time), less the slack of a wire-bound step
  (comm - compute: its cores idle while it waits on the wire; `contended`), is added back times
  (1 - overlap): when ranks outnumber cores there is no idle core, and the ring plans measured on
  emulated clusters ran up to 2x slower than fully-overlapped steps predict. A transfer is priced
  once, against the compute it overlaps: a ring step's on the step that posts it, with or without
  token runs (cost_ring_chunked); a Torus exchange against the blocks attended before it arrives
  (cost_torus). Charging it against the compute after it instead over-predicted the 2x4
  200 Mbit/s text-free 8192 cell by 1.27x (USP 4x2 in 8 runs) and 1.32x (Torus 4x2x1).
- net_cpu (multi-node CPU groups: measured by planner.measure_net_cpu, 0 otherwise): the CPU
  seconds one side of a network transfer spends per byte (gloo's threads, the kernel's TCP stack).
  When ranks outnumber cores (overlap < 1) moving bytes takes cores from the compute: the
  busiest rank's CPU for what it sends and receives -- network bytes x net_cpu, node-local (shm)
  bytes x one copy at the memory bandwidth (the put or the copy-out) -- divided by the core share
  (a rank gets `overlap` of a core). It first fills the call's waits (what the steps take beyond
  their compute: a rank blocked on a peer or the wire leaves its core to the others); a last step
  adds the rest, min(moving, compute + moving - the steps' sum). Measured on the emulated 2x2 /
  2x4 clusters: without it the compute-bound 1 Gbit/s cells were predicted at 0.7-0.8x of
  measured; added whole (before 2026-12-06) it predicted plans with exposed waits too slow
  (2x4 at 1 Gbit/s, flux 512 + 256: USP 2x4 1.23x, ring 8 1.22x, Ulysses 8 1.13x of measured).
- blocking steps (all-to-alls, joint gathers, compute between them) add up; a ring step costs
  max(compute, comm). Ulysses in head-group chunks: see CostModel.cost_ulysses_chunked; ring steps
  in token runs: CostModel.cost_ring_chunked. Torus: see CostModel.cost_torus (each block waits
  only for its own exchange; the exchanges go one at a time, each posted as the one before has
  arrived). With sync_s, each of a Torus' t-1 arrivals and t-1 outputs home is a wait on a peer,
  sync_s each (those not already costed with a transfer).

Not modelled: kernel launch overheads on GPUs (CPU groups calibrate the kernel at the calls each
candidate makes, a ring's token runs included: calibration.run_rate), compute efficiency below a
declared (GPU) rate, the CPU time that moving bytes costs where cores are NOT oversubscribed (it
runs on idle cores there), the backward pass, NCCL protocol effects, and contention between
different link kinds inside one GPU.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from .plan import Candidate, Step
from .schedule import Msg, Phase, chunk_problem, fold_phases, phases, torus_parts
from .sharding import folded_problem, group_lengths, ring_runs, run_pieces, run_size, run_starts, run_within
from .topology import Link, LinkKind, Topology

# ---------------------------------------------------------------------------------- timing
# links not behind a shared port
_PORTLESS = (LinkKind.NVLINK, LinkKind.LOOPBACK) + tuple(k for k in LinkKind if k.is_network)


class CostModel:
    """Times communication steps and whole candidates on one topology at one compute rate."""

    def __init__(self, topology: Topology, rate: float, memory_bandwidth: Optional[float] = None,
                 sync_s: float = 0.0, overlap: float = 1.0, net_cpu: float = 0.0,
                 host_waits: bool = False):
        self.topology = topology
        self.host_waits = bool(host_waits)
        self.net_cpu = float(net_cpu)
        self.rate = float(rate)
        self.mem_bw = memory_bandwidth
        self.sync_s = float(sync_s)
        self.overlap = float(overlap)
        self._socket = self._sockets(topology)
        self._domain_size: Dict[tuple, int] = defaultdict(int)
        for x in range(topology.world_size):
            for network in (True, False):
                self._domain_size[self._domain(network, x)] += 1
        self._eff: Dict[Tuple[int, int], Link] = {}
        self._pairs: Dict[Tuple[int, int], tuple] = {}

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

    def _pair(self, a: int, b: int):
        """(link, facts) of ranks a -> b, looked up once per model: facts = (kind value, network?,
        behind a shared port?, shares a domain: network or cross-socket?)."""
        got = self._pairs.get((a, b))
        if got is None:
            lk = self.topology.link(a, b)
            k = lk.kind
            got = self._pairs[(a, b)] = (lk, (k.value, k.is_network, k not in _PORTLESS,
                                              k.is_network or k == LinkKind.PCIE_CROSS_SOCKET))
        return got

    def _domain(self, network: bool, rank: int):
        """The ranks sharing a network uplink (its node) or an inter-socket path (its socket)."""
        return ("node", self.topology.node[rank]) if network else ("socket", self._socket[rank])

    def _effective(self, link: Link, domain_size: int) -> Link:
        if link.kind == LinkKind.PCIE_CROSS_SOCKET and link.shared_by == 1 and domain_size > 1:
            key = (id(link), domain_size)
            if key not in self._eff:
                self._eff[key] = dataclasses.replace(link, shared_by=domain_size)
            return self._eff[key]
        return link

    def comm_time(self, msgs: Sequence[Msg]) -> Tuple[float, str, Dict[str, int]]:
        """(seconds, bottleneck, largest bytes one rank sends per link kind) for messages that are
        all in flight at once."""
        if not msgs:
            return 0.0, "", {}
        # the slowest transfer so far, and how to describe it (formatted once, at the end)
        best: list = [0.0, None]

        def consider(tt, describe):
            if tt > best[0]:
                best[0], best[1] = tt, describe

        links: Dict[int, Tuple[Link, tuple]] = {}  # id(link) -> (link, facts)
        out_by: Dict[Tuple[int, int], int] = defaultdict(int)  # (rank, id(link)) -> bytes
        in_by: Dict[Tuple[int, int], int] = defaultdict(int)
        kind_bytes: Dict[Tuple[int, str], int] = defaultdict(int)
        for a, b, n in msgs:
            lk, facts = self._pair(a, b)
            links[id(lk)] = (lk, facts)
            out_by[(a, id(lk))] += n
            in_by[(b, id(lk))] += n
            kind_bytes[(a, facts[0])] += n
            consider(lk.transfer_time(n), lambda lk=lk, a=a, b=b, n=n: (
                f"{lk.kind.value} pair {a}->{b}: {_mb(n)} at {_gbs(lk.bandwidth_Bps)}"))
        for side, table in (("sends", out_by), ("receives", in_by)):
            # ports: every non-network, non-direct-NVLink link of a rank shares its one port
            port: Dict[int, List] = defaultdict(lambda: [0, None])
            users: Dict[Tuple[int, tuple], set] = defaultdict(set)
            for (rank, li), n in table.items():
                lk, (_, network, ported, shared) = links[li]
                if ported:
                    p = port[rank]
                    p[0] += n
                    if p[1] is None or (lk.bandwidth_Bps, -lk.latency_s) > (p[1].bandwidth_Bps, -p[1].latency_s):
                        p[1] = lk
                if shared:
                    users[(li, self._domain(network, rank))].add(rank)
            for rank, (n, lk) in port.items():
                consider(lk.transfer_time(n), lambda rank=rank, n=n, lk=lk, side=side: (
                    f"port of rank {rank} ({side}): {_mb(n)} at {_gbs(lk.bandwidth_Bps)}"))
            for (rank, li), n in table.items():
                lk, (_, network, _, shared) = links[li]
                if not shared:
                    continue
                dom = self._domain(network, rank)
                conc = len(users[(li, dom)])
                eff = self._effective(lk, self._domain_size[dom])
                consider(eff.transfer_time(n, concurrent=conc),
                         lambda rank=rank, n=n, lk=lk, eff=eff, conc=conc, side=side: (
                             f"{lk.kind.value} {'uplink' if lk.kind.is_network else 'inter-socket path'}"
                             f" of rank {rank} ({side}): {_mb(n)} at {_gbs(lk.bandwidth_Bps)}"
                             + (f" / {min(conc, eff.shared_by)} sharing"
                                if min(conc, eff.shared_by) > 1 else "")))
        per_kind: Dict[str, int] = {}
        for (a, k), n in kind_bytes.items():
            per_kind[k] = max(per_kind.get(k, 0), n)
        return best[0] + self.sync_s, best[1]() if best[1] is not None else "", per_kind

    def _local(self, flops: float, mem: float, rate: Optional[float] = None) -> float:
        return flops / (rate or self.rate) + (mem / self.mem_bw if self.mem_bw else 0.0)

    def _comm(self, msgs, cache) -> tuple:
        key = tuple(msgs)
        if key not in cache:
            cache[key] = self.comm_time(msgs)
        return cache[key]

    def phase_mem(self, ph: Phase) -> Dict[int, float]:
        """ph.mem plus, for a phase of Parts messages, the packing copies of those the transport
        stages: every message off the shm links (another node, gloo, a GPU heap) is packed into
        one buffer on the sender and unpacked on the receiver (ph.staged bytes per wire byte on
        each side); on shm the parts move straight between the views and the slots, unless the
        wire dtype differs (ph.cast: CastTransport stages every message). Assumes the shm
        transport on shm links: a group forced onto gloo (STREAMATTN_TRANSPORT=torch), the
        shm-device and in-order transports and the collective all-to-all stage (or pack) there
        too, unpriced; so is a message larger than one slot."""
        if not ph.staged:
            return ph.mem
        mem = defaultdict(float, ph.mem)
        for a, b, n in ph.msgs:
            if self._staged(a, b, ph.cast):
                mem[a] += ph.staged * n
                mem[b] += ph.staged * n
        return mem

    def _staged(self, a: int, b: int, cast: bool) -> bool:
        """Whether a Parts message a -> b goes through a packing buffer: off the shm links, or on
        every link when the wire dtype differs (CastTransport)."""
        return cast or self._pair(a, b)[0].kind != LinkKind.SHM

    def torus_exchange_mem(self, parts) -> Dict[Tuple[int, int], float]:
        """{(rank, block index): memory bytes} the Torus exchanges' staged Parts add: the sender
        packs before its local block (index 0), the receiver unpacks exchange k's message before
        attending its block (index k); nothing where the parts move straight (shm, one slot)."""
        extra: Dict[Tuple[int, int], float] = defaultdict(float)
        for k, msgs in enumerate(parts.steps, 1):
            for a, b, n in msgs:
                if self._staged(a, b, parts.cast):
                    extra[(a, 0)] += parts.staged * n
                    extra[(b, k)] += parts.staged * n
        return extra

    def _blocking(self, ph: Phase, cache) -> Tuple[Step, float, float, str]:
        """(Step, compute, comm, bottleneck) of one phase: blocking adds, overlapped costs max."""
        pm = self.phase_mem(ph)
        ranks = set(ph.compute) | set(pm)
        c = max((self._local(ph.compute.get(x, 0.0), pm.get(x, 0.0)) for x in ranks), default=0.0)
        m, bott, per_kind = self._comm(ph.msgs, cache)
        st = max(c, m) if ph.overlapped else c + m
        return Step(ph.name, st, c, m, ph.overlapped, bott, tuple(sorted(per_kind.items()))), c, m, bott

    def _candidate(self, problem, algorithm, u, r, groups, placement, steps, bott_steps,
                   all_msgs, contention_priced: bool = False) -> Candidate:
        busiest: Dict[int, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for a, b, n in all_msgs:
            busiest[a][self._pair(a, b)[1][0]] += n
        kinds = defaultdict(int)
        for per in busiest.values():
            for k, n in per.items():
                kinds[k] = max(kinds[k], n)
        worst = max(bott_steps, key=lambda x: x[0], default=(0.0, ""))
        if self.overlap < 1.0 and not contention_priced:  # only this share hides behind compute
            steps = [dataclasses.replace(s, time_s=s.time_s + (1.0 - self.overlap) * lost)
                     if (lost := contended(s)) > 0 else s for s in steps]
        moving = self.moving_cpu_s(all_msgs)
        if moving > 0:
            # the call is bound by its CPU on shared cores: every step's compute plus moving the
            # bytes, over the cores; a step that waits on a peer or the wire leaves them to the
            # others, so the moving CPU fills those waits before it adds to the call
            busy = sum(s.compute_s for s in steps) + moving
            over = min(moving, busy - sum(s.time_s for s in steps))
            if over > 0:
                steps = list(steps) + [Step("CPU that moving the bytes takes from the shared cores "
                                            "(TCP stack, shm copies) beyond the steps' waits",
                                            over, 0.0, 0.0)]
        if self.sync_s and problem.world_size > 1:
            steps = [Step("per-call agreement (every rank's signature, all-gathered)", self.sync_s,
                          0.0, self.sync_s)] + list(steps)
        return Candidate(algorithm, u, r, tuple(tuple(g) for g in groups), placement, "",
                         sum(s.time_s for s in steps), sum(s.compute_s for s in steps),
                         sum(s.comm_s for s in steps), worst[1] if worst[0] > 0 else "",
                         tuple(sorted(kinds.items())), tuple(steps))

    def _contention(self, compute: float, comm: float) -> float:
        """What a transfer of `comm` seconds costs on shared cores beyond its overlap with the
        `compute` seconds that run while it is in flight: (1 - overlap) x `contended` of that
        window; 0 when every thread has a core."""
        if self.overlap >= 1.0:
            return 0.0
        return (1.0 - self.overlap) * contended(Step("", max(compute, comm), compute, comm, True))

    def moving_cpu_s(self, msgs: Sequence[Msg]) -> float:
        """Wall seconds the busiest rank spends moving `msgs` on cores its peers compute on: per
        side, network bytes x net_cpu and shm bytes x one copy (2 / memory bandwidth: read +
        write), divided by the core share. 0 unless ranks outnumber cores (0 < overlap < 1)."""
        if not 0.0 < self.overlap < 1.0 or not msgs:
            return 0.0
        copy = 2.0 / self.mem_bw if self.mem_bw else 0.0
        per: Dict[int, float] = defaultdict(float)
        for a, b, n in msgs:
            kind = self._pair(a, b)[0].kind
            c = self.net_cpu if kind.is_network else copy if kind == LinkKind.SHM else 0.0
            per[a] += n * c
            per[b] += n * c
        return max(per.values(), default=0.0) / self.overlap

    def cost(self, problem, algorithm: str, u: int, groups, placement: str = "consecutive",
             torus_degree: Optional[int] = None, chunks: int = 1, fold: bool = False,
             joint_all: bool = False, run_rate: Optional[float] = None) -> Candidate:
        """A costed `Candidate` for Ulysses groups `groups` of u members (torus_degree=t: the
        Torus algorithm, see cost_torus; chunks > 1: pipelined Ulysses, cost_ulysses_chunked, or
        a ring in token runs, cost_ring_chunked, whose runs compute at run_rate when given;
        fold: the joint tokens folded into the sequence, schedule.folded_problem -- the folding
        copy and the joint output all-gather are blocking steps around the folded plan;
        joint_all: a ring's members each attend all joint queries, schedule.phases)."""
        if fold:
            inner = self.cost(folded_problem(problem), algorithm, u, groups, placement, torus_degree,
                              chunks, run_rate=run_rate)
            pre, post = fold_phases(problem)
            cache: Dict[tuple, tuple] = {}
            (s0, c0, m0, b0), (s1, c1, m1, b1) = (self._blocking(p, cache) for p in (pre, post))
            steps = (s0,) + inner.steps + (s1,)
            kinds = defaultdict(int, dict(inner.bytes_by_kind))
            for k, n in self.comm_time(post.msgs)[2].items():
                kinds[k] += n
            worst = max([(inner.comm_s, inner.bottleneck), (m1, f"{post.name}: {b1}")],
                        key=lambda x: x[0])
            return dataclasses.replace(inner, predicted_s=sum(s.time_s for s in steps),
                                       compute_s=inner.compute_s + c0 + c1, comm_s=inner.comm_s + m1,
                                       bottleneck=worst[1] if worst[0] > 0 else "",
                                       bytes_by_kind=tuple(sorted(kinds.items())), steps=steps,
                                       joint_fold=True)
        if chunks > 1 and len(groups) > 1 and algorithm in ("ring", "usp"):
            return self.cost_ring_chunked(problem, algorithm, u, groups, chunks, placement, joint_all,
                                          run_rate)
        if chunks > 1:
            return self.cost_ulysses_chunked(problem, u, groups, chunks, placement)
        if algorithm == "torus":
            return self.cost_torus(problem, u, torus_degree, groups, placement)
        steps: List[Step] = []
        botts, all_msgs, cache = [], [], {}
        for ph in phases(problem, u, groups, joint_all=joint_all):
            st, c, m, bott = self._blocking(ph, cache)
            steps.append(st)
            botts.append((m, f"{ph.name}: {bott}"))
            all_msgs += ph.msgs
        cand = self._candidate(problem, algorithm, u, problem.world_size // u, groups, placement,
                               steps, botts, all_msgs)
        return dataclasses.replace(cand, joint_all=joint_all)

    def cost_ulysses_chunked(self, problem, u: int, groups, chunks: int,
                             placement: str = "consecutive") -> Candidate:
        """Ulysses pipelined over `chunks` head groups (ulysses.py _pipelined): every chunk's
        scatter is posted at once (packing all of them first); chunk k's attention starts when its
        scatter has arrived (A_k = comm_time of scatters 1..k, in posting order) and the previous
        chunk is done; its output gather is posted right after, gathers drain one after another
        behind the compute; the joint output all-gathers (blocking) come last. Every chunk beyond
        the first adds two exchange rounds, 2 sync_s that no compute hides."""
        sub = chunk_problem(problem, chunks)
        ph = phases(sub, u, groups)
        scatter = next(p for p in ph if p.name.startswith("Ulysses all-to-all q"))
        attn = next(p for p in ph if p.name.startswith("attention"))
        gather = next(p for p in ph if p.name.startswith("Ulysses all-to-all output"))
        rest = [p for p in ph if p not in (scatter, attn, gather)]
        cache: Dict[tuple, tuple] = {}
        smem, gmem = self.phase_mem(scatter), self.phase_mem(gather)
        ranks = set(attn.compute) | set(attn.mem) | set(smem)
        pack = max((self._local(0.0, smem.get(x, 0.0)) for x in ranks), default=0.0)
        work = max((self._local(attn.compute.get(x, 0.0), attn.mem.get(x, 0.0) + gmem.get(x, 0.0))
                    for x in ranks), default=0.0)
        g_time, g_bott, g_kind = self._comm(gather.msgs, cache)
        steps: List[Step] = [Step(f"pack and post the {chunks} scatters", chunks * pack, chunks * pack)]
        end, g_done, prefix, botts, all_msgs = chunks * pack, 0.0, [], [], []
        prev_arrive = 0.0
        for k in range(1, chunks + 1):
            prefix += scatter.msgs
            arrive = chunks * pack + self.comm_time(prefix)[0]
            start = max(end, arrive)
            _, bott, kinds = self._comm(scatter.msgs, cache)
            steps.append(Step(f"chunk {k}/{chunks}: scatter arrives, attend, post its gather",
                              start - end + work, work, arrive - chunks * pack - prev_arrive, True, bott, kinds))
            botts.append((arrive - prev_arrive, f"chunk {k} scatter: {bott}"))
            prev_arrive = arrive - chunks * pack
            end = start + work
            # the gathers share the links with the scatters still in flight: FIFO behind them
            g_done = max(g_done, end, self.comm_time(scatter.msgs * chunks)[0] + chunks * pack) + g_time
            all_msgs += scatter.msgs + gather.msgs
        steps.append(Step("gathers drain after the last chunk", g_done - end, 0.0, chunks * g_time, True,
                          g_bott, g_kind))
        if self.sync_s and chunks > 1:
            # every further chunk is two more exchange rounds (its scatter, its gather) that each wait
            # for the peers to have run their part: on an oversubscribed CPU a scheduling delay per
            # round that no compute hides (measured: 2 chunks at 512 + 256 tokens on 4 ranks / 2
            # cores took 50 ms, predicted 31 ms without this, unchunked 40 ms)
            extra = 2 * (chunks - 1) * self.sync_s
            steps.append(Step(f"{chunks - 1} more chunk(s): 2 exchange rounds each", extra, 0.0, extra))
        botts.append((g_time, f"gather: {g_bott}"))
        for p in rest:
            for _ in range(chunks):
                st, c, m, bott = self._blocking(p, cache)
                steps.append(st)
                botts.append((m, f"{p.name}: {bott}"))
                all_msgs += p.msgs
        cand = self._candidate(problem, "ulysses", u, problem.world_size // u, groups, placement,
                               steps, botts, all_msgs)
        return dataclasses.replace(cand, chunks=chunks)

    def cost_ring_chunked(self, problem, algorithm: str, u: int, groups, chunks: int,
                          placement: str = "consecutive", joint_all: bool = False,
                          run_rate: Optional[float] = None) -> Candidate:
        """Ring / USP with every ring step's block cut into `chunks` token runs (ring.ring_core):
        the phases before and after the ring are blocking as usual; in the ring, my block's runs
        are all posted at once and the block attended whole; in step t >= 1 each run is waited
        for, forwarded (posted) and attended in turn. With c_t the slowest rank's compute of step
        t and m_t its block's transfer: the runs of a block cross the link one after another,
        run i of step t+1 leaving when run i of step t has arrived and been waited for (post =
        max(its arrival, the compute before it)) and the link is free -- of my step-t runs too:
        one connection to the successor sends in posting order, so in a ring of three or more the
        forwarded runs queue behind mine and only the compute pipelines; attention of run i starts
        at max(its arrival, the end of the run before). With one run this is the unchunked
        sum of max(c_t, m_t) plus the last step's compute. Every run beyond the first of an
        arriving block is one more wait on a peer: sync_s each (scheduling on an oversubscribed
        CPU). On shared cores (overlap < 1) the step-t transfer contends with step t's compute
        exactly as in the unchunked ring: cutting a block into runs changes when its compute can
        start, not how much core time its transfer takes from that compute. run_rate: FLOP/s of
        the kernel on one run (calibration.run_shape; default self.rate): the steps attended run
        by run compute at it, the first step (its block attended whole) at self.rate."""
        ph = phases(problem, u, groups, chunks, joint_all)
        cache: Dict[tuple, tuple] = {}
        steps: List[Step] = []
        botts, all_msgs = [], []
        ring = [p for p in ph if p.name.startswith("ring step")]
        r = len(ring)
        c = [max((self._local(p.compute.get(x, 0.0), p.mem.get(x, 0.0), run_rate if t else None)
                  for x in set(p.compute) | set(p.mem)), default=0.0) for t, p in enumerate(ring)]
        comm = [self._comm(p.msgs, cache) for p in ring[:-1]]
        runs = ring_runs(group_lengths(problem.seq_lens, groups), chunks)
        # My runs that hold only my own tokens leave during the Ulysses all-to-all (scatter_s
        # before the ring starts, usp.py); the rest once it has landed. Each run is its share of
        # the block's transfer and compute (sharding.run_pieces: the last runs shorter).
        scatter_s = sum(self._blocking(p, cache)[0].time_s for p in ph[:ph.index(ring[0])] if p.msgs)
        wire, share = comm[0][0] - self.sync_s, None
        arrive = []
        for j in range(u):  # the ring whose last run arrives latest
            sh, ea = run_shares(problem, groups, j, runs)
            free, arr = -scatter_s, []
            for n, e in zip(sh, ea):
                free = max(free, -scatter_s if e else 0.0) + wire * n
                arr.append(free + self.sync_s)
            if not arrive or arr[-1] > arrive[-1]:
                arrive, share = arr, sh
        end = c[0]
        ring_steps = [Step(f"ring step 1/{r}: post my block's {runs} runs (those of my own tokens "
                           "during the all-to-all), attend the block", c[0], c[0])]
        for t in range(1, r):
            # my link to the successor carries my runs of step t first (one connection, sent in
            # posting order): by symmetry they have left when my predecessor's have arrived
            start, nxt, free = end, [], arrive[-1] - self.sync_s
            fwd = (comm[t][0] - self.sync_s) if t < r - 1 else 0.0
            for i in range(runs):
                ready = max(end, arrive[i])
                if t < r - 1:
                    free = max(ready, free) + fwd * share[i]
                    nxt.append(free + self.sync_s)
                end = ready + c[t] * share[i]
            end += (runs - 1) * self.sync_s
            m, bott, kinds = comm[t - 1]
            ring_steps.append(Step(f"ring step {t + 1}/{r}: {runs} runs arrive, each forwarded and "
                                   "attended (each further run one more wait)", end - start, c[t], m,
                                   True, bott, tuple(sorted(kinds.items()))))
            botts.append((m, f"ring step {t}: {bott}"))
            arrive = nxt
        # a transfer steals the shared cores from the compute it overlaps whether or not its block
        # is cut into runs: priced as the unchunked ring prices it, on the step that posts it
        for t in range(r - 1):
            if (lost := self._contention(c[t], comm[t][0])) > 0:
                ring_steps[t] = dataclasses.replace(ring_steps[t], time_s=ring_steps[t].time_s + lost)
        for p in ph:
            if p is ring[0]:
                steps += ring_steps
            if p in ring:
                all_msgs += p.msgs
                continue
            st, cc, m, bott = self._blocking(p, cache)
            steps.append(st)
            botts.append((m, f"{p.name}: {bott}"))
            all_msgs += p.msgs
        cand = self._candidate(problem, algorithm, u, len(groups), groups, placement, steps, botts,
                               all_msgs, contention_priced=True)
        return dataclasses.replace(cand, chunks=chunks, joint_all=joint_all)

    def cost_torus(self, problem, u: int, t: int, groups, placement: str = "consecutive") -> Candidate:
        """Torus over `groups` (P/u Ulysses groups in team order, teams of t groups, r = P/(u*t)).

        Time: the intra all-to-all blocks. The t-1 torus exchanges go one at a time (torus.py posts
        step k+1 once step k has arrived): every rank attends its local block first, then block k
        as soon as it has arrived and the previous block is done, start_k = max(end_(k-1), A_k),
        where A_1 = comm_time(step 1) and A_(k+1) = start_k + comm_time(step k+1) where the rank's
        thread runs the attention itself (host_waits: CPU groups, which get to step k's wait, and
        post step k+1 after it, only once the blocks before are attended), A_k + comm_time(step
        k+1) on GPUs (the host only enqueues the kernels: it is at step k's wait long before step
        k lands) -- the first exchange hides behind the local block, each later one behind the
        block attended while it travels. With r = 1 the outputs go home as soon as final: the earlier blocks' during the last block's
        work (after their last merge), the last block's when it is done; the call waits for them
        (done = max(last early post + their transfer, end of compute) + the last block's
        transfer). With a ring factor the ring-of-teams steps are blocking (torus.py posts each
        step and waits for it before attending it), then every output goes home, then the intra
        gather and the joint output, all blocking. The steps are those of the slowest rank.
        """
        parts = torus_parts(problem, u, t, groups)
        r = parts.r
        cache: Dict[tuple, tuple] = {}
        steps: List[Step] = []
        botts, all_msgs = [], []
        for ph in parts.pre:
            st, c, m, bott = self._blocking(ph, cache)
            steps.append(st)
            botts.append((m, f"{ph.name}: {bott}"))
            all_msgs += ph.msgs
        # each exchange's transfer on its own (they go one at a time)
        transfer, step_info = [], []
        for k, msgs in enumerate(parts.steps, 1):
            tk, bott, per_kind = self._comm(msgs, cache)
            transfer.append(tk)
            step_info.append((bott, tuple(sorted(per_kind.items()))))
            botts.append((tk, f"torus exchange {k}/{t - 1}: {bott}"))
            all_msgs += msgs
        # every rank's pipeline
        runs = {}
        extra = self.torus_exchange_mem(parts)
        for x, work in parts.block.items():
            c = [self._local(f, m + extra.get((x, i), 0.0)) for i, (f, m) in enumerate(work)]
            ca = self._local(*parts.last_a[x]) if x in parts.last_a else 0.0
            end, waits, post_early = c[0], [0.0], 0.0
            arrive = transfer[0] if t > 1 else 0.0
            for k in range(1, t):
                start = max(end, arrive)
                waits.append(start - end)
                if k < t - 1:  # step k+1 goes out as step k has arrived
                    arrive = (start if self.host_waits else arrive) + transfer[k]
                if k == t - 1 and r == 1:
                    post_early = start + ca
                    c[k] += ca
                end = start + c[k]
            runs[x] = (end, post_early, c, waits)
        slow = max(runs, key=lambda x: (runs[x][0], -x))
        end, _, c, waits = runs[slow]
        steps.append(Step(f"torus: post exchange 1 of {t - 1}, attend the local block", c[0], c[0]))
        for k in range(1, t):
            bott, per_kind = step_info[k - 1]
            m = transfer[k - 1]
            # on shared cores the exchange contends with the compute it overlapped (what ran
            # before it arrived), not with the block attended after it
            lost = self._contention(max(0.0, m - waits[k]), m)
            steps.append(Step(f"torus exchange {k}/{t - 1} q,k,v arrives, attend its block",
                              waits[k] + c[k] + lost, c[k], m, True, bott, per_kind))
        if r == 1 and (parts.home_early or parts.home_last):
            h_early, b_early, k_early = self._comm(parts.home_early, cache)
            h_last, b_last, k_last = self._comm(parts.home_last, cache)
            done = max(max(v[1] for v in runs.values()) + h_early, max(v[0] for v in runs.values())) + h_last
            kinds = defaultdict(int)
            for kk, n in list(k_early.items()) + list(k_last.items()):
                kinds[kk] += n
            bott = b_last if h_last >= h_early else b_early
            steps.append(Step("torus outputs sent home as final (the last block's after its compute)",
                              done - end, 0.0, h_early + h_last, True, bott, tuple(sorted(kinds.items()))))
            botts.append((h_early + h_last, f"torus outputs home: {bott}"))
            all_msgs += parts.home_early + parts.home_last
        # every block that arrives and every output that comes home is a wait on a peer: sync_s
        # each on an oversubscribed CPU, as for a ring's runs and Ulysses' chunks. Costed above:
        # one for the arrivals (one transfer), and for the outputs two with r = 1 (the early ones
        # and the last block's) or one (the blocking phase after the ring of teams)
        waits = (t - 2) + (t - 1) - (2 if r == 1 else 1)
        if self.sync_s and waits > 0:
            extra = waits * self.sync_s
            steps.append(Step(f"{waits} more waits on peers ({t - 1} blocks, {t - 1} outputs)",
                              extra, 0.0, extra))
        for ph in parts.post_ring + parts.post:
            st, cc, m, bott = self._blocking(ph, cache)
            steps.append(st)
            botts.append((m, f"{ph.name}: {bott}"))
            all_msgs += ph.msgs
        return self._candidate(problem, "torus", u, r, groups, placement, steps, botts, all_msgs,
                               contention_priced=True)


def run_shares(problem, groups, j: int, runs: int) -> Tuple[List[float], List[bool]]:
    """The token runs of the longest block on the ring of member j of every group, as ring.ring_core
    cuts it (sharding.run_starts / run_pieces): each run's share of the block, and whether it
    holds only member j's own tokens (USP posts those before its Ulysses all-to-all lands)."""
    seq = problem.seq_lens
    lens = group_lengths(seq, groups)
    x = max(range(len(groups)), key=lambda i: lens[i])
    first, lead = run_starts(seq, groups, j, problem.causal)
    a = sum(seq[m] for m in groups[x][:j])
    b = a + seq[groups[x][j]]
    pieces = run_pieces(lens[x], runs, first[x], lead[x])
    return [run_size(p) / lens[x] for p in pieces], [run_within(p, a, b) for p in pieces]


def contended(step: Step) -> float:
    """The part of an overlapped step's hidden time (compute + comm - its time) that contends for
    shared cores: what the step's slack (comm - compute, when the wire is what it waits on: its
    cores idle meanwhile) does not absorb. A compute-bound step loses its whole hidden comm; one
    whose transfer takes twice its compute or more loses nothing (measured on 2x2 at 200 Mbit/s,
    text-free 4096 tokens: USP 2x2 in 8 runs ran 388 ms where the model with the whole hidden part
    contended predicted 509 ms)."""
    hidden = max(0.0, step.compute_s + step.comm_s - step.time_s)
    return max(0.0, hidden - max(0.0, step.comm_s - step.compute_s))


def _mb(n: float) -> str:
    return f"{n / 1e6:.4g} MB"


def _gbs(bps: float) -> str:
    return f"{bps / 1e9:.4g} GB/s"
