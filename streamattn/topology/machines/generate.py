"""Writes the shipped machine topologies (``streamattn/topology/machines/*.json``).

Developer tool, not installed: ``python streamattn/topology/machines/generate.py`` regenerates every JSON
file next to this script; ``tests/test_topology.py`` checks that the shipped files equal its output,
so edit the numbers here, never in the JSON by hand.

Every number below is a *declared* figure from a vendor data sheet (``source`` starts with
``spec``) or a labelled assumption (``source`` starts with ``declared``); none was measured.
Bandwidths are bytes/s per direction (a "600 GB/s bidirectional" NVLink3 figure is stored as
300e9). Latencies are assumptions of the right order of magnitude for a small message through the
usual communication library; vendor sheets do not give them.
"""
from __future__ import annotations

import os
import sys
from typing import Dict

from streamattn.topology.model import Link, LinkKind, Topology

GB = 1e9
US = 1e-6

# ---- link classes --------------------------------------------------------------------------------
NVLINK3_NVSWITCH = Link(
    LinkKind.NVSWITCH,
    300 * GB,
    3 * US,
    source="spec:NVLink3 600 GB/s bidirectional per A100 SXM (12 links x 25 GB/s/dir) through "
    "NVSwitch; latency assumed",
)
NVLINK4_NVSWITCH = Link(
    LinkKind.NVSWITCH,
    450 * GB,
    3 * US,
    source="spec:NVLink4 900 GB/s bidirectional per H100 SXM (18 links x 25 GB/s/dir) through "
    "NVSwitch; latency assumed",
)
IB_NDR_PER_GPU = Link(
    LinkKind.INFINIBAND,
    50 * GB,
    5 * US,
    source="spec:InfiniBand NDR 400 Gb/s per NIC, one NIC per GPU; latency assumed",
    shared_by=1,
)
PCIE4_X16_SAME_SOCKET = Link(
    LinkKind.PCIE_HOSTBRIDGE,
    25 * GB,
    10 * US,
    source="spec:PCIe Gen4 x16 (32 GB/s/dir raw, ~25 GB/s/dir achievable); latency assumed",
)
PCIE4_CROSS_SOCKET = Link(
    LinkKind.PCIE_CROSS_SOCKET,
    16 * GB,
    15 * US,
    source="declared:assumption - GPU pair on different CPU sockets, P2P through host memory and "
    "the inter-socket link; no vendor figure, set below the same-socket PCIe figure",
)
ETH_100G_PER_NODE = Link(
    LinkKind.ETHERNET,
    12.5 * GB,
    20 * US,
    source="spec:100 Gigabit Ethernet (12.5 GB/s/dir), one NIC per node shared by its 8 GPUs; "
    "latency assumed",
    shared_by=8,
)

A100_FLOPS = 312e12
H100_FLOPS = 989e12
L40_FLOPS = 181e12
L20_FLOPS = 119.5e12


def _dual_socket_overrides(node_ranks, same: Link, cross: Link) -> Dict:
    """GPUs 0-3 of a node on socket 0, 4-7 on socket 1: cross pairs get ``cross``."""
    ov = {}
    for i, a in enumerate(node_ranks):
        for j, b in enumerate(node_ranks):
            if a < b and (i < 4) != (j < 4):
                ov[(a, b)] = cross
    return ov


