// row_gather: out[r, :] = map[r] >= 0 ? src[map[r] / div, :] : 0 -- the data movement of permute
// (map = sorted_slots, div = k) and of capacity_dispatch (map = buffer row -> slot, div = k).
//
// Dataflow: one warp per output row; the row is moved as words of type W (uint4 = 16 bytes when
// the row length and both base pointers allow it, else the widest of 8/4/2/1 bytes that does),
// lanes striding over the words so each warp access is one contiguous 512-byte transaction.
// Dtype-agnostic: rows are bytes. Padding rows are written as zero bytes (0.0 in every format).
#pragma once

#include "device_math.cuh"

namespace moe_ops {
namespace kern {

constexpr int kGatherWarpsPerBlock = 8;

template <typename W>
__device__ __forceinline__ W zero_word() {
  return W(0);
}
template <>
__device__ __forceinline__ uint4 zero_word<uint4>() {
  return make_uint4(0u, 0u, 0u, 0u);
}
template <>
__device__ __forceinline__ uint2 zero_word<uint2>() {
  return make_uint2(0u, 0u);
}

template <typename W>
__global__ void gather_rows_kernel(const unsigned char* src, unsigned char* dst, long long nrows, long long row_bytes,
                                   const int* map, int div) {
  const long long r = static_cast<long long>(blockIdx.x) * kGatherWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= nrows) return;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const long long nw = row_bytes / static_cast<long long>(sizeof(W));
  W* d = reinterpret_cast<W*>(dst + r * row_bytes);
  const int m = map[r];
  if (m < 0) {
    const W z = zero_word<W>();
    for (long long i = lane; i < nw; i += 32) d[i] = z;
  } else {
    const W* s = reinterpret_cast<const W*>(src + static_cast<long long>(m / div) * row_bytes);
    for (long long i = lane; i < nw; i += 32) d[i] = s[i];
  }
}

}  // namespace kern
}  // namespace moe_ops
