"""`nvshmem`: the symmetric heap of the one-sided protocol on GPUs, over nvshmem4py (`nvshmem.core`).

Written against nvshmem4py-cu13 == 0.4.1 (NVSHMEM 3.8.0 via nvidia-nvshmem-cu13, the same NVSHMEM
csrc/ compiles against). Every nvshmem.core name used here was read from that wheel's source
(nvshmem/core/{init_fini,memory,rma,collective,direct,interop/torch,nvshmem_types}.py):

    get_unique_id(empty=False) -> UniqueID      (128-byte struct; bytes via uid._data.view(uint8))
    init(device=cuda.core.Device, uid=, rank=, nranks=, initializer_method="uid")
    my_pe(), n_pes(), team_n_pes(Teams.TEAM_NODE), init_status()
    tensor(shape, dtype=torch.uint8, except_on_del=False)   symmetric torch tensor (nvshmem_malloc,
                                                            COLLECTIVE over every PE, same order)
    free_tensor(t)                                          collective nvshmem_free
    put_signal(dst, src, signal_var, signal_val, SignalOp.SIGNAL_SET, remote_pe, stream)
                                                            nvshmemx_putmem_signal_on_stream
    put(dst, src, remote_pe, stream)                        nvshmemx_putmem_on_stream
    signal_op(signal_var, value, SignalOp.SIGNAL_SET, remote_pe, stream)
    signal_wait(signal_var, value, ComparisonType.CMP_GE, stream)  nvshmemx_signal_wait_until_on_stream
    signal_fetch(signal_var) -> int                         host nvshmem_signal_fetch (a D2H copy)
    quiet(stream)                                           nvshmemx_quiet_on_stream
    NvshmemStream(torch_stream)                             wrapper giving a torch stream the
                                                            __cuda_stream__ protocol (torch < 2.10
                                                            streams lack it; every on-stream call
                                                            reads stream.__cuda_stream__())
The RMA calls take cuda.core `Buffer`s (or nvshmem4py-allocated tensors whose data_ptr is the
START of an allocation — slices are rejected by `tensor_get_buffer`), so puts at an offset use
non-owning `cuda.core.Buffer.from_handle(ptr, size)` views; `stream` is torch's current stream,
wrapped in `nvshmem.core.NvshmemStream` where torch's Stream lacks `__cuda_stream__` (torch < 2.10).

How the Heap calls map (see heap.py and onesided.py for the protocol):
    put(peer, src, off)   deferred; the next signal() to that peer issues ONE on-stream put_signal
                          (data + signal, NVSHMEM orders the signal after the data). Blocking
                          on-stream variant (not _nbi): when the stream op completes, src may be
                          reused, so the caller may overwrite it in stream order. A second put to
                          the same peer before a signal flushes the first with put + quiet.
                          Why put_signal and not a peer-pointer copy (get_peer_tensor / nvshmem_ptr):
                          one op carries both the data and the release-ordered signal, and it also
                          works where nvshmem_ptr returns NULL (no P2P mapping); a peer-pointer
                          copy_ would need a separate system-scope fence before the signal store.
    signal(peer, s, v)    put_signal (if a put is pending) or on-stream signal_op SIGNAL_SET: both
                          ordered after earlier work on the current stream (e.g. the receiver's
                          copy-out before its credit).
    read_signal(s)        the local slot, copied to pinned host memory on a private side stream
                          (not nvshmem signal_fetch: a synchronous cudaMemcpy that also waits for
                          every kernel queued on the legacy default stream, so polling it would
                          serialise compute and transfers). When the value advanced, an on-stream
                          signal_wait(>= value) is queued too, so the work queued after it (the
                          copy-out of the chunk) has NVSHMEM acquire semantics on the GPU. The
                          device-initiated csrc/ kernels (transport `nvshmem-device`) need no host
                          polling at all.
    local(off, n)         uint8 view of this PE's symmetric data.
    quiet()               flush deferred puts, nvshmemx_quiet_on_stream.
    peer_alive(peer)      True: NVSHMEM has no liveness query; waits end by STREAMATTN_TIMEOUT_S.

Bootstrap: NVSHMEM is initialised once per process, over the node members of the FIRST heap
created (member index == PE). Member 0 creates the unique id; it travels hex-encoded (no pickle)
through `all_gather_text`, i.e. the two-sided torch transport of the group. Later heaps must have
exactly the same members (nvshmem_malloc is collective over every PE of the NVSHMEM world), else
RuntimeError. One NVSHMEM world per node: heaps never span nodes (onesided.py sends inter-node
messages through the two-sided transport).

csrc/ (device-initiated put-with-signal all-to-all and ring steps): `NvshmemHeap.extension()`
loads it through `streamattn.csrc.build.load_extension()` (csrc/build.py by path in a source tree):
`streamattn._nvshmem_ext` if built with STREAMATTN_BUILD_CUDA=1, else a cached JIT build, and initialises ITS device state with the same unique id
(`ext.init_with_uniqueid`; the host library is already initialised, NVSHMEM 3.x reference-counts
init). Its kernels take the symmetric tensors `heap.data_tensor` / `heap.signal_tensor` and world
PEs; csrc/README.md has the call sequence. transport/device.py drives it (`nvshmem-device`).

Importing this module never needs nvshmem4py or CUDA; constructing a heap raises RuntimeError
naming what is missing.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os

import torch

from .heap import Heap

NVSHMEM4PY_PIN = "nvshmem4py-cu13==0.4.1"  # the version this file was written and checked against
NVSHMEM4PY_PINS = {"cu13": "nvshmem4py-cu13==0.4.1", "cu12": "nvshmem4py-cu12==0.4.1"}
MIN_DRIVER = {"cu13": 580, "cu12": 525}  # NVIDIA driver branch each CUDA major needs
UID_BYTES = 128
_ALIGN = 256
_TEXT_LEN = 2 + 7 + 7 + 2 * UID_BYTES  # "I:" / "U:" + "%06d:" pe + "%06d:" npes + uid hex

# Process-wide NVSHMEM state (NVSHMEM is initialised once per process).
_state: dict = {"initialised": False, "uid_hex": None, "pe": None, "npes": None, "ext": None}


def _core():
    """nvshmem.core, or RuntimeError saying how to install it."""
    try:
        return importlib.import_module("nvshmem.core")
    except ImportError as exc:
        raise RuntimeError(
            f"streamattn nvshmem transport unavailable: nvshmem4py not installed "
            f"(pip install {NVSHMEM4PY_PIN}, or streamattn[gpu]): {exc}") from exc


def available() -> tuple:
    """(ok, reason) without initialising anything."""
    if importlib.util.find_spec("nvshmem") is None:
        return False, f"nvshmem4py not installed (pip install {NVSHMEM4PY_PIN})"
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    return True, ""


def nvshmem_flavour(torch_cuda=None, driver=None) -> tuple:
    """("cu13" | "cu12" | None, reason): which nvshmem4py / NVSHMEM wheel fits this box.

    torch_cuda: torch.version.cuda (e.g. "12.8"); driver: the NVIDIA driver version ("580.65.06")
    or None when unknown. The wheel must match torch's CUDA major (NVSHMEM links the same runtime),
    and CUDA 13 needs driver >= 580: on an older driver NVSHMEM init fails."""
    if torch_cuda is None:
        torch_cuda = torch.version.cuda
    if driver is None:
        driver = driver_version()
    if not torch_cuda:
        return None, "torch has no CUDA (CPU build): no NVSHMEM wheel applies"
    major = int(str(torch_cuda).split(".")[0])
    flavour = {12: "cu12", 13: "cu13"}.get(major)
    if flavour is None:
        return None, f"torch built for CUDA {torch_cuda}: nvshmem4py 0.4.1 ships cu12 and cu13 only"
    need = MIN_DRIVER[flavour]
    if driver:
        branch = int(str(driver).split(".")[0])
        if branch < need:
            return None, (f"torch CUDA {torch_cuda} needs NVIDIA driver >= {need}, this box has "
                          f"{driver}: upgrade the driver or use a torch built for CUDA 12 (cu12)")
    how = f"driver {driver}" if driver else "driver version unknown"
    return flavour, f"torch CUDA {torch_cuda}, {how}: pip install {NVSHMEM4PY_PINS[flavour]}"


def driver_version():
    """The NVIDIA driver version string, or None (no driver / cannot tell)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for word in f.read().split():
                if word.count(".") >= 1 and word.replace(".", "").isdigit():
                    return word
    except OSError:
        pass
    try:
        import pynvml  # nvidia-ml-py (streamattn[gpu])

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def installed_flavour():
    """The nvshmem4py wheel installed ("cu13", "cu12") or None."""
    from importlib import metadata

    for flavour, pin in NVSHMEM4PY_PINS.items():
        try:
            metadata.version(pin.split("==")[0])
            return flavour
        except metadata.PackageNotFoundError:
            continue
    return None


