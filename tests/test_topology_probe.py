"""The probe on this machine with real gloo process groups (2 and 4 CPU processes)."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

# Runs in every worker: argv = rank, world_size, port, scenario. Prints "RESULT <json>" lines.
WORKER = r"""
import datetime, json, os, sys
import torch
torch.set_num_threads(1)
import torch.distributed as dist
rank, ws, port, scenario = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=ws,
                        timeout=datetime.timedelta(seconds=60))
from streamattn.topology import probe, resolve_topology

def emit(step, value):
    print("RESULT " + json.dumps({"rank": rank, "step": step, "value": value}), flush=True)

def attempt(step, fn):
    try:
        emit(step, {"ok": fn().to_json()})
    except ValueError as e:
        emit(step, {"error": str(e)})

if scenario == "cpu":
    attempt("first", resolve_topology)            # probe, cache miss
    attempt("second", resolve_topology)           # cache hit
    attempt("nocache", lambda: probe(measure=False, cache=False))
    os.environ["STREAMATTN_TOPOLOGY"] = "1x2"
    attempt("spec_ok", resolve_topology)
    os.environ["STREAMATTN_TOPOLOGY"] = "2x4"
    attempt("spec_size", resolve_topology)        # 8 ranks described, 2 running
    os.environ["STREAMATTN_TOPOLOGY"] = "1x2" if rank == 0 else "2x1"
    attempt("spec_differs", resolve_topology)     # ranks disagree: all must raise, none hang
    os.environ["STREAMATTN_TOPOLOGY"] = "2x2:intra=oops" if rank == 1 else "1x2"
    attempt("spec_bad_on_one", resolve_topology)
elif scenario == "hosts":
    attempt("probe", resolve_topology)            # STREAMATTN_HOST_ID fakes two hosts
    os.environ["STREAMATTN_TOPOLOGY"] = "2x2:inter=1Gbit/s,inter_lat=50us"
    attempt("spec", resolve_topology)
    del os.environ["STREAMATTN_TOPOLOGY"]
    sub = dist.new_group([1, 2, 3])               # group ranks 0,1,2 = global 1,2,3 (hosts B,A,B)
    if rank in (1, 2, 3):
        attempt("sub", lambda: probe(sub, cache=False))
