"""Unit tests of streamattn.topology (no process groups; see test_topology_probe.py for those)."""
import json
import os
import runpy
import stat
import types

import pytest

from streamattn.topology import (
    Link,
    LinkKind,
    Topology,
    list_machines,
    load_machine,
    parse_spec,
    probe,
    resolve_topology,
)
from streamattn.topology import cache as tcache
from streamattn.topology import gpulinks, hostinfo
from streamattn.topology.model import LOOPBACK_LINK
from streamattn.topology.spec import parse_bandwidth, parse_time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NVS = Link(LinkKind.NVSWITCH, 450e9, 3e-6, "spec")
IB = Link(LinkKind.INFINIBAND, 50e9, 5e-6, "spec")
SYS = Link(LinkKind.PCIE_CROSS_SOCKET, 16e9, 15e-6, "declared")


# ------------------------------------------------------------------------------------- model
def test_link_validation_and_transfer_time():
    lk = Link(LinkKind.ETHERNET, 125e6, 50e-6, "declared", shared_by=4)
    assert lk.transfer_time(125e6) == pytest.approx(1 + 50e-6)
    assert lk.transfer_time(125e6, concurrent=8) == pytest.approx(4 + 50e-6)  # capped at 4
    with pytest.raises(ValueError):
        Link(LinkKind.SHM, 0, 1e-6)
    with pytest.raises(ValueError):
        Link(LinkKind.SHM, 1e9, -1)
    with pytest.raises(ValueError):
        Link("warp-drive", 1e9, 0)
    assert Link("nvlink", 1e9, 0).kind is LinkKind.NVLINK


def test_json_round_trip_exact():
    t = Topology(
        world_size=6,
        node=(0, 1, 0, 1, 2, 2),
        local_index=(3, 0, 1, 2, 0, 1),
        intra=NVS,
        inter=Link(LinkKind.ROCE, 1.0 / 3 * 1e11, 7.123456789e-6, "measured:x", shared_by=2),
        overrides={(2, 0): SYS, (4, 5): SYS, (1, 3): Link(LinkKind.NVLINK, 1e11 / 7, 1e-7)},
        name="odd",
        provenance="test",
        device="dev",
        peak_flops=123.456e12,
        peak_flops_source="made up for the test",
        notes="ünïcode ok",
    )
    s = t.to_json()
    t2 = Topology.from_json(s)
    assert t2 == t
    assert t2.to_json() == s
    assert Topology.from_json(s.encode()) == t
    assert t2.link(0, 2) == SYS and t2.link(2, 0) == SYS
    assert t2.local_index == (3, 0, 1, 2, 0, 1)
    assert hash(t2) == hash(t) and t2.fingerprint() == t.fingerprint()
    d = json.loads(s)
    assert d["format"] == "streamattn.topology/1"
    # overrides grouped by link: SYS appears once with two pairs
    groups = {g["link"]["kind"]: g["pairs"] for g in d["overrides"]}
    assert groups["pcie_cross_socket"] == [[0, 2], [4, 5]]


def test_json_rejects_malformed():
    good = json.loads(parse_spec("2x2").to_json())
    for bad, needle in [
        ("not json", "not valid JSON"),
        (json.dumps({**good, "node": [0, 0, 1]}), "node map"),
        (json.dumps({**good, "pickle": 1}), "unknown topology field"),
        (json.dumps({**good, "format": "other/9"}), "unsupported topology format"),
        (json.dumps({**good, "intra": {**good["intra"], "kind": "warp"}}), "unknown link kind"),
        (json.dumps({k: v for k, v in good.items() if k != "intra"}), "intra"),
        (json.dumps({**good, "inter": None}), "no inter-node link"),
    ]:
        with pytest.raises(ValueError, match=needle):
            Topology.from_json(bad)


def test_compact_json_for_32_ranks():
    t = load_machine("h100x8-4node")
    assert t.world_size == 32
    assert len(t.to_json()) < 1500
    # per-pair overrides stay grouped: 32 cross-socket pairs in one entry
    l40 = json.loads(load_machine("l40x8-pcie-100gbe-2node").to_json())
    assert len(l40["overrides"]) == 1 and len(l40["overrides"][0]["pairs"]) == 32