def _buffer_cls():
    from cuda.core import Buffer  # cuda.core >= 0.4 (a dependency of nvshmem4py 0.4.1)

    return Buffer


def _device_cls():
    from cuda.core import Device

    return Device


def _proc_state() -> dict:
    """The process-wide NVSHMEM state (a hook: the threaded fake-PE tests give each thread its own)."""
    return _state


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _synchronize(device) -> None:
    torch.cuda.synchronize(device)


def _current_stream(device):
    """The stream every heap operation is queued on: torch's current stream (implements
    __cuda_stream__, which nvshmem.core reads)."""
    return torch.cuda.current_stream(device)


def nvshmem_stream(core, stream):
    """`stream` in a form nvshmem.core's on-stream calls accept: they call
    stream.__cuda_stream__(), which torch.cuda.Stream implements only from torch 2.10; older
    streams (anything with .cuda_stream but no __cuda_stream__) go in nvshmem.core.NvshmemStream."""
    if hasattr(stream, "__cuda_stream__") or not hasattr(stream, "cuda_stream"):
        return stream
    wrap = getattr(core, "NvshmemStream", None)
    if wrap is None:  # nvshmem4py 0.4.1 defines it in nvshmem_types and re-exports it from core
        wrap = importlib.import_module("nvshmem.core.nvshmem_types").NvshmemStream
    return wrap(stream)


