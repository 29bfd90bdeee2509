// row_combine: out[t] = sum_j w[t,j] * y[row(t,j)], one pass, no atomics -- the kernel of
// unpermute (permute.cuh) and of capacity_combine (capacity.cuh).
//
// Dataflow: one warp per token. The lanes first resolve slot j's source row (unpermute:
// slot_rows[t*k+j]; capacity_combine: ids[t,j]*C + slot_pos[t,j]; -1 / out-of-range = skip) and
// its weight (1 when weights is None) into per-warp shared memory (any k). Then the warp sweeps the H
// columns, VEC elements per lane (16-byte loads when H and the pointers allow), keeping a
// float32 (float64 for float64 data) accumulator per element that adds the k rows strictly in j order (acc += w * y),
// and writes out[t] once in y's dtype. Same order on every run: bitwise deterministic.
#pragma once

#include "device_math.cuh"

namespace moe_ops {
namespace kern {

constexpr int kCombineWarpsPerBlock = 4;

// Dynamic shared memory of one block: per warp k source rows (int64) then k weights (<= 8 bytes).
__host__ __device__ inline size_t combine_smem_bytes(int k) {
  return static_cast<size_t>(kCombineWarpsPerBlock) * static_cast<size_t>(k) * 16;
}

struct CombineSource {
  const int* slot_rows;  // unpermute: [T*k] rows of y, or nullptr
  const int* ids;        // capacity_combine: [T, k]
  const int* slot_pos;   // capacity_combine: [T, k]
  int E;
  int C;
  long long nrows;  // rows of y (bounds check)
  bool slot_order;  // the fused layer: y is in slot order (row s), slot_rows[s] < 0 = dropped
  __device__ __forceinline__ long long row(long long s) const {
    long long r;
    if (slot_rows != nullptr) {
      r = slot_rows[s];
      if (slot_order && r >= 0) r = s;
    } else {
      const int e = ids[s], p = slot_pos[s];
      r = (e >= 0 && e < E && p >= 0 && p < C) ? static_cast<long long>(e) * C + p : -1;
    }
    return (r >= 0 && r < nrows) ? r : -1;
  }
};

template <typename T, int VEC>
__global__ void combine_kernel(const T* y, long long H, CombineSource src, const typename AccType<T>::type* weights,
                               long long num_tokens, int k, T* out) {
  using Acc = typename AccType<T>::type;
  constexpr bool kVec16 = VEC * sizeof(T) == 16;
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const long long t = static_cast<long long>(blockIdx.x) * kCombineWarpsPerBlock + warp;
  if (t >= num_tokens) return;  // whole warp
  long long* s_row = reinterpret_cast<long long*>(smem) + static_cast<long long>(warp) * k;
  Acc* s_w = reinterpret_cast<Acc*>(smem + static_cast<size_t>(kCombineWarpsPerBlock) * k * sizeof(long long)) +
             static_cast<long long>(warp) * k;
  for (int j = lane; j < k; j += 32) {
    const long long s = t * k + j;
    s_row[j] = src.row(s);
    s_w[j] = weights != nullptr ? weights[s] : Acc(1);
  }
  __syncwarp();
  T* o = out + t * H;
  for (long long c = static_cast<long long>(lane) * VEC; c < H; c += 32ll * VEC) {
    Acc acc[VEC];
    MOE_UNROLL
    for (int v = 0; v < VEC; ++v) acc[v] = Acc(0);
    for (int j = 0; j < k; ++j) {
      const long long r = s_row[j];
      if (r < 0) continue;
      const Acc w = s_w[j];
      const T* yr = y + r * H + c;
      if constexpr (kVec16) {
        T e[VEC];
        load16(yr, e);
        MOE_UNROLL
        for (int v = 0; v < VEC; ++v) acc[v] += w * to_acc<Acc>(e[v]);
      } else {
        MOE_UNROLL
        for (int v = 0; v < VEC; ++v) acc[v] += w * to_acc<Acc>(yr[v]);
      }
    }
    if constexpr (kVec16) {
      T e[VEC];
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) e[v] = from_acc<T>(acc[v]);
      store16(o + c, e);
    } else {
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) o[c + v] = from_acc<T>(acc[v]);
    }
  }
}

}  // namespace kern
}  // namespace moe_ops
