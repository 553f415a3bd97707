"""GPU-to-GPU link identification through NVML (``pynvml`` from the nvidia-ml-py wheel).

For a GPU and each peer GPU on the same host it finds:
- NVLink: for every link ``l`` that is enabled (``nvmlDeviceGetNvLinkState``), the remote end
  (``nvmlDeviceGetNvLinkRemotePciInfo``): links whose remote bus id is the peer are counted; links
  ending on an NVSwitch make every peer reachable at the GPU's full NVLink rate (NVSWITCH).
- otherwise PCIe: ``nvmlDeviceGetTopologyCommonAncestor`` gives the level (PIX/PXB/PHB/NODE/SYS)
  and ``nvmlDeviceGetP2PStatus`` whether peer-to-peer reads work (else the copy goes through host
  memory).

Bandwidths are declared from the identified hardware (bytes/s per direction), never measured here:
NVLink per-link rate by version (v1 20 GB/s, v2-v4 25 GB/s, v5 50 GB/s per direction) x links;
PCIe raw per-lane rate by generation x lanes x 0.8 (achievable fraction, an assumption).
Latencies are declared assumptions. Every NVML call is guarded: any error gives "unknown".
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from .model import Link, LinkKind

NVLINK_PER_LINK_BPS = {1: 20e9, 2: 25e9, 3: 25e9, 4: 25e9, 5: 50e9}
PCIE_LANE_BPS = {1: 250e6, 2: 500e6, 3: 984.6e6, 4: 1969.2e6, 5: 3938.5e6, 6: 7877e6}
PCIE_ACHIEVABLE = 0.8  # assumption: fraction of the raw rate a large copy reaches
CROSS_SOCKET_FACTOR = 0.64  # assumption, same ratio as the shipped dual-socket machines (16/25)
NVLINK_LAT_S = 3e-6  # assumptions (order of magnitude of a small message through NCCL)
PCIE_LAT_S = 10e-6
CROSS_SOCKET_LAT_S = 15e-6

# NVML topology levels (nvmlGpuTopologyLevel_t)
_LEVELS = {
    0: LinkKind.PCIE_SWITCH,  # INTERNAL (same board, e.g. dual-GPU card)
    10: LinkKind.PCIE_SWITCH,  # SINGLE  (PIX)
    20: LinkKind.PCIE_MULTI_SWITCH,  # MULTIPLE (PXB)
    30: LinkKind.PCIE_HOSTBRIDGE,  # HOSTBRIDGE (PHB)
    40: LinkKind.PCIE_NUMA_NODE,  # NODE
    50: LinkKind.PCIE_CROSS_SOCKET,  # SYSTEM (SYS)
}

KINDS = list(LinkKind)  # index <-> kind, for the float64 exchange encoding


def norm_bus_id(bus) -> Tuple[int, int, int, int]:
    """``"00000000:17:00.0"`` (str or bytes) -> (domain, bus, device, function)."""
    if isinstance(bus, (bytes, bytearray)):
        bus = bytes(bus).decode(errors="replace")
    s = str(bus).strip().rstrip("\x00").lower()
    dom, b, rest = s.split(":")
    dev, fn = rest.split(".")
    return int(dom, 16), int(b, 16), int(dev, 16), int(fn, 16)


def bus_id_str(t: Tuple[int, int, int, int]) -> str:
    return f"{t[0]:08X}:{t[1]:02X}:{t[2]:02X}.{t[3]:X}"


def _try(fn, *a, default=None):
    try:
        return fn(*a)
    except Exception:
        return default


def nvlink_summary(nvml, h) -> Tuple[Dict[Tuple[int, int, int, int], int], int, int, int]:
    """(links per remote bus id, links to NVSwitches, total enabled links, max NVLink version)."""
    per_remote: Dict[Tuple[int, int, int, int], int] = {}
    to_switch = enabled = version = 0
    max_links = getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18)
    enabled_const = getattr(nvml, "NVML_FEATURE_ENABLED", 1)
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    for link in range(max_links):
        state = _try(nvml.nvmlDeviceGetNvLinkState, h, link)
        if state is None:
            continue
        if state != enabled_const:
            continue
        enabled += 1
        version = max(version, _try(nvml.nvmlDeviceGetNvLinkVersion, h, link, default=0) or 0)
        rtype = None
        if hasattr(nvml, "nvmlDeviceGetNvLinkRemoteDeviceType"):
            rtype = _try(nvml.nvmlDeviceGetNvLinkRemoteDeviceType, h, link)
        if rtype == switch_type:
            to_switch += 1
            continue
        info = _try(nvml.nvmlDeviceGetNvLinkRemotePciInfo, h, link)
        if info is None:
            continue
        try:
            remote = norm_bus_id(info.busId)
        except Exception:
            continue
        per_remote[remote] = per_remote.get(remote, 0) + 1
    return per_remote, to_switch, enabled, version


def pcie_bandwidth(nvml, h) -> Tuple[float, str]:
    """Declared PCIe bandwidth (bytes/s per direction) of a GPU's link, and its description."""
    gen = _try(nvml.nvmlDeviceGetMaxPcieLinkGeneration, h) or _try(
        nvml.nvmlDeviceGetCurrPcieLinkGeneration, h
    )
    width = _try(nvml.nvmlDeviceGetMaxPcieLinkWidth, h) or _try(
        nvml.nvmlDeviceGetCurrPcieLinkWidth, h
    )
    if not gen or not width:
        gen, width = 4, 16
        desc = "PCIe assumed gen4 x16"
    else:
        desc = f"PCIe gen{gen} x{width}"
    raw = PCIE_LANE_BPS.get(int(gen), PCIE_LANE_BPS[6]) * int(width)
    return raw * PCIE_ACHIEVABLE, f"{desc} ({raw / 1e9:.3g} GB/s/dir raw x {PCIE_ACHIEVABLE})"


