// streamattn: device-initiated one-sided exchange over NVSHMEM -- host launch API.
//
// Plain C++ (no NVSHMEM or torch headers) so that bindings.cpp compiles with the host compiler.
// Implemented in exchange.cu. Every launch is asynchronous on `stream`; every pointer is a device
// pointer; pointers documented as SYMMETRIC must come from the NVSHMEM symmetric heap
// (nvshmem_malloc / nvshmem4py symmetric tensors) and be the SAME allocation on every PE.
//
// Signal protocol (monotonic counters, never reset, so consecutive calls need no barrier for the
// signals themselves):
//   * all-to-all: sender block b of peer p does put-with-signal ADD 1 on the receiver's
//     signals[my_team_pe]. After its e-th call (e = 1, 2, ...) a receiver waits until
//     signals[p] >= e * blocks_per_peer for every peer p.
//   * ring/torus step k (k = 0, 1, ... over the lifetime of the buffers): data goes to slot
//     k % nslots of the peer's receive buffer with ADD 1 per block on the peer's data_sig[slot];
//     the consumer waits data_sig[slot] >= (k / nslots + 1) * nblocks, runs its compute on the
//     slot (stream order), then releases it: nvshmem_quiet (its own forwards out of the slot have
//     completed) + SET ack_sig[slot] = k + 1 on the producer. Before writing step k >= nslots the
//     producer waits its local ack_sig[slot] >= k - nslots + 1 (the consumer freed the slot).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_runtime_api.h>

namespace streamattn {
namespace nvshmem_ext {

constexpr int kMaxPeers = 128;  // node team size limit of one all-to-all launch (NVL72 fits)

// ---- library state / bootstrap (thin wrappers; nvshmem4py may do the same) -------------------
std::vector<uint8_t> get_uniqueid();  // 128 bytes, broadcast from rank 0 over torch.distributed
// Initialises NVSHMEM (and this module's device state) from a unique id; returns nvshmem status.
int init_with_uniqueid(const std::vector<uint8_t>& uid, int rank, int nranks);
int init_status();
void finalize();
int my_pe();
int n_pes();
int team_node();   // NVSHMEMX_TEAM_NODE
int team_world();  // NVSHMEM_TEAM_WORLD
int team_my_pe(int team);
int team_n_pes(int team);
int team_translate_pe(int team, int pe);  // team PE index -> world PE
void* symmetric_malloc(size_t bytes);
void symmetric_free(void* ptr);
void quiet_on_stream(cudaStream_t stream);
void barrier_on_stream(int team, cudaStream_t stream);

// ---- (a) put-with-signal all-to-all over a team ----------------------------------------------
struct AllToAllPlan {
  int npeers;                          // == team size
  int64_t send_offset[kMaxPeers];      // bytes into `send` of the chunk for team PE p
  int64_t send_bytes[kMaxPeers];       // bytes of that chunk (0 allowed: the signal still fires)
  int64_t recv_offset[kMaxPeers];      // bytes into peer p's SYMMETRIC `recv` where my chunk lands
};

// Every PE of `team` calls this (same blocks_per_peer everywhere). Grid (blocks_per_peer, npeers),
// each block puts its 16-byte aligned slice with nvshmemx_putmem_signal_nbi_block.
void alltoall_put_signal(const void* send, void* recv_symmetric, uint64_t* signals_symmetric,
                         const AllToAllPlan& plan, int team, int blocks_per_peer,
                         cudaStream_t stream);

// Stream-ordered wait: the work queued after it on `stream` starts once signals[p] >= expected
// for every p in [0, npeers) (peer_begin/peer_end restrict to a range: pipelined consumption).
void signals_wait(uint64_t* signals_symmetric, int peer_begin, int peer_end, uint64_t expected,
                  cudaStream_t stream);

// ---- (b) ring / torus step ---------------------------------------------------------------------
// Producer side of step k: put `bytes` of `src` into slot k % nslots of the SYMMETRIC recv buffer
// (slot stride slot_bytes) on world PE `peer`, signal data_sig[slot] there (ADD 1 per block).
void ring_step(const void* src, size_t bytes, void* recv_symmetric, size_t slot_bytes, int nslots,
               uint64_t* data_sig_symmetric, uint64_t* ack_sig_symmetric, uint64_t step, int peer,
               int nblocks, cudaStream_t stream);
// Consumer side: block the stream until step k's data is in the local slot.
void ring_wait(uint64_t* data_sig_symmetric, uint64_t step, int nslots, int nblocks,
               cudaStream_t stream);
// Consumer side, after the compute on the slot was queued: free the slot on producer `peer`.
void ring_release(uint64_t* ack_sig_symmetric, uint64_t step, int nslots, int peer,
                  cudaStream_t stream);

}  // namespace nvshmem_ext
}  // namespace streamattn