def build_all() -> Dict[str, Topology]:
    out: Dict[str, Topology] = {}

    out["a100-8-nvlink"] = Topology(
        world_size=8,
        node=(0,) * 8,
        intra=NVLINK3_NVSWITCH,
        inter=None,
        name="a100-8-nvlink",
        provenance="machine:a100-8-nvlink",
        device="NVIDIA A100-SXM4 (HGX A100 8-GPU)",
        peak_flops=A100_FLOPS,
        peak_flops_source="spec:NVIDIA A100 data sheet, FP16/BF16 Tensor Core 312 TFLOPS dense "
        "(624 with sparsity)",
        notes="1 node, 8x A100 SXM4 on an HGX A100 baseboard: every GPU pair joined through the "
        "NVSwitches at the full NVLink3 rate (NVIDIA A100 data sheet: NVLink 600 GB/s "
        "bidirectional per GPU; stored per direction, 300 GB/s). USP (arXiv 2405.07719) reports "
        "Ulysses 8 best on this class of machine. Declared figures, not measured.",
    )

    for nodes in (1, 2, 4):
        name = f"h100x8-{nodes}node"
        out[name] = Topology(
            world_size=8 * nodes,
            node=tuple(r // 8 for r in range(8 * nodes)),
            intra=NVLINK4_NVSWITCH,
            inter=IB_NDR_PER_GPU if nodes > 1 else None,
            name=name,
            provenance=f"machine:{name}",
            device="NVIDIA H100 SXM5 80GB (HGX H100 8-GPU)",
            peak_flops=H100_FLOPS,
            peak_flops_source="spec:NVIDIA H100 data sheet, SXM FP16/BF16 Tensor Core 1979 TFLOPS "
            "with sparsity = 989 dense",
            notes=f"{nodes} node(s) of 8x H100 SXM5 (HGX H100 / DGX H100 class): NVLink4 through "
            "NVSwitch, 900 GB/s bidirectional per GPU (NVIDIA H100 data sheet), stored as 450 GB/s "
            "per direction; 8x ConnectX-7 InfiniBand NDR 400 Gb/s per node, one per GPU (DGX H100 "
            "user guide), stored as 50 GB/s per direction per GPU. Declared figures, not measured.",
        )

    l40_node = [list(range(8 * n, 8 * n + 8)) for n in range(2)]
    ov = {}
    for rs in l40_node:
        ov.update(_dual_socket_overrides(rs, PCIE4_X16_SAME_SOCKET, PCIE4_CROSS_SOCKET))
    out["l40x8-pcie-100gbe-2node"] = Topology(
        world_size=16,
        node=tuple(r // 8 for r in range(16)),
        intra=PCIE4_X16_SAME_SOCKET,
        inter=ETH_100G_PER_NODE,
        overrides=ov,
        name="l40x8-pcie-100gbe-2node",
        provenance="machine:l40x8-pcie-100gbe-2node",
        device="NVIDIA L40 48GB PCIe",
        peak_flops=L40_FLOPS,
        peak_flops_source="spec:NVIDIA L40 data sheet, FP16/BF16 Tensor Core 181.05 TFLOPS dense "
        "(362.1 with sparsity)",
        notes="xDiT's testbed class: 2 nodes of 8x L40 PCIe (no NVLink), 100 GbE between nodes. "
        "L40 data sheet: PCIe Gen4 x16, 64 GB/s bidirectional; stored as ~25 GB/s achievable per "
        "direction. Assumptions (labelled 'declared'): GPUs 0-3 on CPU socket 0 and 4-7 on socket "
        "1, cross-socket pairs slower; one 100 GbE NIC per node shared by its 8 GPUs. Declared "
        "figures, not measured.",
    )

    out["l20x8-pcie"] = Topology(
        world_size=8,
        node=(0,) * 8,
        intra=PCIE4_X16_SAME_SOCKET,
        inter=None,
        overrides=_dual_socket_overrides(list(range(8)), PCIE4_X16_SAME_SOCKET, PCIE4_CROSS_SOCKET),
        name="l20x8-pcie",
        provenance="machine:l20x8-pcie",
        device="NVIDIA L20 48GB PCIe",
        peak_flops=L20_FLOPS,
        peak_flops_source="spec:NVIDIA L20 product sheet, FP16/BF16 Tensor Core 119.5 TFLOPS dense "
        "(239 with sparsity)",
        notes="USP's testbed (arXiv 2405.07719): 1 node of 8x L20 PCIe, no NVLink; USP reports "
        "Ulysses 4 x Ring 2 4x faster than Ulysses 8 at 32K tokens. PCIe Gen4 x16 ~25 GB/s per "
        "direction achievable (32 GB/s raw). Assumptions (labelled 'declared'): GPUs 0-3 on CPU "
        "socket 0 and 4-7 on socket 1, cross-socket P2P through host memory and slower. Declared "
        "figures, not measured.",
    )
    return out


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    for name, topo in build_all().items():
        path = os.path.join(here, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(topo.to_json(indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
