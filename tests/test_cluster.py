"""Tests of the emulated cluster (streamattn/bench/cluster.py): namespaces + bridge + veths + tc tbf.

Needs root, iproute2 and tbf; skipped with the preflight's reason otherwise (never faked).
Assertions on speed are ratios or loose lower bounds, never absolute times.
"""
import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from streamattn.bench.cluster import (
    DEFAULT_MTU,
    ClusterUnavailable,
    EmulatedCluster,
    cleanup_stale,
    format_tc_rate,
    measure_throughput,
    parse_rate_bits,
    parse_seconds,
    preflight,
    tbf_burst_bytes,
    unavailable_reason,
)

PY = sys.executable


_REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(_REASON is not None,
                                 reason=f"emulated cluster unavailable: {_REASON}")


# ───────────────────────────────────────────────────────────── pure functions


@pytest.mark.parametrize("text,bits", [
    ("200mbit", 200e6), ("1gbit", 1e9), ("1Gbit/s", 1e9), ("500Mbit/s", 500e6), ("2GB/s", 16e9),
    ("1.5 gbit", 1.5e9), ("64kibit", 65536.0),
    ("10MiB/s", 10 * 2**20 * 8), ("1e9", 1e9), ("1e9bit", 1e9), (3e8, 3e8), (1000, 1000.0),
])
def test_parse_rate_bits(text, bits):
    assert parse_rate_bits(text) == pytest.approx(bits)


@pytest.mark.parametrize("bad", ["", "fast", "10 furlongs", "-5mbit", "0gbit", "1xbit",
                                 "100Mbps", "2GBps", "1Gb/s"])
def test_parse_rate_bits_rejects(bad):
    """Ambiguous units (tc reads mbps as megabytes, most people as megabits) are refused here as
    in the topology specs: the bench and the specs share one parser."""
    with pytest.raises(ValueError):
        parse_rate_bits(bad)


def test_tc_syntax_and_burst():
    assert format_tc_rate(parse_rate_bits("200mbit")) == "200000000bit"
    assert format_tc_rate(parse_rate_bits("2GB/s")) == "16000000000bit"
    assert parse_seconds("5ms") == pytest.approx(0.005)
    assert parse_seconds(0.1) == pytest.approx(0.1)
    # one 4 ms tick at the rate, never less than a GSO super-packet or two lo MTUs
    assert tbf_burst_bytes(1e9) == 500_000
    assert tbf_burst_bytes(1e6) >= 65536
    assert tbf_burst_bytes(1e6, mtu=65536) >= 2 * 65536


def test_bad_shape_rejected():
    with pytest.raises(ValueError):
        EmulatedCluster(0, 1)
    with pytest.raises(ValueError):
        EmulatedCluster(101, 1)
    with pytest.raises(ValueError):
        EmulatedCluster(2, 1, inter_bw="quick")
    for bad_mtu in (0, 575, 65536, 1500.0, "9000", True):
        with pytest.raises(ValueError, match="mtu"):
            EmulatedCluster(2, 1, mtu=bad_mtu)
    for bad_cc in ("", "Cubic", "cubic; reboot", "../x", 3, "inherit"):
        with pytest.raises(ValueError, match="congestion_control"):
            EmulatedCluster(2, 1, congestion_control=bad_cc)
    from streamattn.bench.cluster import parse_congestion_control

    assert parse_congestion_control(None) == "default" and parse_congestion_control("inherit") is None
    assert parse_congestion_control("reno") == "reno"
    for bad in ("a b", "default"):
        with pytest.raises(ValueError, match="congestion-control"):
            parse_congestion_control(bad)


# ──────────────────────────────────────────────────────────────────── helpers


def _system_state():
    run = lambda *a: subprocess.run(list(a), capture_output=True, text=True).stdout  # noqa: E731
    return run("ip", "netns", "list") + run("ip", "link") + run("tc", "qdisc", "show")


def _leftovers(pid, token):
    """Lines of `ip netns list`, `ip link`, `tc qdisc show` naming this cluster."""
    marks = (f"streamattn-{pid}-{token}", f"{pid:06x}{token}")
    return [line for line in _system_state().splitlines() if any(m in line for m in marks)]


def _dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


LAUNCHER = textwrap.dedent(r"""
    import json, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    from streamattn.bench.cluster import EmulatedCluster
    with EmulatedCluster(2, 2, inter_bw="200mbit") as c:
        child = c.popen(1, ["sleep", "600"])
        print(json.dumps({"pid": c.pid, "token": c.token, "child": child.pid,
                          "netns": c.netns}), flush=True)
        time.sleep(120)
""")


def _start_launcher(tmp_path):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    p = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    line = p.stdout.readline()
    if not line:
        p.wait(timeout=10)
        pytest.fail(f"launcher did not come up: {p.stderr.read()}")
    info = json.loads(line)
    assert _leftovers(info["pid"], info["token"]), "launcher's cluster is not visible"
    assert not _dead(info["child"])
    return p, info


# ──────────────────────────────────────────────────────────── the real thing


