"""The nvshmem heap without a GPU.

What IS tested here:
  - importing streamattn.transport.nvshmem needs neither CUDA nor nvshmem4py, and constructing a
    heap raises a clear RuntimeError on a CPU box (and when nvshmem4py is missing);
  - the real nvshmem4py (when installed): the names and signatures NvshmemHeap calls exist, the
    unique id survives the hex round trip, and the non-owning cuda.core Buffer views the heap builds
    pass nvshmem.core's own argument validation (`rma._get_buffers`);
  - NvshmemHeap under the real OneSidedTransport protocol (chunked put/signal mailbox with credits,
    the bootstrap all-gather of the 272-character uid text) against a FAKE `nvshmem.core` that
    emulates the API over CPU memory, with 2 or 3 PEs as threads of one process.
What is NOT tested (needs GPUs; streamattn.bench.gpu_check covers it on the first GPU box): real NVSHMEM
init, symmetric allocation, on-stream ordering of put_signal / signal_op / signal_wait against
torch's stream, signal_fetch visibility across GPUs, the csrc/ extension path. The fake executes
every operation synchronously in program order, so it cannot find stream-ordering bugs.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import inspect
import subprocess
import sys
import threading
import types
from collections import defaultdict, deque

import numpy as np
import pytest
import torch

import streamattn.transport.nvshmem as nv

HAVE_NVSHMEM4PY = importlib.util.find_spec("nvshmem") is not None


# ---------------------------------------------------------------------------------------------
# import guard and constructor errors
# ---------------------------------------------------------------------------------------------
def test_import_needs_no_cuda_or_nvshmem4py():
    code = ("import sys; sys.modules['nvshmem'] = None; sys.modules['nvshmem.core'] = None\n"
            "import streamattn.transport.nvshmem as nv\n"
            "ok, why = nv.available(); assert not ok, why; print(why)\n"
            "from streamattn.transport import make_transport, NAMES; assert 'nvshmem' in NAMES\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nvshmem4py not installed" in out.stdout


def test_constructor_without_nvshmem4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvshmem", None)
    monkeypatch.setitem(sys.modules, "nvshmem.core", None)
    with pytest.raises(RuntimeError, match="nvshmem4py not installed.*nvshmem4py-cu13==0.4.1"):
        nv.NvshmemHeap(0, 2, 4096, 4, None, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-box error")
@pytest.mark.skipif(not HAVE_NVSHMEM4PY, reason="nvshmem4py not installed")
def test_constructor_on_cpu_box():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        nv.NvshmemHeap(0, 2, 4096, 4, None, None)


# ---------------------------------------------------------------------------------------------
# the real nvshmem4py API, as far as a CPU box can check it
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_NVSHMEM4PY, reason="nvshmem4py not installed")
def test_real_api_names_and_signatures():
    core = importlib.import_module("nvshmem.core")
    want = {
        "init": ["device", "uid", "rank", "nranks", "mpi_comm", "initializer_method"],
        "get_unique_id": ["empty"],
        "tensor": ["shape", "dtype", "release", "morder", "except_on_del"],
        "free_tensor": ["tensor"],
        "put_signal": ["dst", "src", "signal_var", "signal_val", "signal_op", "remote_pe", "stream"],
        "put": ["dst", "src", "remote_pe", "stream"],
        "signal_op": ["signal_var", "signal_val", "signal_op", "remote_pe", "stream"],
        "signal_wait": ["signal_var", "signal_val", "signal_op", "stream"],
        "signal_fetch": ["signal_var"],
        "quiet": ["stream"],
        "my_pe": [], "n_pes": [], "finalize": [],
    }
    for name, params in want.items():
        assert list(inspect.signature(getattr(core, name)).parameters) == params, name
    assert int(core.SignalOp.SIGNAL_SET) == 9 and int(core.ComparisonType.CMP_GE) == 5
    assert int(core.Teams.TEAM_NODE) == 2
    assert importlib.metadata.version("nvshmem4py-cu13") == nv.NVSHMEM4PY_PIN.split("==")[1]


@pytest.mark.skipif(not HAVE_NVSHMEM4PY, reason="nvshmem4py not installed")
def test_real_uid_hex_round_trip():
    core = importlib.import_module("nvshmem.core")
    uid = core.get_unique_id()  # host library only; works without a GPU
    text = nv._uid_to_hex(uid)
    assert len(text) == 2 * nv.UID_BYTES
    assert nv._uid_from_hex(core, text) == uid
    msg = nv._encode("U", 0, 8, text)
    assert len(msg) == nv._TEXT_LEN and nv._decode(msg, 0) == ("U", 0, 8, text)
    with pytest.raises(RuntimeError, match="malformed bootstrap"):
        nv._decode("X" + msg[1:], 3)


@pytest.mark.skipif(not HAVE_NVSHMEM4PY, reason="nvshmem4py not installed")
def test_real_buffer_views_pass_nvshmem_validation():
    from nvshmem.core.rma import _get_buffers

    Buffer = nv._buffer_cls()
    t = torch.zeros(256, dtype=torch.uint8)
    dst = Buffer.from_handle(t.data_ptr() + 64, 32)  # non-owning view at an offset
    src = Buffer.from_handle(t.data_ptr(), 32)
    assert _get_buffers(dst, src) == (dst, src)
    assert dst.handle == t.data_ptr() + 64 and dst.size == 32


# ---------------------------------------------------------------------------------------------
# a fake nvshmem.core over CPU memory, PEs are threads
# ---------------------------------------------------------------------------------------------
class FakeBuffer:
    def __init__(self, ptr, size):
        self.handle, self.size = int(ptr), int(size)

    @staticmethod
    def from_handle(ptr, size, mr=None):
        return FakeBuffer(ptr, size)


class FakeWorld:
    """State shared by the fake PEs: symmetric allocations by (PE, allocation index), op log."""

    def __init__(self, npes):
        self.npes = npes
        self.allocs = defaultdict(list)  # pe -> [tensor]
        self.ops = defaultdict(int)
        self.inits = {}  # pe -> uid hex
        self.lock = threading.Lock()
        self.tls = threading.local()

    # symmetric address translation: a local address of PE `me` -> the same object on PE `pe`
    def translate(self, me, ptr, nbytes, pe):
        for i, t in enumerate(self.allocs[me]):
            base = t.data_ptr()
            if base <= ptr and ptr + nbytes <= base + t.numel():
                peer_t = self.allocs[pe][i]
                assert peer_t.numel() == t.numel(), "asymmetric allocation"
                return peer_t.data_ptr() + (ptr - base)
        raise AssertionError(f"PE {me}: address {ptr:#x}+{nbytes} is not in the symmetric heap")

    def module(self):
        world = self

        class SignalOp:
            SIGNAL_SET, SIGNAL_ADD = 9, 10

        class ComparisonType:
            CMP_GE = 5

        class UID:
            def __init__(self):
                self._data = np.zeros(nv.UID_BYTES, dtype=np.uint8)

            def __eq__(self, other):
                return bytes(self._data) == bytes(other._data)

        def me():
            return world.tls.pe

        def get_unique_id(empty=False):
            u = UID()
            if not empty:
                u._data[:] = np.frombuffer(np.random.default_rng().bytes(nv.UID_BYTES), np.uint8)
            return u

        def init(device=None, uid=None, rank=None, nranks=None, mpi_comm=None, initializer_method=""):
            assert initializer_method == "uid" and nranks == world.npes
            assert device.index == 0
            world.tls.pe = rank
            with world.lock:
                world.inits[rank] = bytes(uid._data).hex()
                world.ops["init"] += 1

        def tensor(shape, dtype=torch.float32, release=False, morder="C", except_on_del=True):
            t = torch.zeros(*shape, dtype=dtype)
            with world.lock:
                world.allocs[me()].append(t)
            return t

        def free_tensor(t):
            with world.lock:
                world.ops["free"] += 1

        def _check_stream(stream):
            assert stream == "fake-stream", stream

        def put(dst, src, remote_pe=-1, stream=None):
            _check_stream(stream)
            n = min(dst.size, src.size)
            ctypes.memmove(world.translate(me(), dst.handle, n, remote_pe), src.handle, n)
            world.ops["put"] += 1

        def _store(sig, value, pe):
            addr = world.translate(me(), sig.handle, 8, pe)
            ctypes.c_int64.from_address(addr).value = value

        def put_signal(dst, src, signal_var, signal_val, signal_op, remote_pe=-1, stream=None):
            _check_stream(stream)
            assert signal_op == SignalOp.SIGNAL_SET
            n = min(dst.size, src.size)
            ctypes.memmove(world.translate(me(), dst.handle, n, remote_pe), src.handle, n)
            _store(signal_var, signal_val, remote_pe)  # after the data, as NVSHMEM guarantees
            world.ops["put_signal"] += 1
            world.ops["put_signal_bytes"] += n

        def signal_op(signal_var, signal_val, signal_op, remote_pe=-1, stream=None):
            _check_stream(stream)
            _store(signal_var, signal_val, remote_pe)
            world.ops["signal_op"] += 1

        def signal_fetch(signal_var):
            world.translate(me(), signal_var.handle, 8, me())  # must be symmetric memory
            world.ops["signal_fetch"] += 1
            return ctypes.c_int64.from_address(signal_var.handle).value

        def signal_wait(signal_var, signal_val, signal_op, stream=None):
            _check_stream(stream)
            assert signal_op == ComparisonType.CMP_GE
            # The heap only queues waits for values it has already observed.
            assert ctypes.c_int64.from_address(signal_var.handle).value >= signal_val
            world.ops["signal_wait"] += 1

        def quiet(stream=None):
            _check_stream(stream)
            world.ops["quiet"] += 1

        mod = types.ModuleType("nvshmem.core")
        for name, obj in dict(locals()).items():
            if not name.startswith("_") and name not in ("world", "me", "mod", "UID"):
                setattr(mod, name, obj)
        mod.my_pe, mod.n_pes = lambda: world.tls.pe, lambda: world.npes
        return mod


from streamattn.transport.base import ByteCounters, Transport  # noqa: E402


class FakeBase(Transport):
    """The two-sided transport OneSidedTransport bootstraps over: an in-process mailbox."""

    boxes: dict
    cv: threading.Condition

    def __init__(self, rank, size, boxes, cv):
        self.rank, self.size, self.device = rank, size, torch.device("cpu")
        self.node_of = [0] * size
        self.boxes, self.cv = boxes, cv
        self.counters = ByteCounters()

    def exchange(self, sends, recvs, tag, count=True):
        with self.cv:
            for p, t in sends:
                self.boxes[(self.rank, p, tag)].append(t.clone())
            self.cv.notify_all()
        base = self

        class P:
            def wait(self_inner):
                with base.cv:
                    for p, t in recvs:
                        q = base.boxes[(p, base.rank, tag)]
                        assert base.cv.wait_for(lambda: len(q) > 0, timeout=30), "fake base timed out"
                        t.copy_(q.popleft())

        return P()

    def describe_peer(self, p):
        return f"rank {p}"

    def report_failure(self, *a):
        pass

    def reported_failure(self):
        return None, ""

    def begin_call(self):
        pass


@pytest.fixture
def fake(monkeypatch):
    """Patch in the fake core and per-thread process state; returns a runner for n PE threads."""

    def run(npes, fn):
        world = FakeWorld(npes)
        mod = world.module()
        monkeypatch.setitem(sys.modules, "nvshmem.core", mod)
        monkeypatch.setattr(nv, "_cuda_available", lambda: True)
        monkeypatch.setattr(nv, "_current_device", lambda: torch.device("cpu", 0))
        monkeypatch.setattr(nv, "_synchronize", lambda d: None)
        monkeypatch.setattr(nv, "_current_stream", lambda d: "fake-stream")
        monkeypatch.setattr(nv, "_buffer_cls", lambda: FakeBuffer)
        monkeypatch.setattr(nv, "_device_cls", lambda: (lambda i: types.SimpleNamespace(
            index=i, set_current=lambda: None)))
        states = threading.local()

        def proc_state():
            if not hasattr(states, "s"):
                states.s = {"initialised": False, "uid_hex": None, "pe": None, "npes": None, "ext": None}
            return states.s

        monkeypatch.setattr(nv, "_proc_state", proc_state)
        boxes, cv = defaultdict(deque), threading.Condition()
        results, errors = [None] * npes, []

        def body(r):
            world.tls.pe = r
            try:
                results[r] = fn(r, FakeBase(r, npes, boxes, cv), world)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append((r, exc))

        threads = [threading.Thread(target=body, args=(r,)) for r in range(npes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a fake PE hung"
        if errors:
            raise errors[0][1]
        return results, world

    return run


def _rounds(rank, base, world, *, rounds, slot_bytes=4096, heaps=1):
    from streamattn.transport.onesided import OneSidedTransport

    ts = [OneSidedTransport(base, nv.NvshmemHeap, slot_bytes=slot_bytes) for _ in range(heaps)]
    n = base.size
    sizes = [0, 1, 7, 1024, slot_bytes // 8, slot_bytes // 8 + 3, 3 * slot_bytes // 8 + 5]
    checked = 0
    for i in range(rounds):
        pend, expect = [], []
        for gi, t in enumerate(ts):
            k = sizes[(i + gi) % len(sizes)]
            sends, recvs = [], []
            for p in range(n):
                if p == rank:
                    continue
                sends.append((p, torch.full((k,), float(((gi * 7 + i) * 16 + rank) * 16 + p),
                                            dtype=torch.float64)))
                buf = torch.empty(k, dtype=torch.float64)
                recvs.append((p, buf))
                expect.append((buf, float(((gi * 7 + i) * 16 + p) * 16 + rank)))
            pend.append(t.exchange(sends, recvs, tag=5))
        for p in pend[::-1]:
            p.wait()
        for buf, val in expect:
            assert not buf.numel() or bool((buf == val).all()), f"round {i}: {buf[:3]} != {val}"
            checked += 1
    for t in ts:
        t.heap.quiet()
    pes = ts[0].heap.pes
    for t in ts:
        t.close()
    return {"checked": checked, "sent": sum(sum(t.sent) for t in ts), "pes": pes,
            "digest": nv.uid_digest()}


@pytest.mark.parametrize("npes", [2, 3])
def test_protocol_over_fake_nvshmem(fake, npes):
    rounds = 150
    results, world = fake(npes, lambda r, b, w: _rounds(r, b, w, rounds=rounds, heaps=2))
    assert all(res["checked"] == rounds * 2 * (npes - 1) for res in results)
    # NVSHMEM initialised once per PE, all with member 0's unique id; the second heap reused it.
    assert world.ops["init"] == npes and len(set(world.inits.values())) == 1
    assert len({res["digest"] for res in results}) == 1 and results[0]["digest"]
    assert all(res["pes"] == list(range(npes)) for res in results)
    # Every data chunk went as ONE put_signal; credits as signal_op; no stray plain puts.
    chunks = sum(res["sent"] for res in results)
    assert world.ops["put_signal"] == chunks > 0
    assert world.ops["signal_op"] == chunks  # one credit per chunk received
    assert world.ops["put"] == 0
    assert world.ops["signal_wait"] >= chunks  # acquire queued for each observed data signal
    assert world.ops["free"] == 2 * npes  # close() freed both heaps on every PE
    assert all(len(world.allocs[p]) == 2 for p in range(npes))


def test_deferred_put_flushes_and_bounds(fake):
    """Heap-level semantics: put without a signal is flushed by quiet() (put + quiet) and by a
    second put to the same peer; a put outside the data area is refused at put time."""

    def fn(rank, base, world):

        def gather(text, pid):
            from streamattn.tags import SHM_BOOTSTRAP
            from streamattn.transport.node_heap import NodeHeapTransport

            return NodeHeapTransport.all_gather_text(types.SimpleNamespace(
                members=list(range(base.size)), rank=rank, base=base, bootstrap_tag=SHM_BOOTSTRAP),
                text, pid)

        heap = nv.NvshmemHeap(rank, base.size, 1024, 2 * base.size, gather, lambda: gather("b", 0))
        peer = 1 - rank
        heap.put(peer, torch.full((16,), rank + 1, dtype=torch.uint8), 100)
        heap.put(peer, torch.full((8,), rank + 11, dtype=torch.uint8), 200)  # flushes the first
        heap.quiet()  # flushes the second
        with pytest.raises(ValueError, match="outside"):
            heap.put(peer, torch.zeros(64, dtype=torch.uint8), 1000)
        with pytest.raises(ValueError, match="contiguous"):
            heap.put(peer, torch.zeros(4, 4, dtype=torch.uint8).t(), 0)
        gather("sync", 0)
        got = (heap.local(100, 16).tolist(), heap.local(200, 8).tolist())
        assert heap.peer_alive(peer) is True
        gather("sync2", 0)
        heap.close()
        heap.close()  # idempotent
        return got

    results, world = fake(2, fn)
    assert results[0] == ([2] * 16, [12] * 8) and results[1] == ([1] * 16, [11] * 8)
    assert world.ops["put"] == 4 and world.ops["quiet"] >= 4 and world.ops["free"] == 2


def test_second_heap_with_other_members_refused(fake):
    """NVSHMEM is one world per process: a heap over different members raises, not hangs."""

    def fn(rank, base, world):
        from streamattn.transport.onesided import OneSidedTransport

        t = OneSidedTransport(base, nv.NvshmemHeap, slot_bytes=4096)
        if rank == 0:
            # a "group" of this PE alone: its state says 'initialised, world of 2'
            with pytest.raises(RuntimeError, match="not exactly that NVSHMEM world"):
                nv.NvshmemHeap(0, 1, 1024, 2, lambda text, pid: ([text], [pid]), lambda: None)
        return t.heap.pes

    results, _ = fake(2, fn)
    assert results == [[0, 1], [0, 1]]


def test_negative_control_dropped_put_is_caught(fake, monkeypatch):
    """The fake check can fail: a heap whose signal() forgets the deferred put (signal without
    data) must produce wrong payloads, not a pass."""
    real = nv.NvshmemHeap.signal

    def forgetful(self, peer, slot, value):
        self._pending[peer] = None
        return real(self, peer, slot, value)

    monkeypatch.setattr(nv.NvshmemHeap, "signal", forgetful)
    with pytest.raises(AssertionError, match="round"):
        fake(2, lambda r, b, w: _rounds(r, b, w, rounds=20))


# ---------------------------------------------------------------------------------------------
# nvshmem-device: NvshmemDeviceOps (the csrc/ ring-step kernels) over the fake core + a fake ext
# ---------------------------------------------------------------------------------------------
class FakeExt:
    """csrc/exchange.cu's ring_step / ring_wait / ring_release, executed at once over the fake
    symmetric memory (same argument lists as bindings.cpp; the device-side waits spin)."""

    def __init__(self, world):
        self.world = world
        self.calls = defaultdict(int)

    def _spin(self, cond):
        import time

        deadline = time.monotonic() + 30
        while not cond():
            assert time.monotonic() < deadline, "fake device wait hung"
            time.sleep(0)

    def ring_step(self, src, recv, slot_bytes, nslots, data_sig, ack_sig, step, peer, nblocks, stream):
        w, me = self.world, self.world.tls.pe
        assert stream == 1234 and src.dtype == torch.uint8 and src.numel() <= slot_bytes
        assert recv.numel() >= slot_bytes * nslots and data_sig.numel() >= nslots <= ack_sig.numel()
        slot = step % nslots
        if step >= nslots:
            self._spin(lambda: int(ack_sig[slot]) >= step - nslots + 1)
        n = src.numel()
        ctypes.memmove(w.translate(me, recv.data_ptr() + slot * slot_bytes, n, peer), src.data_ptr(), n)
        addr = w.translate(me, data_sig.data_ptr() + 8 * slot, 8, peer)
        with w.lock:  # NVSHMEM_SIGNAL_ADD per block
            ctypes.c_int64.from_address(addr).value += nblocks
        self.calls["ring_step"] += 1

    def ring_wait(self, data_sig, step, nslots, nblocks, stream):
        slot = step % nslots
        self._spin(lambda: int(data_sig[slot]) >= (step // nslots + 1) * nblocks)
        self.calls["ring_wait"] += 1

    def ring_release(self, ack_sig, step, nslots, peer, stream):
        w, me = self.world, self.world.tls.pe
        addr = w.translate(me, ack_sig.data_ptr() + 8 * (step % nslots), 8, peer)
        ctypes.c_int64.from_address(addr).value = step + 1
        self.calls["ring_release"] += 1


@pytest.mark.parametrize("npes", [2, 3])
def test_device_ops_over_fake_nvshmem(fake, monkeypatch, npes):
    from streamattn.transport import device

    exts = {}
    monkeypatch.setattr(device, "_stream_handle", lambda d: 1234)
    monkeypatch.setattr(device, "_record_event", lambda d: None)

    def ext(self, verbose=False):
        return exts.setdefault("x", FakeExt(self._world))

    monkeypatch.setattr(nv.NvshmemHeap, "extension", ext)
    monkeypatch.setattr(nv.NvshmemHeap, "_world", None, raising=False)

    def body(rank, base, world):
        nv.NvshmemHeap._world = world
        t = device.StreamOrderedTransport(base, nv.NvshmemHeap, device.NvshmemDeviceOps, slot_bytes=4096)
        n = base.size
        for i, k in enumerate([0, 3, 1000, 512, 513, 1537, 7]):  # float64 elements: up to 3 chunks
            sends = [(p, torch.full((k,), float(i * 100 + rank * 10 + p), dtype=torch.float64))
                     for p in range(n) if p != rank]
            bufs = {p: torch.empty(k, dtype=torch.float64) for p in range(n) if p != rank}
            t.exchange(sends, list(bufs.items()), tag=9).wait()
            for p, b in bufs.items():
                assert not k or bool((b == float(i * 100 + p * 10 + rank)).all()), (i, p, b[:3])
        steps = sum(t.steps_out)
        t.close()
        return steps

    results, world = fake(npes, body)
    assert all(r > 0 for r in results)
    calls = exts["x"].calls
    assert calls["ring_step"] == calls["ring_wait"] == calls["ring_release"] == sum(results)


def test_fake_ext_matches_the_bindings():
    """FakeExt (what NvshmemDeviceOps is tested against) takes exactly the py::arg lists that
    csrc/bindings.cpp declares, in order."""
    import os
    import re

    src = open(os.path.join(os.path.dirname(__file__), "..", "csrc", "bindings.cpp")).read()
    for name in ("ring_step", "ring_wait", "ring_release"):
        m = re.search(r'm\.def\("%s",(.*?)"[A-Z]' % name, src, re.S)
        args = re.findall(r'py::arg\("(\w+)"\)', m.group(1))
        assert list(inspect.signature(getattr(FakeExt, name)).parameters)[1:] == args, name
