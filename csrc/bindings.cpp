// streamattn._nvshmem_ext: torch bindings of the NVSHMEM device-initiated exchange (exchange.h).
//
// Loaded by streamattn/transport/nvshmem.py through csrc/build.py (load_extension) or built by
// setup.py with STREAMATTN_BUILD_CUDA=1. Every launch goes on the CUDA stream passed as `stream`
// (an integer handle: `torch.cuda.current_stream().cuda_stream`; 0 = legacy default stream) on the
// CURRENT CUDA device, which the caller sets (`torch.cuda.set_device` / `with torch.cuda.device`):
// taking the handle from Python keeps this file free of c10/cuda headers, which CPU builds of torch
// ship incomplete (c10/cuda/impl/cuda_cmake_macros.h is missing), so CI compiles it for real.
// Symmetric tensors (recv buffers, signal arrays) must be NVSHMEM-allocated (nvshmem4py or
// `symmetric_empty` below). Signal arrays are uint64 counters; torch int64 / uint64
// tensors are accepted and reinterpreted.
//
// Compiled with the host C++ compiler (no NVSHMEM headers here): the NVSHMEM code is in exchange.cu.
// Only the headers it uses (ATen's tensor, the ops it calls, torch's pybind11 casters), not
// <torch/extension.h> (the whole C++ frontend): the compile takes a third of the time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/csrc/utils/pybind.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "exchange.h"

namespace ne = streamattn::nvshmem_ext;