def test_interleaved_map():
    t = Topology(world_size=8, node=(0, 1, 0, 1, 0, 1, 0, 1), intra=NVS, inter=IB)
    assert t.nodes() == [0, 1]
    assert t.ranks_of_node(0) == [0, 2, 4, 6]
    assert t.ranks_of_node(1) == [1, 3, 5, 7]
    assert t.local_index == (0, 0, 1, 1, 2, 2, 3, 3)
    assert t.is_intra(0, 6) and not t.is_intra(0, 1)
    assert t.link(0, 6) == NVS and t.link(1, 2) == IB
    assert t.num_nodes == 2 and t.ranks_per_node == 4
    assert not t.is_consecutive
    assert "interleaved" in str(t)
    assert Topology.from_json(t.to_json()) == t
    assert t.slowest_link([0, 2, 4, 6]) == NVS
    assert t.slowest_link([0, 1]) == IB


def test_uneven_and_noncontiguous_node_ids():
    t = Topology(world_size=5, node=(7, 7, 7, 3, 3), intra=NVS, inter=IB)
    assert t.nodes() == [3, 7]
    assert t.ranks_per_node is None
    assert t.num_nodes == 2
    assert t.ranks_of_node(42) == []
    assert t.is_consecutive


def test_topology_validation():
    with pytest.raises(ValueError, match="world_size"):
        Topology(world_size=0, node=(), intra=NVS)
    with pytest.raises(ValueError, match="no inter-node link"):
        Topology(world_size=2, node=(0, 1), intra=NVS)
    with pytest.raises(ValueError, match="not unique"):
        Topology(world_size=2, node=(0, 0), intra=NVS, local_index=(1, 1))
    with pytest.raises(ValueError, match="override pair"):
        Topology(world_size=2, node=(0, 0), intra=NVS, overrides={(0, 0): SYS})
    with pytest.raises(ValueError, match="override pair"):
        Topology(world_size=2, node=(0, 0), intra=NVS, overrides={(0, 5): SYS})
    t = Topology(world_size=2, node=(0, 0), intra=NVS)
    with pytest.raises(ValueError, match="out of range"):
        t.link(0, 2)


def test_slowest_link():
    t = load_machine("h100x8-2node")
    assert t.slowest_link(range(8)).kind is LinkKind.NVSWITCH
    assert t.slowest_link(range(16)).kind is LinkKind.INFINIBAND
    assert t.slowest_link([3, 11]).kind is LinkKind.INFINIBAND
    assert t.slowest_link([5]) is LOOPBACK_LINK
    with pytest.raises(ValueError):
        t.slowest_link([])
    l20 = load_machine("l20x8-pcie")
    assert l20.slowest_link([0, 1, 2, 3]).kind is LinkKind.PCIE_HOSTBRIDGE
    assert l20.slowest_link([4, 5, 6, 7]).kind is LinkKind.PCIE_HOSTBRIDGE
    assert l20.slowest_link([0, 1, 4]).kind is LinkKind.PCIE_CROSS_SOCKET
    # with a message size the latency counts: fat but slow-to-start link vs thin quick link
    fat = Link(LinkKind.ETHERNET, 100e9, 1e-3)
    thin = Link(LinkKind.SHM, 1e9, 1e-6)
    t2 = Topology(world_size=3, node=(0, 0, 1), intra=thin, inter=fat)
    assert t2.slowest_link([0, 1, 2]) == thin  # lowest bandwidth
    assert t2.slowest_link([0, 1, 2], nbytes=1000) == fat  # 1 ms latency dominates
    assert t2.slowest_link([0, 1, 2], nbytes=1e9) == thin


def test_subtopology_and_links_of():
    t = load_machine("l20x8-pcie")
    sub = t.subtopology([4, 0, 5])
    assert sub.world_size == 3
    assert sub.link(0, 1) == t.link(4, 0)
    assert sub.link(0, 2) == t.link(4, 5)
    assert len(t.links_of(range(8))) == 28


