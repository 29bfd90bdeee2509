// Planted-bug kernels: each carries ONE deliberate defect that a sanitizer build must report
// (tests/test_sanitizers.py asserts the report). Never call them outside a sanitizer run: the
// out-of-bounds ones really write past their buffers.
//
//   planted_race_kernel       a missing __syncthreads between the shared-memory writes and the
//                             neighbour reads -> ThreadSanitizer: data race
//   planted_oob_kernel        `i <= n` bound: writes out[n], one past a torch-allocated buffer
//                             -> AddressSanitizer: heap-buffer-overflow
//   planted_smem_oob_kernel   writes tile[64] of a __shared__ float[64]
//                             -> AddressSanitizer: global-buffer-overflow (statics are globals)
#pragma once

#include "kernels/portable.cuh"  // csrc/ is on the include path (csrc/sim/CMakeLists.txt)

namespace moe_ops {
namespace simtest {

constexpr int kRaceThreads = 64;

__global__ void planted_race_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float tile[kRaceThreads];
  const int t = threadIdx.x;
  tile[t] = 2.0f * x[blockIdx.x * kRaceThreads + t];
  // PLANTED BUG: a __syncthreads() belongs here; the read below races with the neighbour's write.
  out[blockIdx.x * kRaceThreads + t] = tile[(t + 1) % kRaceThreads];
}

__global__ void planted_oob_kernel(float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;  // PLANTED BUG: `<=` writes out[n]
}

__global__ void planted_smem_oob_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float tile[64];
  float* row = tile;  // through a pointer, as kernels index shared buffers (UBSan's bounds check can't see it)
  row[threadIdx.x + 1] = x[threadIdx.x];  // PLANTED BUG: thread 63 writes tile[64]
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

}  // namespace simtest
}  // namespace moe_ops