def classify_pair(nvml, h, peer_h, peer_bus: Tuple[int, int, int, int]) -> Optional[Link]:
    """The declared link from GPU handle ``h`` to ``peer_h`` (bus id ``peer_bus``), or None."""
    summary = _try(nvlink_summary, nvml, h)
    if summary is not None:
        per_remote, to_switch, enabled, version = summary
        per_link = NVLINK_PER_LINK_BPS.get(version or 3, 25e9)
        direct = per_remote.get(peer_bus, 0)
        if direct:
            return Link(
                LinkKind.NVLINK,
                direct * per_link,
                NVLINK_LAT_S,
                source=f"spec:nvml {direct} NVLink v{version} link(s) x {per_link / 1e9:g} GB/s/dir; "
                "latency assumed",
            )
        if to_switch:
            p2p_nvlink = _try(
                nvml.nvmlDeviceGetP2PStatus,
                h,
                peer_h,
                getattr(nvml, "NVML_P2P_CAPS_INDEX_NVLINK", 3),
            )
            if p2p_nvlink in (None, getattr(nvml, "NVML_P2P_STATUS_OK", 0)):
                return Link(
                    LinkKind.NVSWITCH,
                    to_switch * per_link,
                    NVLINK_LAT_S,
                    source=f"spec:nvml {to_switch} NVLink v{version} link(s) to NVSwitch x "
                    f"{per_link / 1e9:g} GB/s/dir; latency assumed",
                )
    level = _try(nvml.nvmlDeviceGetTopologyCommonAncestor, h, peer_h)
    if level is None:
        return None
    kind = _LEVELS.get(int(level), LinkKind.PCIE_CROSS_SOCKET)
    bw, desc = pcie_bandwidth(nvml, h)
    p2p = _try(
        nvml.nvmlDeviceGetP2PStatus, h, peer_h, getattr(nvml, "NVML_P2P_CAPS_INDEX_READ", 0)
    )
    p2p_ok = p2p == getattr(nvml, "NVML_P2P_STATUS_OK", 0)
    lat = PCIE_LAT_S
    note = "" if p2p_ok else ", no P2P: through host memory"
    if kind == LinkKind.PCIE_CROSS_SOCKET:
        bw *= CROSS_SOCKET_FACTOR
        lat = CROSS_SOCKET_LAT_S
        return Link(
            kind,
            bw,
            lat,
            source=f"declared:nvml SYS, {desc} x {CROSS_SOCKET_FACTOR} cross-socket assumption"
            f"{note}; latency assumed",
        )
    return Link(kind, bw, lat, source=f"spec:nvml {kind.abbrev}, {desc}{note}; latency assumed")


def gpu_rows(nvml, my_bus, peers: Dict[int, Tuple[int, int, int, int]]) -> Dict[int, Link]:
    """Links from this GPU (bus id ``my_bus``) to each peer rank's GPU; peers NVML cannot see or
    classify are left out."""
    out: Dict[int, Link] = {}
    h = _try(nvml.nvmlDeviceGetHandleByPciBusId, bus_id_str(my_bus))
    if h is None:
        return out
    for rank, bus in peers.items():
        if bus == my_bus:
            continue  # two ranks on one GPU: leave to the fallback
        ph = _try(nvml.nvmlDeviceGetHandleByPciBusId, bus_id_str(bus))
        if ph is None:
            continue
        link = _try(classify_pair, nvml, h, ph, bus)
        if link is not None:
            out[rank] = link
    return out


def import_nvml():
    """``pynvml`` initialised, or None (not installed, no driver, any error)."""
    try:
        import pynvml  # type: ignore
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def local_gpu_bus_id() -> Optional[Tuple[int, int, int, int]]:
    """PCI bus id of this process's current CUDA device, or None without CUDA."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        dom = getattr(props, "pci_domain_id", None)
        bus = getattr(props, "pci_bus_id", None)
        dev = getattr(props, "pci_device_id", None)
        if bus is None or dev is None:
            return None
        return int(dom or 0), int(bus), int(dev), 0
    except Exception:
        return None


# Known dense fp16/bf16 tensor-core rates (FLOP/s per GPU), vendor data sheets; matched on the
# device name. Order matters (L40S before L40).
PEAK_FLOPS = [
    ("H200 NVL", 835e12, "spec:NVIDIA H200 NVL data sheet, FP16/BF16 1,671 TFLOPS with sparsity (dense half)"),
    ("H200", 989e12, "spec:NVIDIA H200 SXM data sheet, FP16/BF16 1,979 TFLOPS with sparsity (dense half)"),
    ("H100 80GB HBM3", 989e12, "spec:NVIDIA H100 SXM data sheet, FP16/BF16 dense"),
    ("H100 SXM", 989e12, "spec:NVIDIA H100 SXM data sheet, FP16/BF16 dense"),
    ("A100", 312e12, "spec:NVIDIA A100 data sheet, FP16/BF16 dense"),
    ("L40S", 362e12, "spec:NVIDIA L40S data sheet, FP16/BF16 dense"),
    ("L40", 181e12, "spec:NVIDIA L40 data sheet, FP16/BF16 dense"),
    ("L20", 119.5e12, "spec:NVIDIA L20 product sheet, FP16/BF16 dense"),
]


def peak_flops_for(device_name: str) -> Tuple[Optional[float], str]:
    for key, flops, src in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops, src
    return None, ""