def test_str_matrix_and_legend():
    s = str(load_machine("h100x8-2node"))
    lines = s.splitlines()
    assert "16 ranks, 2 node(s) x 8 rank(s)" in lines[0]
    row0 = lines[2].split()
    assert row0[0] == "r0" and row0[1] == "X" and row0[2] == "NVS" and row0[9] == "IB"
    assert "NVS   = nvswitch: 450 GB/s, 3 us" in s
    assert "IB    = infiniband: 50 GB/s, 5 us" in s
    assert "989 TFLOP/s" in s
    # two links of one kind get distinct labels
    t = Topology(
        world_size=3,
        node=(0, 0, 0),
        intra=Link(LinkKind.PCIE_SWITCH, 25e9, 1e-5),
        overrides={(0, 2): Link(LinkKind.PCIE_SWITCH, 12e9, 1e-5)},
    )
    s = str(t)
    assert "PIX1" in s and "PIX2" in s


# ------------------------------------------------------------------------------------- spec
def test_spec_defaults():
    t = parse_spec("2x4")
    assert t.world_size == 8 and t.node == (0, 0, 0, 0, 1, 1, 1, 1)
    assert t.intra.kind is LinkKind.SHM and t.intra.bandwidth_Bps == 10e9
    assert t.intra.latency_s == 1e-6 and t.intra.source == "declared"
    assert t.inter.kind is LinkKind.ETHERNET and t.inter.bandwidth_Bps == 125e6
    assert t.inter.latency_s == 50e-6 and t.inter.shared_by == 4
    assert t.provenance == "spec:2x4"
    assert parse_spec(" 1X8 ").num_nodes == 1


def test_spec_options():
    t = parse_spec("2x4:intra=20GB/s,inter=1Gbit/s,intra_lat=5us,inter_lat=50us")
    assert t.intra.bandwidth_Bps == 20e9 and t.intra.latency_s == 5e-6
    assert t.inter.bandwidth_Bps == 125e6 and t.inter.latency_s == 50e-6
    assert t.intra.source == "declared:spec"
    t = parse_spec("4x2: INTER = 100mbit , Intra_Kind=NVLINK, inter_kind=infiniband")
    assert t.inter.bandwidth_Bps == 12.5e6 and t.inter.kind is LinkKind.INFINIBAND
    assert t.intra.kind is LinkKind.NVLINK and t.intra.bandwidth_Bps == 10e9
    assert Topology.from_json(t.to_json()) == t


@pytest.mark.parametrize(
    "text,value",
    [
        ("20GB/s", 20e9),
        ("20 gb/s", 20e9),
        ("500MB/s", 500e6),
        ("1Gbit/s", 125e6),
        ("1gbit", 125e6),
        ("10 Mbit/s", 1.25e6),
        ("100mbit", 12.5e6),
        ("2.5e1GB/s", 25e9),
        ("1TB/s", 1e12),
        ("8bit/s", 1.0),
    ],
)
def test_parse_bandwidth(text, value):
    assert parse_bandwidth(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "text,value", [("5us", 5e-6), ("50 µs", 50e-6), ("1ms", 1e-3), ("2s", 2.0), ("100ns", 1e-7)]
)
def test_parse_time(text, value):
    assert parse_time(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("2x", "2x"),
        ("x4", "x4"),
        ("0x4", "0x4"),
        ("2by4", "2by4"),
        ("2x4:", "empty option"),
        ("2x4:foo=1", "'foo'"),
        ("2x4:intra", "'intra'"),
        ("2x4:intra=", "'intra'"),
        ("2x4:intra=20", "'20'"),
        ("2x4:intra=20Gb/s", "ambiguous"),
        ("2x4:inter=1Gbps", "ambiguous"),
        ("2x4:intra=20furlongs", "furlongs"),
        ("2x4:intra_lat=5 parsecs", "parsecs"),
        ("2x4:intra=1GB/s,intra=2GB/s", "twice"),
        ("2x4:intra_kind=warp", "warp"),
        ("2x4:intra=0GB/s", "> 0"),
    ],
)
def test_spec_errors_name_the_bad_part(spec, needle):
    with pytest.raises(ValueError) as e:
        parse_spec(spec)
    assert needle in str(e.value)