dist.barrier()
dist.destroy_process_group()
"""


def run_workers(world_size, scenario, env_for_rank, timeout=120):
    """Spawn ``world_size`` gloo workers; return {step: [value of rank 0, rank 1, ...]}."""
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    procs = []
    try:
        for r in range(world_size):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, str(r), str(world_size), str(store.port), scenario],
                    env=env_for_rank(r),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"worker failed ({p.returncode}):\n{out}\n{err[-4000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = {}
    for out in outs:
        for line in out.splitlines():
            if line.startswith("RESULT "):
                rec = json.loads(line[len("RESULT "):])
                results.setdefault(rec["step"], [None] * world_size)[rec["rank"]] = rec["value"]
    return results


def base_env(tmp_path):
    env = dict(os.environ)
    for k in ("STREAMATTN_TOPOLOGY", "STREAMATTN_HOST_ID", "GLOO_SOCKET_IFNAME"):
        env.pop(k, None)
    env.update(
        STREAMATTN_CACHE_DIR=str(tmp_path / "cache"),
        STREAMATTN_PROBE_BYTES=str(1 << 20),
        STREAMATTN_PROBE_TIMEOUT="60",
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    return env


def same_on_every_rank(values):
    assert all(v == values[0] for v in values), values
    return values[0]


def topo_of(value):
    from streamattn.topology import Topology

    assert "ok" in value, value
    return Topology.from_json(value["ok"])


def test_probe_cpu_two_ranks(tmp_path):
    env = base_env(tmp_path)
    res = run_workers(2, "cpu", lambda r: env)
    from streamattn.topology import LinkKind

    # CPU fallback: one node, shared memory between its ranks, a measured bandwidth with units
    first = same_on_every_rank(res["first"])
    t = topo_of(first)
    assert t.world_size == 2 and t.node == (0, 0) and t.inter is None
    assert t.provenance == "probe" and t.device == "cpu"
    lk = t.link(0, 1)
    assert lk.kind is LinkKind.SHM
    assert lk.source.startswith("measured:gloo-sendrecv 1MiB x5 median")
    assert "ping-pong" in lk.source
    assert 1e6 < lk.bandwidth_Bps < 1e12  # bytes/s
    assert 0 < lk.latency_s < 1.0  # seconds
    assert json.loads(first["ok"])["intra"]["bandwidth_Bps"] == lk.bandwidth_Bps

    # cache: one file, mode 0600, reused by the second call with identical links on every rank
    cdir = tmp_path / "cache"
    files = [f for f in os.listdir(cdir) if f.endswith(".json")]
    assert len(files) == 1 and files[0].startswith("topology-")
    assert stat.S_IMODE(os.stat(cdir / files[0]).st_mode) == 0o600
    assert not [f for f in os.listdir(cdir) if f.endswith(".tmp")]
    t2 = topo_of(same_on_every_rank(res["second"]))
    assert t2.provenance.startswith("probe:cache ") and files[0] in t2.provenance
    assert t2.replace(provenance="probe") == t  # the same measured numbers, not re-measured

    # measure=False: declared SHM default, labelled as declared
    t3 = topo_of(same_on_every_rank(res["nocache"]))
    assert t3.link(0, 1).kind is LinkKind.SHM and t3.link(0, 1).source == "declared"
    assert t3.link(0, 1).bandwidth_Bps == 10e9

    t4 = topo_of(same_on_every_rank(res["spec_ok"]))
    assert t4.provenance == "spec:1x2" and t4.node == (0, 0)

    err = same_on_every_rank(res["spec_size"])["error"]
    assert "describes 8 ranks" in err and "has 2" in err and "STREAMATTN_TOPOLOGY" in err

    differs = res["spec_differs"]
    assert all("error" in v and "different topologies" in v["error"] for v in differs), differs

    bad = res["spec_bad_on_one"]
    assert "intra=oops" in bad[1]["error"] or "'oops'" in bad[1]["error"]
    assert "rank(s) [1]" in bad[0]["error"]


def test_probe_two_fake_hosts_interleaved_and_spec(tmp_path):
    env = base_env(tmp_path)
    # ranks 0,2 claim host A and ranks 1,3 host B: an interleaved rank -> node map
    res = run_workers(4, "hosts", lambda r: dict(env, STREAMATTN_HOST_ID=f"host-{'AB'[r % 2]}"))
    from streamattn.topology import LinkKind

    t = topo_of(same_on_every_rank(res["probe"]))
    assert t.node == (0, 1, 0, 1) and not t.is_consecutive
    assert t.ranks_of_node(0) == [0, 2] and t.ranks_per_node == 2
    intra, inter = t.link(0, 2), t.link(0, 1)
    assert intra.kind is LinkKind.SHM and inter.kind is LinkKind.ETHERNET
    assert intra.is_measured and "ranks 0<->2" in intra.source
    assert inter.is_measured and "ranks 0<->1" in inter.source
    assert inter.shared_by == 2  # one socket interface per node
    assert t.link(1, 3) == intra  # same link class on the other node

    s = topo_of(same_on_every_rank(res["spec"]))
    assert s.node == (0, 0, 1, 1)  # the spec assigns consecutive ranks, whatever the hosts
    assert s.link(0, 1).kind is LinkKind.SHM and s.link(1, 2).kind is LinkKind.ETHERNET
    assert s.link(1, 2).bandwidth_Bps == 125e6 and s.link(1, 2).latency_s == 50e-6

    # a sub-group: group ranks are not global ranks (send/recv and broadcast must map them)
    assert res["sub"][0] is None
    sub = topo_of(same_on_every_rank(res["sub"][1:]))
    assert sub.node == (0, 1, 0)  # global 1 (B), 2 (A), 3 (B)
    assert "ranks 0<->2" in sub.link(0, 2).source and sub.link(0, 2).kind is LinkKind.SHM
    assert "ranks 0<->1" in sub.link(0, 1).source and sub.link(0, 1).kind is LinkKind.ETHERNET
