// grouped_gemm_schedule: the device-built tile schedule every CUDA grouped GEMM kernel walks, so
// a grouped GEMM is a fixed number of launches whatever E is, and nothing is read on the host.
//
// Dataflow:
//   1. gemm_schedule_kernel (one block): the user's offsets[E+1] -> offs[E+1] clamped to [0, M]
//      and made non-decreasing (a running max), exactly the CPU backend's reading, so a hostile
//      offsets tensor can never index out of bounds; then tiles[E+1] = exclusive scan of
//      ceil(rows_e / BM) (int64: M/BM + E could pass int32).
//   2. zero_outside_rows_kernel: output rows outside [offs[0], offs[E]) belong to no expert and
//      are 0 (the op's contract), written here so the GEMM kernels only touch expert rows.
//   3. a GEMM kernel, persistent: block b takes work items b, b + grid, ... < tiles[E] * n_tiles
//      and finds its expert by binary search over tiles (find_tile_expert).
#pragma once

#include "device_math.cuh"

namespace moe_ops {
namespace kern {

constexpr int kSchedThreads = 1024;

// Block-wide inclusive scan of one int64 per thread (sum, or max when IS_MAX); every thread of
// the block must call it. smem: kSchedThreads / 32 slots.
template <bool IS_MAX>
__device__ __forceinline__ long long block_inclusive_scan(long long v, long long* s_warp) {
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int nwarps = static_cast<int>(blockDim.x) >> 5;
  MOE_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned lo = __shfl_up_sync(kFullMask, static_cast<unsigned>(v & 0xffffffffll), d);
    const unsigned hi = __shfl_up_sync(kFullMask, static_cast<unsigned>(static_cast<unsigned long long>(v) >> 32), d);
    const long long o = static_cast<long long>((static_cast<unsigned long long>(hi) << 32) | lo);
    if (lane >= d) v = IS_MAX ? (o > v ? o : v) : v + o;
  }
  if (lane == 31) s_warp[warp] = v;
  __syncthreads();
  for (int w = 0; w < warp && w < nwarps; ++w) v = IS_MAX ? (s_warp[w] > v ? s_warp[w] : v) : v + s_warp[w];
  __syncthreads();  // s_warp is reused by the next scan
  return v;
}

// One block of kSchedThreads; thread i owns entries [i*per, (i+1)*per) of the E+1 offsets.
static __global__ void gemm_schedule_kernel(const int* offs_in, int E, long long M, int bm, int* offs,
                                            long long* tiles) {
  __shared__ long long s_warp[kSchedThreads / 32];
  const long long n = static_cast<long long>(E) + 1;
  const long long per = (n + kSchedThreads - 1) / kSchedThreads;
  const long long i0 = static_cast<long long>(threadIdx.x) * per < n ? static_cast<long long>(threadIdx.x) * per : n;
  const long long i1 = i0 + per < n ? i0 + per : n;
  auto clamped = [&](long long i) {
    const long long v = offs_in[i];
    return v < 0 ? 0ll : (v > M ? M : v);
  };
  long long local_max = 0;
  for (long long i = i0; i < i1; ++i) {
    const long long v = clamped(i);
    local_max = v > local_max ? v : local_max;
  }
  // A max scan cannot be made exclusive by subtraction: take the previous thread's inclusive one.
  __shared__ long long s_prev[kSchedThreads];
  s_prev[threadIdx.x] = block_inclusive_scan<true>(local_max, s_warp);
  __syncthreads();
  long long run = threadIdx.x > 0 ? s_prev[threadIdx.x - 1] : 0;
  for (long long i = i0; i < i1; ++i) {
    const long long v = clamped(i);
    run = v > run ? v : run;
    offs[i] = static_cast<int>(run);
  }
  __syncthreads();  // offs[e + 1] may belong to the next thread
  const long long e0 = i0 < E ? i0 : E, e1 = i1 < E ? i1 : E;
  long long local_tiles = 0;
  for (long long e = e0; e < e1; ++e) local_tiles += (offs[e + 1] - offs[e] + bm - 1) / bm;
  long long base = block_inclusive_scan<false>(local_tiles, s_warp) - local_tiles;
  for (long long e = e0; e < e1; ++e) {
    tiles[e] = base;
    base += (offs[e + 1] - offs[e] + bm - 1) / bm;
  }
  if (threadIdx.x == kSchedThreads - 1) tiles[E] = base;
}

// Largest e in [0, E) with tiles[e] <= t (empty experts share their successor's start, so the
// largest such e is the one that owns tile t).
__device__ __forceinline__ int find_tile_expert(const long long* tiles, int E, long long t) {
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (tiles[mid] <= t) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
static __global__ void zero_outside_rows_kernel(const int* offs, int E, long long M, long long N, T* c) {
  const long long lo = offs[0], hi = offs[E];
  const long long outside = lo + (M - hi);
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < outside * N; i += stride) {
    const long long q = i / N, col = i - q * N;
    const long long row = q < lo ? q : hi + (q - lo);
    c[row * N + col] = from_acc<T>(typename AccType<T>::type(0));
  }
}

}  // namespace kern
}  // namespace moe_ops