# ------------------------------------------------------------------------------------- machines
EXPECTED = {
    # name: (world, nodes, intra kind, intra B/s per direction, inter kind, inter B/s, flops)
    "a100-8-nvlink": (8, 1, LinkKind.NVSWITCH, 300e9, None, None, 312e12),
    "h100x8-1node": (8, 1, LinkKind.NVSWITCH, 450e9, None, None, 989e12),
    "h100x8-2node": (16, 2, LinkKind.NVSWITCH, 450e9, LinkKind.INFINIBAND, 50e9, 989e12),
    "h100x8-4node": (32, 4, LinkKind.NVSWITCH, 450e9, LinkKind.INFINIBAND, 50e9, 989e12),
    "l40x8-pcie-100gbe-2node": (16, 2, LinkKind.PCIE_HOSTBRIDGE, 25e9, LinkKind.ETHERNET, 12.5e9, 181e12),
    "l20x8-pcie": (8, 1, LinkKind.PCIE_HOSTBRIDGE, 25e9, None, None, 119.5e12),
}


def test_list_machines():
    assert set(EXPECTED) <= set(list_machines())
    assert list_machines() == sorted(list_machines())
    with pytest.raises(ValueError, match="h100x8-2node"):
        load_machine("dgx-9000")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_machine_shapes(name):
    ws, nn, ik, ibw, ek, ebw, flops = EXPECTED[name]
    t = load_machine(name)
    assert load_machine(name + ".json") == t
    assert t.world_size == ws and t.num_nodes == nn and t.ranks_per_node == 8
    assert t.is_consecutive
    assert t.intra.kind is ik and t.intra.bandwidth_Bps == ibw
    if ek is None:
        assert t.inter is None
    else:
        assert t.inter.kind is ek and t.inter.bandwidth_Bps == ebw
    assert t.peak_flops == flops and t.peak_flops_source.startswith("spec:")
    assert t.notes and "not measured" in t.notes
    assert t.name == name and t.provenance == f"machine:{name}"
    for lk in t.distinct_links():
        assert lk.source.startswith(("spec:", "declared:")), lk
        assert not lk.is_measured
    assert Topology.from_json(t.to_json()) == t


def test_machine_specifics():
    h = load_machine("h100x8-2node")
    assert h.inter.shared_by == 1  # one NDR NIC per GPU
    l40 = load_machine("l40x8-pcie-100gbe-2node")
    assert l40.inter.shared_by == 8  # one 100 GbE NIC per node
    assert l40.link(0, 4).kind is LinkKind.PCIE_CROSS_SOCKET
    assert l40.link(8, 12).kind is LinkKind.PCIE_CROSS_SOCKET
    assert l40.link(8, 9).kind is LinkKind.PCIE_HOSTBRIDGE
    l20 = load_machine("l20x8-pcie")
    assert l20.link(3, 4).bandwidth_Bps < l20.link(0, 3).bandwidth_Bps


def test_shipped_files_match_generator():
    gen = runpy.run_path(os.path.join(REPO, "streamattn", "topology", "machines", "generate.py"))
    built = gen["build_all"]()
    assert set(built) == set(list_machines())
    for name, topo in built.items():
        with open(os.path.join(REPO, "streamattn", "topology", "machines", name + ".json")) as f:
            assert f.read() == topo.to_json(indent=1) + "\n", name


