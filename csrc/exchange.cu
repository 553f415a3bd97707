// streamattn: device-initiated one-sided exchange over NVSHMEM 3.x (see exchange.h for the protocol).
//
// Build: nvcc -rdc=true (NVSHMEM device API needs relocatable device code), link
// libnvshmem_device.a (device link) and libnvshmem_host.so. csrc/build.py does both.
#include "exchange.h"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

namespace streamattn {
namespace nvshmem_ext {

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("streamattn nvshmem_ext: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

constexpr int kThreads = 256;

// Slice [begin, end) of `bytes` for block `b` of `nb`, aligned to 16 bytes so vector copies stay
// aligned when the base pointers are.
__host__ __device__ inline void block_slice(int64_t bytes, int b, int nb, int64_t* begin,
                                            int64_t* end) {
  int64_t per = (bytes + nb - 1) / nb;
  per = (per + 15) & ~int64_t(15);
  int64_t lo = per * b;
  int64_t hi = lo + per;
  *begin = lo < bytes ? lo : bytes;
  *end = hi < bytes ? hi : bytes;
}

__global__ void alltoall_put_signal_kernel(const char* __restrict__ send, char* recv,
                                           uint64_t* signals, AllToAllPlan plan,
                                           nvshmem_team_t team) {
  if (static_cast<int>(blockIdx.y) >= plan.npeers) return;
  const int me = nvshmem_team_my_pe(team);
  // Staggered destinations (block row y serves team PE me+1+y) so all PEs do not hit PE 0 at once.
  const int p = (me + 1 + static_cast<int>(blockIdx.y)) % plan.npeers;
  const int pe = nvshmem_team_translate_pe(team, p, NVSHMEM_TEAM_WORLD);
  int64_t lo, hi;
  block_slice(plan.send_bytes[p], blockIdx.x, gridDim.x, &lo, &hi);
  if (hi > lo) {
    nvshmemx_putmem_signal_nbi_block(recv + plan.recv_offset[p] + lo,
                                     send + plan.send_offset[p] + lo, static_cast<size_t>(hi - lo),
                                     signals + me, 1, NVSHMEM_SIGNAL_ADD, pe);
  } else if (threadIdx.x == 0) {
    // Empty slice (short or empty chunk): still count this block so the receiver's target holds.
    nvshmemx_signal_op(signals + me, 1, NVSHMEM_SIGNAL_ADD, pe);
  }
}

__global__ void signals_wait_kernel(uint64_t* signals, int peer_begin, int peer_end,
                                    uint64_t expected) {
  for (int p = peer_begin + static_cast<int>(threadIdx.x); p < peer_end; p += blockDim.x) {
    nvshmem_signal_wait_until(signals + p, NVSHMEM_CMP_GE, expected);
  }
  __syncthreads();
}

__global__ void ring_step_kernel(const char* __restrict__ src, int64_t bytes, char* recv,
                                 int64_t slot_bytes, int nslots, uint64_t* data_sig,
                                 uint64_t* ack_sig, uint64_t step, int peer) {
  const int slot = static_cast<int>(step % static_cast<uint64_t>(nslots));
  if (step >= static_cast<uint64_t>(nslots)) {
    // The consumer on `peer` must have released this slot (its step - nslots) before we overwrite.
    if (threadIdx.x == 0) {
      nvshmem_signal_wait_until(ack_sig + slot, NVSHMEM_CMP_GE, step - nslots + 1);
    }
    __syncthreads();
  }
  int64_t lo, hi;
  block_slice(bytes, blockIdx.x, gridDim.x, &lo, &hi);
  if (hi > lo) {
    nvshmemx_putmem_signal_nbi_block(recv + slot * slot_bytes + lo, src + lo,
                                     static_cast<size_t>(hi - lo), data_sig + slot, 1,
                                     NVSHMEM_SIGNAL_ADD, peer);
  } else if (threadIdx.x == 0) {
    nvshmemx_signal_op(data_sig + slot, 1, NVSHMEM_SIGNAL_ADD, peer);
  }
}

__global__ void ring_wait_kernel(uint64_t* data_sig, uint64_t step, int nslots, int nblocks) {
  if (threadIdx.x == 0) {
    const int slot = static_cast<int>(step % static_cast<uint64_t>(nslots));
    const uint64_t uses = step / static_cast<uint64_t>(nslots) + 1;
    nvshmem_signal_wait_until(data_sig + slot, NVSHMEM_CMP_GE, uses * nblocks);
  }
}

__global__ void ring_release_kernel(uint64_t* ack_sig, uint64_t step, int nslots, int peer) {
  if (threadIdx.x == 0) {
    const int slot = static_cast<int>(step % static_cast<uint64_t>(nslots));
    nvshmem_quiet();  // puts that read from the slot (forwarding it) have completed
    nvshmemx_signal_op(ack_sig + slot, step + 1, NVSHMEM_SIGNAL_SET, peer);
  }
}

}  // namespace

// ---------------------------------------------------------------- bootstrap / state
std::vector<uint8_t> get_uniqueid() {
  nvshmemx_uniqueid_t uid = NVSHMEMX_UNIQUEID_INITIALIZER;
  int st = nvshmemx_get_uniqueid(&uid);
  if (st != 0) throw std::runtime_error("nvshmemx_get_uniqueid failed: " + std::to_string(st));
  std::vector<uint8_t> out(sizeof(uid));
  std::memcpy(out.data(), &uid, sizeof(uid));
  return out;
}

int init_with_uniqueid(const std::vector<uint8_t>& uid_bytes, int rank, int nranks) {
  // Everything that can be checked is checked first and thrown as an exception (a Python
  // RuntimeError naming the problem), because NVSHMEM's own init path exits the process.
  if (uid_bytes.size() != sizeof(nvshmemx_uniqueid_t)) {
    throw std::invalid_argument("unique id must be " + std::to_string(sizeof(nvshmemx_uniqueid_t)) +
                                " bytes, got " + std::to_string(uid_bytes.size()));
  }
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    throw std::invalid_argument("init_with_uniqueid: rank " + std::to_string(rank) +
                                " outside [0, " + std::to_string(nranks) + ")");
  }
  int dev = -1;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice before NVSHMEM init");
  nvshmemx_uniqueid_t uid;
  std::memcpy(&uid, uid_bytes.data(), sizeof(uid));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int st = nvshmemx_set_attr_uniqueid_args(rank, nranks, &uid, &attr);
  if (st != 0) return st;
  // The body of the inline nvshmemx_init_attr (host/nvshmemx_api.h, NVSHMEM 3.8) WITHOUT its
  // NONZERO_EXIT: that macro calls exit() on any failure, which made the status returned here dead
  // code. nvshmemi_init_thread comes from libnvshmem_device.a, so it also initialises the device
  // state of THIS module (needed even when nvshmem4py initialised the host library: NVSHMEM 3.x
  // reference-counts init).
  int provided = 0;
  nvshmemi_version_t app_version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                    NVSHMEM_VENDOR_PATCH_VERSION};
  return nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID,
                              &attr, app_version);
}