@needs_netns
def test_2x2_up_shaped_and_torn_down():
    with EmulatedCluster(2, 2, inter_bw="200mbit", intra_bw="1gbit") as c:
        pid, token = c.pid, c.token
        state = _system_state()
        for k in range(2):
            assert c.netns[k] in state
            assert c.host_ifnames[k] in state
            inner = subprocess.run(["tc", "-n", c.netns[k], "qdisc", "show"],
                                   capture_output=True, text=True).stdout
            assert f"dev {c.ifnames[k]}" in inner and "tbf" in inner and "200Mbit" in inner
            assert "dev lo" in inner and "1Gbit" in inner
        host = subprocess.run(["tc", "qdisc", "show", "dev", c.host_ifnames[0]],
                              capture_output=True, text=True).stdout
        assert "tbf" in host and "200Mbit" in host
        # jumbo frames by default, on both ends of every veth, and in the probe cache's key
        link = subprocess.run(["ip", "-n", c.netns[1], "link", "show", c.ifnames[1]],
                              capture_output=True, text=True).stdout
        assert f"mtu {DEFAULT_MTU} " in link and DEFAULT_MTU == 9000
        assert f"mtu {DEFAULT_MTU} " in subprocess.run(["ip", "link", "show", c.host_ifnames[1]],
                                                       capture_output=True, text=True).stdout
        assert c.links.endswith(f",mtu={DEFAULT_MTU},tcp=cubic") and c.tcp_in_use == "cubic"
        # TCP congestion control pinned to cubic in every node, whatever the host's default
        # (where the host allows a namespace cubic, as this test assumes)
        assert [_node_cc(ns) for ns in c.netns] == ["cubic", "cubic"]
        assert c.master_addr.startswith("198.1") and c.node_ip(1).endswith(".11")
        r3 = c.rank_env(3)
        assert (r3.node, r3.local_rank, r3.ifname) == (1, 1, c.ifnames[1])
        assert r3.env["GLOO_SOCKET_IFNAME"] == c.ifnames[1] and r3.env["WORLD_SIZE"] == "4"
        slow = measure_throughput(c, 0, 1, seconds=1.5)
    assert not _leftovers(pid, token)

    with EmulatedCluster(2, 1, inter_bw="1gbit") as c:
        fast = measure_throughput(c, 1, 0, seconds=1.5)
        pid, token = c.pid, c.token
    assert not _leftovers(pid, token)

    print(f"\n200mbit link: {slow / 1e6:.1f} Mbit/s; 1gbit link: {fast / 1e6:.1f} Mbit/s")
    assert 0.60 <= slow / 200e6 <= 1.05, slow
    assert fast / slow > 3.0, (slow, fast)


@needs_netns
def test_tcpstore_at_master_addr_reachable_from_namespace():
    from datetime import timedelta

    import torch.distributed as dist

    with EmulatedCluster(1, 1, inter_bw="1gbit") as c:
        store = dist.TCPStore(c.master_addr, 0, None, True, timedelta(seconds=30),
                              wait_for_workers=False)
        store.set("greeting", "hello from the root namespace")
        code = ("import sys, datetime, torch.distributed as d;"
                "s = d.TCPStore(sys.argv[1], int(sys.argv[2]), None, False,"
                " datetime.timedelta(seconds=20));"
                "s.set('reply', 'hi from ' + sys.argv[3]); print(s.get('greeting').decode())")
        p = c.popen(0, [PY, "-c", code, c.master_addr, str(store.port), c.netns[0]],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "hello from the root namespace"
        assert store.get("reply").decode() == f"hi from {c.netns[0]}"
        del store


@needs_netns
def test_teardown_after_exception_kills_children():
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(2, 1, inter_bw="200mbit") as c:
            pid, token = c.pid, c.token
            child = c.popen(0, ["sleep", "600"])
            raise RuntimeError("boom")
    assert not _leftovers(pid, token)
    assert _dead(child.pid)
    with pytest.raises(RuntimeError):
        c.popen(0, ["true"])


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_teardown_on_signal_to_launcher(tmp_path, sig):
    p, info = _start_launcher(tmp_path)
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode != 0
    assert not _leftovers(info["pid"], info["token"])
    assert _dead(info["child"])


@needs_netns
def test_cleanup_stale_after_kill_9(tmp_path):
    p, info = _start_launcher(tmp_path)
    p.kill()
    p.wait(timeout=10)
    time.sleep(0.1)
    assert _leftovers(info["pid"], info["token"]), "kill -9 should leave the cluster behind"
    removed = cleanup_stale()
    assert set(info["netns"]) <= set(removed)
    assert not _leftovers(info["pid"], info["token"])
    assert _dead(info["child"])  # processes left inside the namespaces are killed too


@needs_netns
def test_live_cluster_is_not_stale():
    with EmulatedCluster(1, 1) as c:
        assert not any(c.token in name for name in cleanup_stale())
        assert c.netns[0] in _system_state()


def _node_cc(ns):
    return subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv4/tcp_congestion_control"],
                          capture_output=True, text=True).stdout.strip()