# ------------------------------------------------------------------------------------- NVML
class FakeNVML(types.SimpleNamespace):
    """A tiny pynvml stand-in: GPUs by bus id, NVLinks as (gpu, link) -> remote bus / 'switch'."""

    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    NVML_P2P_CAPS_INDEX_READ = 0
    NVML_P2P_CAPS_INDEX_NVLINK = 3
    NVML_P2P_STATUS_OK = 0

    def __init__(self, links, levels, p2p_ok=True, version=4, gen=4, width=16):
        super().__init__()
        self.links, self.levels, self.p2p_ok = links, levels, p2p_ok
        self.version, self.gen, self.width = version, gen, width

    def nvmlDeviceGetHandleByPciBusId(self, bus):
        return gpulinks.norm_bus_id(bus)

    def _remote(self, h, link):
        return self.links.get(h, {}).get(link)

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link >= 18:
            raise RuntimeError("no such link")
        return 1 if self._remote(h, link) is not None else 0

    def nvmlDeviceGetNvLinkVersion(self, h, link):
        return self.version

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        return 2 if self._remote(h, link) == "switch" else 0

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return types.SimpleNamespace(busId=gpulinks.bus_id_str(self._remote(h, link)).encode())

    def nvmlDeviceGetP2PStatus(self, h, p, idx):
        return 0 if self.p2p_ok else 4

    def nvmlDeviceGetTopologyCommonAncestor(self, h, p):
        return self.levels[(h, p)]

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self.gen

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self.width


B0, B1, B2 = (0, 0x17, 0, 0), (0, 0x2A, 0, 0), (0, 0x3D, 0, 0)


def test_nvml_nvswitch():
    nv = FakeNVML({B0: {i: "switch" for i in range(18)}}, {})
    rows = gpulinks.gpu_rows(nv, B0, {1: B1})
    assert rows[1].kind is LinkKind.NVSWITCH and rows[1].bandwidth_Bps == 18 * 25e9
    assert rows[1].source.startswith("spec:nvml 18 NVLink v4")


def test_nvml_direct_nvlink_and_pcie_levels():
    nv = FakeNVML(
        {B0: {0: B1, 1: B1, 2: B1, 3: B1}},
        {(B0, B2): 50, (B0, B1): 10},
        version=2,
        gen=4,
        width=16,
    )
    rows = gpulinks.gpu_rows(nv, B0, {1: B1, 2: B2})
    assert rows[1].kind is LinkKind.NVLINK and rows[1].bandwidth_Bps == 4 * 25e9
    assert rows[2].kind is LinkKind.PCIE_CROSS_SOCKET
    assert rows[2].bandwidth_Bps == pytest.approx(1969.2e6 * 16 * 0.8 * 0.64)
    assert rows[2].source.startswith("declared:")
    nv2 = FakeNVML({}, {(B0, B1): 30}, p2p_ok=False)
    r = gpulinks.gpu_rows(nv2, B0, {1: B1})[1]
    assert r.kind is LinkKind.PCIE_HOSTBRIDGE and "through host memory" in r.source