int init_status() { return nvshmemx_init_status(); }
void finalize() { nvshmem_finalize(); }
int my_pe() { return nvshmem_my_pe(); }
int n_pes() { return nvshmem_n_pes(); }
int team_node() { return static_cast<int>(NVSHMEMX_TEAM_NODE); }
int team_world() { return static_cast<int>(NVSHMEM_TEAM_WORLD); }
int team_my_pe(int team) { return nvshmem_team_my_pe(static_cast<nvshmem_team_t>(team)); }
int team_n_pes(int team) { return nvshmem_team_n_pes(static_cast<nvshmem_team_t>(team)); }
int team_translate_pe(int team, int pe) {
  return nvshmem_team_translate_pe(static_cast<nvshmem_team_t>(team), pe, NVSHMEM_TEAM_WORLD);
}
void* symmetric_malloc(size_t bytes) {
  void* p = nvshmem_malloc(bytes);
  if (p == nullptr && bytes != 0) throw std::runtime_error("nvshmem_malloc failed");
  return p;
}
void symmetric_free(void* ptr) { nvshmem_free(ptr); }
void quiet_on_stream(cudaStream_t stream) { nvshmemx_quiet_on_stream(stream); }
void barrier_on_stream(int team, cudaStream_t stream) {
  int st = nvshmemx_barrier_on_stream(static_cast<nvshmem_team_t>(team), stream);
  if (st != 0) throw std::runtime_error("nvshmemx_barrier_on_stream failed: " + std::to_string(st));
}