@needs_netns
def test_congestion_control_named_inherited_and_unknown():
    """A named algorithm is what every node runs (reno: always built in and allowed, and not a
    host's default, so the check can fail where the host runs cubic); None leaves what a new
    namespace inherits, recorded as what it is; a name the kernel does not have is refused,
    saying so, and nothing is left behind."""
    with EmulatedCluster(2, 1, congestion_control="reno") as c:
        assert [_node_cc(ns) for ns in c.netns] == ["reno", "reno"]
        assert c.tcp_in_use == "reno" and c.links.endswith(",tcp=reno")
    with EmulatedCluster(1, 1, congestion_control=None) as c:
        got = _node_cc(c.netns[0])
        assert got and c.tcp_in_use == got and c.links.endswith(f",tcp={got}")
    c = EmulatedCluster(1, 1, congestion_control="nosuchcc")
    with pytest.raises(ClusterUnavailable, match="'nosuchcc'.*not in this kernel.*allowed"):
        c.start()
    assert not _leftovers(c.pid, c.token)


@needs_netns
def test_atexit_teardown_without_with(tmp_path):
    script = tmp_path / "noclose.py"
    script.write_text(textwrap.dedent(r"""
        import json
        from streamattn.bench.cluster import EmulatedCluster
        c = EmulatedCluster(2, 1).start()   # never closed explicitly: atexit must do it
        child = c.popen(0, ["sleep", "600"])
        print(json.dumps({"pid": c.pid, "token": c.token, "child": child.pid}), flush=True)
    """))
    p = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert not _leftovers(info["pid"], info["token"])
    assert _dead(info["child"])


@needs_netns
def test_concurrent_clusters_get_distinct_subnets():
    with EmulatedCluster(1, 1) as a, EmulatedCluster(2, 1, inter_bw="500mbit") as b:
        assert a.subnet != b.subnet
        assert a.subnet.subnet_of(__import__("ipaddress").ip_network("198.18.0.0/15"))
        assert b.subnet.subnet_of(__import__("ipaddress").ip_network("198.18.0.0/15"))
        assert measure_throughput(b, 0, 1, seconds=0.5) > 0.3 * 500e6
        with pytest.raises(TypeError):
            b.popen(0, "echo no shell strings")
        ids = [(a.pid, a.token), (b.pid, b.token)]
    assert not any(_leftovers(*i) for i in ids)


@needs_netns
def test_inter_latency_needs_netem():
    """netem is absent from some kernels: asking for latency must fail loudly, not run without it."""
    try:
        preflight(need_netem=True)
    except ClusterUnavailable as e:
        assert "netem" in e.reason
        with pytest.raises(ClusterUnavailable, match="netem"):
            EmulatedCluster(2, 1, inter_latency="2ms").start()
    else:
        with EmulatedCluster(2, 1, inter_latency="2ms") as c:
            out = subprocess.run(["tc", "qdisc", "show", "dev", c.host_ifnames[0]],
                                 capture_output=True, text=True).stdout
            assert "netem" in out and "tbf" in out


WORKER = textwrap.dedent(r"""
    import datetime, json, os, sys, time
    import torch, torch.distributed as dist
    rank = int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(sys.argv[1]), None, False,
                          datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    x = torch.full((4 * 1024 * 1024,), float(rank + 1))  # 16 MiB of float32
    times = []
    for src in (0, 1):
        dist.barrier()
        t0 = time.perf_counter()
        if rank == src:
            dist.send(x, 1 - src)
        else:
            dist.recv(x, src)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    print(json.dumps({"rank": rank, "times": times, "value": x[::65536].tolist(),
                      "ifname": os.environ["GLOO_SOCKET_IFNAME"]}), flush=True)
    dist.destroy_process_group()
""")


@needs_netns
def test_gloo_send_recv_across_shaped_link(tmp_path):
    from datetime import timedelta

    import torch.distributed as dist

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with EmulatedCluster(2, 1, inter_bw="200mbit") as c:
        store = dist.TCPStore(c.master_addr, 0, None, True, timedelta(seconds=60),
                              wait_for_workers=False)
        procs = [c.popen_rank(r, [PY, str(script), str(store.port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
        results = []
        for p in procs:
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        ifnames = list(c.ifnames)
        del store
    r0, r1 = results
    assert (r0["ifname"], r1["ifname"]) == tuple(ifnames)
    # rank 0's 1.0s went to rank 1, then came back: both end with 1.0
    assert set(r0["value"]) == {1.0} and set(r1["value"]) == {1.0}
    recv_0to1, recv_1to0 = r1["times"][0], r0["times"][1]
    ideal = 16 * 2**20 * 8 / 200e6  # 0.67 s at the line rate
    print(f"\ngloo 16 MiB over 200mbit: {recv_0to1:.2f} s, {recv_1to0:.2f} s (ideal {ideal:.2f} s)")
    assert recv_0to1 >= 0.5 and recv_1to0 >= 0.5, (recv_0to1, recv_1to0)