def test_norm_bus_id_and_flops_table():
    assert gpulinks.norm_bus_id(b"00000000:17:00.0\x00") == (0, 0x17, 0, 0)
    assert gpulinks.norm_bus_id("0000:3d:00.0") == (0, 0x3D, 0, 0)
    assert gpulinks.peak_flops_for("NVIDIA L40S")[0] == 362e12
    assert gpulinks.peak_flops_for("NVIDIA L40")[0] == 181e12
    assert gpulinks.peak_flops_for("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert gpulinks.peak_flops_for("Some CPU")[0] is None


# ------------------------------------------------------------------------------------- sysfs
def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def test_read_infiniband_and_network_link(tmp_path):
    root = str(tmp_path / "infiniband")
    for dev, rate, state, layer in [
        ("mlx5_0", "400 Gb/sec (4X NDR)", "4: ACTIVE", "InfiniBand"),
        ("mlx5_1", "400 Gb/sec (4X NDR)", "4: ACTIVE", "InfiniBand"),
        ("mlx5_2", "100 Gb/sec (4X EDR)", "1: DOWN", "InfiniBand"),
    ]:
        base = os.path.join(root, dev, "ports", "1")
        _write(os.path.join(base, "rate"), rate)
        _write(os.path.join(base, "state"), state)
        _write(os.path.join(base, "link_layer"), layer)
    ports = hostinfo.read_infiniband(root)
    assert [p.device for p in ports] == ["mlx5_0", "mlx5_1", "mlx5_2"]
    assert ports[0].rate_Bps == 50e9 and ports[0].active and not ports[2].active
    lk = hostinfo.network_link("nccl", 8, ports, None)
    assert lk.kind is LinkKind.INFINIBAND and lk.bandwidth_Bps == 50e9 and lk.shared_by == 4
    roce = [p.__class__(p.device, p.port, p.rate_Bps, p.rate_text, p.state, "Ethernet") for p in ports]
    assert hostinfo.network_link("nccl", 8, roce, None).kind is LinkKind.ROCE
    # gloo goes through sockets, not verbs
    nif = hostinfo.NetInterface("eth0", 25e9 / 8 * 1, 1)
    lk = hostinfo.network_link("gloo", 4, ports, nif)
    assert lk.kind is LinkKind.ETHERNET and lk.bandwidth_Bps == 25e9 / 8 and lk.shared_by == 4
    lk = hostinfo.network_link("gloo", 2, [], hostinfo.NetInterface("veth0", None, 1))
    assert lk.bandwidth_Bps == 125e6 and lk.source.startswith("declared:")
    assert hostinfo.read_infiniband(str(tmp_path / "nothing")) == []


def test_read_net_interface(tmp_path):
    root = str(tmp_path / "net")
    _write(os.path.join(root, "ib0", "speed"), "100000")
    _write(os.path.join(root, "ib0", "type"), "32")
    _write(os.path.join(root, "veth1", "type"), "1")
    nif = hostinfo.read_net_interface(root, "ib0")
    assert nif.speed_Bps == 100e9 / 8 and nif.arp_type == 32
    assert hostinfo.network_link("gloo", 8, [], nif).kind is LinkKind.INFINIBAND
    assert hostinfo.read_net_interface(root, "veth1").speed_Bps is None
    assert hostinfo.read_net_interface(root, "missing0") is None


def test_host_identity_override(monkeypatch):
    monkeypatch.delenv("STREAMATTN_HOST_ID", raising=False)
    real = hostinfo.host_hash()
    assert -(2**63) <= real < 2**63
    monkeypatch.setenv("STREAMATTN_HOST_ID", "fake-node-1")
    assert hostinfo.host_hash() != real
    assert hostinfo.host_hash() == hostinfo.host_hash("env:fake-node-1")


# ------------------------------------------------------------------------------------- cache
def test_cache_store_load(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMATTN_CACHE_DIR", str(tmp_path / "c"))
    t = parse_spec("2x2")
    hosts = [5, 5, -7, -7]
    key = tcache.cache_key(hosts, 4, "gloo", "cpu")
    assert key == tcache.cache_key(list(reversed(hosts)), 4, "gloo", "cpu")  # sorted hosts
    assert key != tcache.cache_key(hosts, 4, "nccl", "cpu")
    # an emulated cluster at another rate is another topology; the key of real links is unchanged
    slow = tcache.cache_key(hosts, 4, "gloo", "cpu", "inter=200mbit,intra=unshaped")
    assert slow != key != tcache.cache_key(hosts, 4, "gloo", "cpu", "inter=1gbit,intra=unshaped") != slow
    assert key == tcache.cache_key(hosts, 4, "gloo", "cpu", "")
    assert tcache.load(key, hosts) is None
    path = tcache.store(key, hosts, t)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert tcache.load(key, hosts) == t
    assert tcache.load(key, [5, -7, 5, -7]) is None  # same hosts, other rank map: miss
    assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")] == []
    with open(path, "w") as f:
        f.write("{corrupt")
    assert tcache.load(key, hosts) is None


# ------------------------------------------------------------------------------------- resolve (no group)
def test_resolve_without_process_group(tmp_path, monkeypatch):
    monkeypatch.delenv("STREAMATTN_TOPOLOGY", raising=False)
    t = load_machine("h100x8-2node")
    assert resolve_topology(topology=t) is t
    path = tmp_path / "t.json"
    t.save(path)
    r = resolve_topology(topology=str(path))
    assert r.replace(provenance="") == t.replace(provenance="")
    assert r.provenance.startswith("file:")
    assert resolve_topology(topology="2x4").node == (0, 0, 0, 0, 1, 1, 1, 1)
    assert resolve_topology(topology="l20x8-pcie") == load_machine("l20x8-pcie")
    monkeypatch.setenv("STREAMATTN_TOPOLOGY", str(path))
    assert resolve_topology().world_size == 16
    monkeypatch.setenv("STREAMATTN_TOPOLOGY", "4x2:inter=10Gbit/s")
    assert resolve_topology().inter.bandwidth_Bps == 1.25e9
    for bad, needle in [
        ("nonsense", "neither"),
        (str(tmp_path / "missing.json"), "not found"),
        ("2x4:intra=3Gb/s", "ambiguous"),
    ]:
        monkeypatch.setenv("STREAMATTN_TOPOLOGY", bad)
        with pytest.raises(ValueError, match=needle):
            resolve_topology()
    with pytest.raises(ValueError, match="must be a Topology"):
        resolve_topology(topology=42)


def test_probe_single_process(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("STREAMATTN_TOPOLOGY", raising=False)
    t = probe()
    assert t.world_size == 1 and t.node == (0,) and t.provenance == "probe"
    assert resolve_topology() == t
    assert os.listdir(tmp_path) == []  # nothing worth caching for one rank


# ------------------------------------------------------------------------------------- probe assembly
def test_build_from_gpu_facts_and_measurement():
    from streamattn.topology.measure import Measurement
    from streamattn.topology.probe import _apply_measurement, _build, _measure_pairs

    nvs = Link(LinkKind.NVSWITCH, 450e9, 3e-6, "spec:nvml 18 NVLink v4")
    pix = Link(LinkKind.PCIE_SWITCH, 25e9, 1e-5, "spec:nvml PIX")
    node = (0, 0, 0, 1, 1, 1)
    facts = []
    for r in range(6):
        peers = [p for p in range(6) if p != r and node[p] == node[r]]
        links = {str(p): (pix if {r, p} == {0, 1} else nvs).to_dict() for p in peers}
        if r == 5:
            links.pop("4")  # one-sided view: the other direction is used
        facts.append({"device": "NVIDIA H100 80GB HBM3", "links": links,
                      "ib": [["mlx5_0", 1, 50e9, "400 Gb/sec (4X NDR)", "ACTIVE", "InfiniBand"]],
                      "netif": None})
    t = _build(6, node, facts, "nccl", gpu=True)
    assert t.intra == nvs and t.overrides == {(0, 1): pix}
    assert t.inter.kind is LinkKind.INFINIBAND and t.inter.shared_by == 3
    assert t.peak_flops == 989e12 and t.device == "NVIDIA H100 80GB HBM3"
    intra_pair, inter_pair = _measure_pairs(node)
    assert intra_pair == (0, 1) and inter_pair == (0, 3)
    m = Measurement(20e9, 2e-5, "nccl-sendrecv 8MiB x5 median")
    t2 = _apply_measurement(t, intra_pair, m)
    assert t2.link(0, 1).source == "measured:nccl-sendrecv 8MiB x5 median"
    assert t2.link(0, 1).kind is LinkKind.PCIE_SWITCH and t2.link(1, 2) == nvs
    t3 = _apply_measurement(t2, inter_pair, m)
    assert t3.inter.is_measured and t3.inter.shared_by == 3 and t3.link(2, 5) == t3.inter
    # no GPU information at all: CPU processes share memory
    cpu = _build(2, (0, 0), [{"device": "cpu"}, {"device": "cpu"}], "gloo", gpu=False)
    assert cpu.intra.kind is LinkKind.SHM and cpu.peak_flops is None


def test_module_main(capsys):
    from streamattn.topology.__main__ import main

    assert main(["--list"]) == 0
    assert "h100x8-2node" in capsys.readouterr().out
    assert main(["2x2", "--json"]) == 0
    assert Topology.from_json(capsys.readouterr().out).world_size == 4
    assert main(["2x2:intra=1Gb/s"]) == 2
    assert "ambiguous" in capsys.readouterr().err