// ---------------------------------------------------------------- launchers
void alltoall_put_signal(const void* send, void* recv_symmetric, uint64_t* signals_symmetric,
                         const AllToAllPlan& plan, int team, int blocks_per_peer,
                         cudaStream_t stream) {
  if (plan.npeers <= 0 || plan.npeers > kMaxPeers) {
    throw std::invalid_argument("alltoall_put_signal: npeers must be in [1, " +
                                std::to_string(kMaxPeers) + "]");
  }
  if (blocks_per_peer <= 0 || blocks_per_peer > 65535) {
    throw std::invalid_argument("alltoall_put_signal: blocks_per_peer must be in [1, 65535]");
  }
  dim3 grid(blocks_per_peer, plan.npeers);
  alltoall_put_signal_kernel<<<grid, kThreads, 0, stream>>>(
      static_cast<const char*>(send), static_cast<char*>(recv_symmetric), signals_symmetric, plan,
      static_cast<nvshmem_team_t>(team));
  check_cuda(cudaGetLastError(), "alltoall_put_signal launch");
}

void signals_wait(uint64_t* signals_symmetric, int peer_begin, int peer_end, uint64_t expected,
                  cudaStream_t stream) {
  if (peer_begin < 0 || peer_end < peer_begin || peer_end > kMaxPeers) {
    throw std::invalid_argument("signals_wait: bad peer range");
  }
  if (peer_end == peer_begin) return;
  signals_wait_kernel<<<1, 32, 0, stream>>>(signals_symmetric, peer_begin, peer_end, expected);
  check_cuda(cudaGetLastError(), "signals_wait launch");
}

void ring_step(const void* src, size_t bytes, void* recv_symmetric, size_t slot_bytes, int nslots,
               uint64_t* data_sig_symmetric, uint64_t* ack_sig_symmetric, uint64_t step, int peer,
               int nblocks, cudaStream_t stream) {
  if (nslots <= 0) throw std::invalid_argument("ring_step: nslots must be >= 1");
  if (bytes > slot_bytes) throw std::invalid_argument("ring_step: bytes exceed slot_bytes");
  if (nblocks <= 0 || nblocks > 65535) throw std::invalid_argument("ring_step: bad nblocks");
  ring_step_kernel<<<nblocks, kThreads, 0, stream>>>(
      static_cast<const char*>(src), static_cast<int64_t>(bytes),
      static_cast<char*>(recv_symmetric), static_cast<int64_t>(slot_bytes), nslots,
      data_sig_symmetric, ack_sig_symmetric, step, peer);
  check_cuda(cudaGetLastError(), "ring_step launch");
}

void ring_wait(uint64_t* data_sig_symmetric, uint64_t step, int nslots, int nblocks,
               cudaStream_t stream) {
  if (nslots <= 0 || nblocks <= 0) throw std::invalid_argument("ring_wait: bad nslots/nblocks");
  ring_wait_kernel<<<1, 32, 0, stream>>>(data_sig_symmetric, step, nslots, nblocks);
  check_cuda(cudaGetLastError(), "ring_wait launch");
}

void ring_release(uint64_t* ack_sig_symmetric, uint64_t step, int nslots, int peer,
                  cudaStream_t stream) {
  if (nslots <= 0) throw std::invalid_argument("ring_release: nslots must be >= 1");
  ring_release_kernel<<<1, 32, 0, stream>>>(ack_sig_symmetric, step, nslots, peer);
  check_cuda(cudaGetLastError(), "ring_release launch");
}

}  // namespace nvshmem_ext
}  // namespace streamattn