namespace {

cudaStream_t as_stream(int64_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

void check_device(const at::Tensor& t) {
  int dev = -1;
  TORCH_CHECK(cudaGetDevice(&dev) == cudaSuccess, "cudaGetDevice failed");
  TORCH_CHECK(t.device().index() == dev, "tensor on cuda:", t.device().index(),
              " but the current CUDA device is ", dev, " (set it before calling)");
}

void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

uint64_t* signal_ptr(const at::Tensor& sig, const char* name) {
  check_cuda_tensor(sig, name);
  TORCH_CHECK(sig.scalar_type() == at::kLong || sig.scalar_type() == at::kUInt64, name,
              " must be an int64 or uint64 tensor of signal counters");
  return reinterpret_cast<uint64_t*>(sig.data_ptr());
}

int64_t nbytes(const at::Tensor& t) { return static_cast<int64_t>(t.numel() * t.element_size()); }

// send: local CUDA tensor (read as bytes). recv: SYMMETRIC tensor (bytes). signals: SYMMETRIC,
// >= team size counters. Offsets / sizes in BYTES, one entry per team PE.
void alltoall_put_signal(const at::Tensor& send, std::vector<int64_t> send_offsets,
                         std::vector<int64_t> send_bytes, const at::Tensor& recv,
                         std::vector<int64_t> recv_offsets, const at::Tensor& signals,
                         int64_t team, int64_t blocks_per_peer, int64_t stream) {
  check_cuda_tensor(send, "send");
  check_cuda_tensor(recv, "recv");
  const size_t n = send_offsets.size();
  TORCH_CHECK(n >= 1 && n <= static_cast<size_t>(ne::kMaxPeers), "1..", ne::kMaxPeers,
              " peers supported, got ", n);
  TORCH_CHECK(send_bytes.size() == n && recv_offsets.size() == n,
              "send_offsets, send_bytes and recv_offsets must have one entry per team PE");
  TORCH_CHECK(signals.numel() >= static_cast<int64_t>(n), "signals needs >= ", n, " counters");
  ne::AllToAllPlan plan{};
  plan.npeers = static_cast<int>(n);
  for (size_t p = 0; p < n; ++p) {
    TORCH_CHECK(send_offsets[p] >= 0 && send_bytes[p] >= 0 &&
                    send_offsets[p] + send_bytes[p] <= nbytes(send),
                "chunk ", p, " lies outside send (", nbytes(send), " bytes)");
    TORCH_CHECK(recv_offsets[p] >= 0 && recv_offsets[p] + send_bytes[p] <= nbytes(recv),
                "chunk ", p, " lies outside recv (", nbytes(recv), " bytes)");
    plan.send_offset[p] = send_offsets[p];
    plan.send_bytes[p] = send_bytes[p];
    plan.recv_offset[p] = recv_offsets[p];
  }
  check_device(send);
  ne::alltoall_put_signal(send.data_ptr(), recv.data_ptr(), signal_ptr(signals, "signals"), plan,
                          static_cast<int>(team), static_cast<int>(blocks_per_peer),
                          as_stream(stream));
}

void signals_wait(const at::Tensor& signals, int64_t peer_begin, int64_t peer_end,
                  int64_t expected, int64_t stream) {
  TORCH_CHECK(peer_end <= signals.numel(), "peer_end beyond the signal array");
  check_device(signals);
  ne::signals_wait(signal_ptr(signals, "signals"), static_cast<int>(peer_begin),
                   static_cast<int>(peer_end), static_cast<uint64_t>(expected),
                   as_stream(stream));
}

void ring_step(const at::Tensor& src, const at::Tensor& recv, int64_t slot_bytes, int64_t nslots,
               const at::Tensor& data_sig, const at::Tensor& ack_sig, int64_t step, int64_t peer,
               int64_t nblocks, int64_t stream) {
  check_cuda_tensor(src, "src");
  check_cuda_tensor(recv, "recv");
  TORCH_CHECK(nslots >= 1 && slot_bytes * nslots <= nbytes(recv), "recv holds fewer than ",
              nslots, " slots of ", slot_bytes, " bytes");
  TORCH_CHECK(data_sig.numel() >= nslots && ack_sig.numel() >= nslots,
              "data_sig / ack_sig need one counter per slot");
  check_device(src);
  ne::ring_step(src.data_ptr(), static_cast<size_t>(nbytes(src)), recv.data_ptr(),
                static_cast<size_t>(slot_bytes), static_cast<int>(nslots),
                signal_ptr(data_sig, "data_sig"), signal_ptr(ack_sig, "ack_sig"),
                static_cast<uint64_t>(step), static_cast<int>(peer), static_cast<int>(nblocks),
                as_stream(stream));
}

void ring_wait(const at::Tensor& data_sig, int64_t step, int64_t nslots, int64_t nblocks,
               int64_t stream) {
  check_device(data_sig);
  ne::ring_wait(signal_ptr(data_sig, "data_sig"), static_cast<uint64_t>(step),
                static_cast<int>(nslots), static_cast<int>(nblocks), as_stream(stream));
}

void ring_release(const at::Tensor& ack_sig, int64_t step, int64_t nslots, int64_t peer,
                  int64_t stream) {
  check_device(ack_sig);
  ne::ring_release(signal_ptr(ack_sig, "ack_sig"), static_cast<uint64_t>(step),
                   static_cast<int>(nslots), static_cast<int>(peer), as_stream(stream));
}

void quiet(int64_t stream) {
  ne::quiet_on_stream(as_stream(stream));
}

void barrier(int64_t team, int64_t stream) {
  ne::barrier_on_stream(static_cast<int>(team), as_stream(stream));
}

at::Tensor get_uniqueid() {
  std::vector<uint8_t> uid = ne::get_uniqueid();
  at::Tensor t = at::empty({static_cast<int64_t>(uid.size())}, at::kByte);
  std::memcpy(t.data_ptr(), uid.data(), uid.size());
  return t;
}

int64_t init_with_uniqueid(const at::Tensor& uid, int64_t rank, int64_t nranks) {
  at::Tensor c = uid.to(at::kCPU).contiguous();
  TORCH_CHECK(c.scalar_type() == at::kByte, "uid must be a uint8 tensor");
  const uint8_t* p = c.data_ptr<uint8_t>();
  std::vector<uint8_t> bytes(p, p + c.numel());
  return ne::init_with_uniqueid(bytes, static_cast<int>(rank), static_cast<int>(nranks));
}

// A torch tensor on the NVSHMEM symmetric heap. Its deleter does NOT free: nvshmem_free is
// collective (every PE, same order) and a deleter runs whenever Python's garbage collector drops
// the last reference, at a different moment on every rank (a hang or heap corruption). Free it
// explicitly with symmetric_free(tensor) on every PE in the same order; a tensor dropped without
// it leaks until nvshmem_finalize.
at::Tensor symmetric_empty(std::vector<int64_t> shape, at::ScalarType dtype, int64_t device) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  int cur = -1;
  TORCH_CHECK(cudaGetDevice(&cur) == cudaSuccess && cur == device,
              "symmetric_empty: set the current CUDA device to ", device, " first");
  void* ptr = ne::symmetric_malloc(bytes == 0 ? 1 : bytes);
  return at::from_blob(
      ptr, shape, [](void*) {},
      at::TensorOptions().dtype(dtype).device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
}

// Collective: every PE calls it for its tensor of the same symmetric_empty call, in the same order.
void symmetric_free(const at::Tensor& t) {
  check_cuda_tensor(t, "t");
  ne::symmetric_free(t.data_ptr());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "streamattn NVSHMEM device-initiated exchange (put-with-signal all-to-all, ring step)";
  m.def("alltoall_put_signal", &alltoall_put_signal, py::arg("send"), py::arg("send_offsets"),
        py::arg("send_bytes"), py::arg("recv"), py::arg("recv_offsets"), py::arg("signals"),
        py::arg("team"), py::arg("blocks_per_peer"), py::arg("stream"),
        "Put chunk p of `send` into team PE p's symmetric `recv` at recv_offsets[p] with a "
        "signal ADD 1 per block on its signals[my_team_pe] (bytes everywhere).");
  m.def("signals_wait", &signals_wait, py::arg("signals"), py::arg("peer_begin"),
        py::arg("peer_end"), py::arg("expected"), py::arg("stream"),
        "Stream-ordered wait until signals[p] >= expected for p in [peer_begin, peer_end).");
  m.def("ring_step", &ring_step, py::arg("src"), py::arg("recv"), py::arg("slot_bytes"),
        py::arg("nslots"), py::arg("data_sig"), py::arg("ack_sig"), py::arg("step"),
        py::arg("peer"), py::arg("nblocks"), py::arg("stream"),
        "Producer of ring/torus step `step`: put src into slot step % nslots on world PE `peer`.");
  m.def("ring_wait", &ring_wait, py::arg("data_sig"), py::arg("step"), py::arg("nslots"),
        py::arg("nblocks"), py::arg("stream"), "Consumer: stream waits until step `step` has landed locally.");
  m.def("ring_release", &ring_release, py::arg("ack_sig"), py::arg("step"), py::arg("nslots"),
        py::arg("peer"), py::arg("stream"), "Consumer: after its compute, free slot step % nslots on producer `peer`.");
  m.def("quiet", &quiet, py::arg("stream"), "nvshmemx_quiet_on_stream(stream).");
  m.def("barrier", &barrier, py::arg("team"), py::arg("stream"),
        "nvshmemx_barrier_on_stream(team, stream).");
  m.def("get_uniqueid", &get_uniqueid, "128-byte NVSHMEM unique id (uint8 CPU tensor).");
  m.def("init_with_uniqueid", &init_with_uniqueid, py::arg("uid"), py::arg("rank"),
        py::arg("nranks"), "nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID); returns status.");
  m.def("init_status", &ne::init_status);
  m.def("finalize", &ne::finalize);
  m.def("my_pe", &ne::my_pe);
  m.def("n_pes", &ne::n_pes);
  m.def("team_node", &ne::team_node);
  m.def("team_world", &ne::team_world);
  m.def("team_my_pe", &ne::team_my_pe, py::arg("team"));
  m.def("team_n_pes", &ne::team_n_pes, py::arg("team"));
  m.def("team_translate_pe", &ne::team_translate_pe, py::arg("team"), py::arg("pe"),
        "Team PE index -> world PE.");
  m.def("symmetric_empty", &symmetric_empty, py::arg("shape"), py::arg("dtype"),
        py::arg("device"),
        "Uninitialised tensor on the NVSHMEM symmetric heap (free it with symmetric_free).");
  m.def("symmetric_free", &symmetric_free, py::arg("t"),
        "Collective nvshmem_free of a symmetric_empty tensor (every PE, same order).");
  m.attr("MAX_PEERS") = ne::kMaxPeers;
}