def _encode(status, pe, npes, uid_hex):
    text = f"{status}:{pe:06d}:{npes:06d}:{uid_hex}"
    assert len(text) == _TEXT_LEN, len(text)
    return text


def _decode(text, member):
    try:
        status, pe, npes, uid_hex = text.split(":")
        if status not in ("I", "U") or len(uid_hex) != 2 * UID_BYTES:
            raise ValueError
        bytes.fromhex(uid_hex)
        return status, int(pe), int(npes), uid_hex
    except ValueError:
        raise RuntimeError(f"member {member} of the nvshmem heap sent a malformed bootstrap "
                           f"message ({text[:40]!r}...); ranks run different streamattn versions?") from None


def _uid_to_hex(uid) -> str:
    import numpy as np

    return bytes(uid._data.view(np.uint8).reshape(-1)).hex()


def _uid_from_hex(core, uid_hex):
    import numpy as np

    uid = core.get_unique_id(empty=True)
    view = uid._data.view(np.uint8).reshape(-1)
    raw = np.frombuffer(bytes.fromhex(uid_hex), dtype=np.uint8)
    if view.size != raw.size:
        raise RuntimeError(f"NVSHMEM unique id is {view.size} bytes here, {raw.size} from member 0")
    view[:] = raw
    return uid


def _bootstrap(core, rank, size, all_gather_text):
    """Initialise NVSHMEM over the heap's members (once per process); return each member's PE."""
    st = _proc_state()
    if st["initialised"]:
        mine = _encode("I", st["pe"], st["npes"], st["uid_hex"])
    elif rank == 0:
        mine = _encode("U", 0, size, _uid_to_hex(core.get_unique_id()))
    else:
        mine = _encode("U", 0, size, "0" * (2 * UID_BYTES))
    try:
        texts, _ = all_gather_text(mine, os.getpid())
    except Exception as exc:
        raise RuntimeError(f"nvshmem bootstrap: all-gathering the unique id over the two-sided "
                           f"transport failed ({type(exc).__name__}: {exc})") from exc
    msgs = [_decode(t, i) for i, t in enumerate(texts)]
    kinds = {m[0] for m in msgs}
    if kinds == {"U"}:
        uid_hex = msgs[0][3]
        uid = _uid_from_hex(core, uid_hex)
        dev = _device_cls()(_current_device().index)
        dev.set_current()
        core.init(device=dev, uid=uid, rank=rank, nranks=size, initializer_method="uid")
        if core.my_pe() != rank or core.n_pes() != size:
            raise RuntimeError(f"NVSHMEM initialised as PE {core.my_pe()} of {core.n_pes()}, "
                               f"expected {rank} of {size}")
        st.update(initialised=True, uid_hex=uid_hex, pe=rank, npes=size)
        return list(range(size))
    if kinds == {"I"} and len({m[3] for m in msgs}) == 1 and msgs[0][2] == size \
            and sorted(m[1] for m in msgs) == list(range(size)):
        return [m[1] for m in msgs]
    raise RuntimeError(
        "streamattn nvshmem transport: NVSHMEM is initialised once per process, over the node "
        "members of the first group that used it; this group's node members "
        f"({size} ranks, states {[m[0] + str(m[1]) + '/' + str(m[2]) for m in msgs]}) are not "
        "exactly that NVSHMEM world. Use the nvshmem transport on one group per node "
        "(e.g. the default group), or STREAMATTN_TRANSPORT=torch for the others.")


