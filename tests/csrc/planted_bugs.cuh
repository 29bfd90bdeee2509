// Planted-bug kernels: each carries ONE deliberate defect that a sanitizer build must report
// (tests/test_sanitizers.py asserts the report) or the emulator must expose (tests/test_sim_emulator.py).
// Never call the out-of-bounds ones outside a sanitizer run: they really write past their buffers.
//
//   planted_race_kernel       a missing __syncthreads between the shared-memory writes and the
//                             neighbour reads -> ThreadSanitizer: data race
//   planted_oob_kernel        `i <= n` bound: writes out[n], one past a torch-allocated buffer
//                             -> AddressSanitizer: heap-buffer-overflow
//   planted_smem_oob_kernel   writes tile[64] of a __shared__ float[64]
//                             -> AddressSanitizer: global-buffer-overflow (statics are globals)
//   tiled_gemm_kernel         a small tensor-core GEMM (cp.async pipeline, ldmatrix, mma.sync);
//                             GemmBug::kNone is correct (and runs under both sanitizers), the two
//                             planted variants must give a wrong result on the emulator:
//                             kNoWait (no cp.async.wait_group: reads the 0xff poison = NaN) and
//                             kSwappedFragment (a[1] and a[2] exchanged: a fragment index error).
//                             These two are safe to run anywhere.
#pragma once

#include "kernels/mma.cuh"  // csrc/ is on the include path (csrc/sim/CMakeLists.txt)

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

enum class GemmBug : int { kNone = 0, kNoWait = 1, kSwappedFragment = 2 };
constexpr int kGemmStride = 24;                       // elements per shared row: 48 bytes, 16-byte aligned, padded
constexpr int kGemmSmemElems = 2 * 32 * kGemmStride;  // 2 stages x (16 rows of A + 16 of B)

// C[M,N] (f32) = A[M,K] @ B[N,K]^T, M, N, K multiples of 16. One warp per 16x16 tile of C
// (grid N/16 x M/16), K in steps of 16 through a two-stage cp.async pipeline in dynamic shared
// memory (poisoned by the emulator, which is what makes a missing wait show).
template <class T, GemmBug kBug>
__global__ void tiled_gemm_kernel(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ C, int M, int N,
                                  int K) {
  MOE_DYNAMIC_SMEM(T, smem);
  const int lane = threadIdx.x;
  const int m0 = blockIdx.y * 16, n0 = blockIdx.x * 16;
  const int ktiles = K / 16;
  auto a_tile = [&](int s) { return smem + s * 32 * kGemmStride; };
  auto b_tile = [&](int s) { return smem + (s * 32 + 16) * kGemmStride; };
  // Lane l copies row l/2, elements (l%2)*8 .. +8 of both 16x16 tiles (one 16-byte chunk each).
  auto load = [&](int s, int kt) {
    const int r = lane >> 1, c = (lane & 1) * 8, k = kt * 16 + c;
    warp::cp_async_16(a_tile(s) + r * kGemmStride + c, A + static_cast<long long>(m0 + r) * K + k);
    warp::cp_async_16(b_tile(s) + r * kGemmStride + c, B + static_cast<long long>(n0 + r) * K + k);
  };
  float acc[2][4] = {};
  load(0, 0);
  warp::cp_async_commit();
  for (int kt = 0; kt < ktiles; ++kt) {
    const int s = kt & 1;
    if (kt + 1 < ktiles) load(s ^ 1, kt + 1);
    warp::cp_async_commit();  // possibly empty: "all but the newest group" is then always tile kt
    if constexpr (kBug != GemmBug::kNoWait) warp::cp_async_wait<1>();
    __syncthreads();
    // A: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) -> a[0..3]; B ([n][k]): n 0-7 k 0-7, n 0-7
    // k 8-15 -> b[0..1] of n-tile 0, the same for n 8-15 -> b[2..3].
    uint32_t a[4], b[4];
    warp::ldmatrix_x4(a[0], a[1], a[2], a[3], a_tile(s) + (lane & 15) * kGemmStride + (lane >> 4) * 8);
    warp::ldmatrix_x4(b[0], b[1], b[2], b[3],
                      b_tile(s) + ((lane >> 4) * 8 + (lane & 7)) * kGemmStride + ((lane >> 3) & 1) * 8);
    if constexpr (kBug == GemmBug::kSwappedFragment) {  // PLANTED BUG: a wrong fragment index
      const uint32_t x = a[1];
      a[1] = a[2];
      a[2] = x;
    }
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    warp::mma_m16n8k16<T>(acc[0], a, b0, acc[0]);
    warp::mma_m16n8k16<T>(acc[1], a, b1, acc[1]);
    __syncthreads();  // the next iteration's copies overwrite the other stage, read two tiles ago
  }
  const int g = lane >> 2, t = lane & 3;  // D fragment: d[0..1] row g, d[2..3] row g+8, cols 2t..2t+1
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i)
      C[static_cast<long long>(m0 + g + 8 * (i >> 1)) * N + n0 + nt * 8 + 2 * t + (i & 1)] = acc[nt][i];
}

}  // namespace simtest
}  // namespace moe_ops