class NvshmemHeap(Heap):
    """Symmetric heap on the NVSHMEM symmetric heap of this node's GPUs (see the module docstring).

    Constructor signature as ShmHeap: collective over the `size` members (ranks of one node, each
    on its own CUDA device, set current before the call)."""

    def __init__(self, rank, size, data_bytes, num_signals, all_gather_text, barrier):
        core = _core()
        if not _cuda_available():
            raise RuntimeError("streamattn nvshmem transport unavailable: no CUDA device "
                               "(torch.cuda.is_available() is False)")
        self._core = core
        self.rank, self.size = rank, size
        self.data_bytes, self.num_signals = data_bytes, num_signals
        self.pes = _bootstrap(core, rank, size, all_gather_text)
        self.device = _current_device()
        self._sig_bytes = num_signals * 8
        self._data_off = -(-self._sig_bytes // _ALIGN) * _ALIGN
        total = self._data_off + data_bytes
        # Collective nvshmem_malloc: every PE of the world allocates, in the same order.
        self._mem = core.tensor((total,), dtype=torch.uint8, except_on_del=False)
        self.signal_tensor = self._mem[: self._sig_bytes].view(torch.int64)
        self.data_tensor = self._mem[self._data_off : self._data_off + data_bytes]
        self.signal_tensor.zero_()
        _synchronize(self.device)
        barrier()  # every member's signals are zero before anyone signals
        Buffer = _buffer_cls()
        self._Buffer = Buffer
        base = self._mem.data_ptr()
        self._sig_bufs = [Buffer.from_handle(base + 8 * s, 8) for s in range(num_signals)]
        self._data_ptr = base + self._data_off
        self._seen = [0] * num_signals
        self._pending = [None] * size  # deferred put per peer: (src tensor, dst_offset, nbytes)
        self.acquire_on_stream = True
        self._side = self._host = None  # side stream + pinned buffer of read_signal (CUDA)
        self._closed = False

    # -- helpers -----------------------------------------------------------------------------
    def _stream(self):
        return nvshmem_stream(self._core, _current_stream(self.device))

    def _dst(self, offset, nbytes):
        if offset < 0 or offset + nbytes > self.data_bytes:
            raise ValueError(f"nvshmem heap: [{offset}, {offset + nbytes}) outside the "
                             f"{self.data_bytes}-byte data area")
        return self._Buffer.from_handle(self._data_ptr + offset, nbytes)

    def _src(self, src):
        return self._Buffer.from_handle(src.data_ptr(), src.numel() * src.element_size())

    def _flush(self, peer, stream):
        """Issue a deferred put without a signal (put + quiet: ordered before what follows)."""
        pend = self._pending[peer]
        if pend is None:
            return
        self._pending[peer] = None
        src, off, n = pend
        self._core.put(self._dst(off, n), self._src(src), remote_pe=self.pes[peer], stream=stream)
        self._core.quiet(stream=stream)

    # -- Heap --------------------------------------------------------------------------------
    def put(self, peer, src, dst_offset):
        if src.device.type != self.device.type or not src.is_contiguous():
            raise ValueError(f"nvshmem heap: put needs a contiguous tensor on {self.device.type}, "
                             f"got {src.device} contiguous={src.is_contiguous()}")
        n = src.numel() * src.element_size()
        if n == 0:
            return
        stream = self._stream()
        self._flush(peer, stream)
        self._dst(dst_offset, n)  # bounds check now, not at signal time
        self._pending[peer] = (src, dst_offset, n)

    def signal(self, peer, slot, value):
        stream = self._stream()
        core, pe = self._core, self.pes[peer]
        pend = self._pending[peer]
        if pend is not None:
            self._pending[peer] = None
            src, off, n = pend
            core.put_signal(self._dst(off, n), self._src(src), self._sig_bufs[slot], int(value),
                            core.SignalOp.SIGNAL_SET, remote_pe=pe, stream=stream)
        else:
            core.signal_op(self._sig_bufs[slot], int(value), core.SignalOp.SIGNAL_SET,
                           remote_pe=pe, stream=stream)

    def _fetch(self, slot):
        """This PE's signal `slot`, without draining the compute stream (see the module docstring).
        CPU-side fakes (tests) have no CUDA stream: they use signal_fetch."""
        if self.device.type != "cuda":
            return int(self._core.signal_fetch(self._sig_bufs[slot]))
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)  # non-blocking w.r.t. stream 0
            self._host = torch.empty(self.num_signals, dtype=torch.int64, pin_memory=True)
        with torch.cuda.stream(self._side):
            self._host[slot : slot + 1].copy_(self.signal_tensor[slot : slot + 1], non_blocking=True)
        self._side.synchronize()
        return int(self._host[slot])

    def read_signal(self, slot):
        core = self._core
        value = self._fetch(slot)
        if value > self._seen[slot]:
            self._seen[slot] = value
            if self.acquire_on_stream:
                core.signal_wait(self._sig_bufs[slot], value, core.ComparisonType.CMP_GE,
                                 stream=self._stream())
        return value

    def local(self, offset, nbytes):
        return self.data_tensor[offset : offset + nbytes]

    def peer_alive(self, peer):
        return True  # NVSHMEM has no liveness query; the protocol's timeout names the peer

    def quiet(self):
        stream = self._stream()
        for p in range(self.size):
            self._flush(p, stream)
        self._core.quiet(stream=stream)

    def close(self):
        """Collective (nvshmem_free): every member closes its heaps in the same order."""
        if self._closed:
            return
        self._closed = True
        try:
            self.quiet()
            _synchronize(self.device)
        finally:
            self.signal_tensor = self.data_tensor = None
            self._sig_bufs = []
            mem, self._mem = self._mem, None
            if mem is not None:
                self._core.free_tensor(mem)

    # -- csrc/ device-initiated kernels (optional) ------------------------------------------------
    def extension(self, verbose=False):
        """The csrc/ extension with its NVSHMEM device state initialised (GPU boxes only)."""
        st = _proc_state()
        if st["ext"] is not None:
            return st["ext"]
        from ..csrc import build  # csrc/ installs as streamattn.csrc (pyproject.toml)

        ext = build.load_extension(verbose=verbose)  # prebuilt _nvshmem_ext first, else JIT build
        uid = torch.frombuffer(bytearray(bytes.fromhex(st["uid_hex"])), dtype=torch.uint8)
        # nvshmemx_init_attr exits the process on most failures instead of returning a status, so
        # everything checkable is checked first (ext.init_with_uniqueid does the same in C++:
        # uid size, rank range, current device, host library state) and reported here.
        status = ext.init_with_uniqueid(uid, st["pe"], st["npes"])
        if status != 0:
            raise RuntimeError(f"csrc extension: NVSHMEM device-state init failed with status {status} "
                               f"(PE {st['pe']} of {st['npes']})")
        st["ext"] = ext
        return ext


def finalize():
    """Finalise NVSHMEM in this process (collective; call after closing every heap, before exit)."""
    st = _proc_state()
    if st["initialised"]:
        if st["ext"] is not None:  # the csrc module initialised NVSHMEM once more (reference-counted)
            st["ext"].finalize()
        _core().finalize()
        st.update(initialised=False, uid_hex=None, pe=None, npes=None, ext=None)


def uid_digest() -> str:
    """Short digest of the unique id this process was initialised with ('' if none): logs/tests."""
    st = _proc_state()
    return hashlib.sha256(bytes.fromhex(st["uid_hex"])).hexdigest()[:12] if st["uid_hex"] else ""
