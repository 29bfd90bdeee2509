// device_math: the arithmetic every moe_ops kernel (csrc/kernels/*.cuh) shares.
//
// Dataflow: none of its own. It holds what must behave identically under nvcc and under the
// SIMT host emulator (-DMOE_OPS_SIM): dtype <-> float conversion, a total order on float keys
// (NaN lowest, ties to the lower index) packed into one 64-bit integer so a plain integer max is
// an arg-max, warp reductions built from 32-bit shuffles only, 16-byte vector loads/stores, and
// an unroll pragma that host compilers understand.
#pragma once

#include <stdint.h>
#include <math.h>
#include <string.h>

#include "portable.cuh"

#ifndef __host__  // the emulator defines __device__ but need not define __host__
#define __host__
#endif

#if defined(__CUDACC__) || defined(__clang__)
#define MOE_UNROLL _Pragma("unroll")
#else
#define MOE_UNROLL _Pragma("GCC unroll 32")
#endif

namespace moe_ops {
namespace kern {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// ---------------------------------------------------------------------------- dtype conversion

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_f32<double>(float v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The accumulator of every reduction over data (combine, GEMM): float32, except float64 data
// stays float64 (as the reference does, so gradcheck holds).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T v) {
  return to_f32(v);
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) {
  return v;
}
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc v) {
  return from_f32<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double, double>(double v) {
  return v;
}

// ------------------------------------------------------------------------------- ordered keys

__device__ __forceinline__ uint32_t float_bits(float f) {
#if defined(__CUDACC__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

__device__ __forceinline__ bool is_nan(float f) { return f != f; }

// Monotone map float -> uint32 for the contract's ranking: larger key = better. NaN maps to 1,
// below -inf (0x007fffff); 0 is reserved for "taken / not an expert". -0.0 and +0.0 are equal
// keys (as torch compares them), so they tie and the lower index wins.
constexpr uint32_t kKeyTaken = 0u;
constexpr uint32_t kKeyNaN = 1u;

__device__ __forceinline__ uint32_t order_key(float f) {
  if (is_nan(f)) return kKeyNaN;
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// (key, index) packed so that the integer maximum is the best element: ties go to the lower
// index because the index is stored complemented.
__device__ __forceinline__ unsigned long long pack_key(uint32_t key, uint32_t index) {
  return (static_cast<unsigned long long>(key) << 32) | static_cast<unsigned long long>(~index);
}
__device__ __forceinline__ uint32_t packed_index(unsigned long long p) {
  return ~static_cast<uint32_t>(p & 0xffffffffull);
}

// ----------------------------------------------------------------------------- warp reductions

// 64-bit values cross lanes as two 32-bit shuffles (the emulator's shuffle set is 32-bit).
__device__ __forceinline__ unsigned long long shfl_xor_u64(unsigned long long v, int mask) {
  unsigned lo = static_cast<unsigned>(v & 0xffffffffull);
  unsigned hi = static_cast<unsigned>(v >> 32);
  lo = __shfl_xor_sync(kFullMask, lo, mask);
  hi = __shfl_xor_sync(kFullMask, hi, mask);
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
  MOE_UNROLL
  for (int m = 16; m > 0; m >>= 1) {
    const unsigned long long o = shfl_xor_u64(v, m);
    v = o > v ? o : v;
  }
  return v;
}

// Butterfly reductions leave the identical value in every lane (each step combines the same two
// operands on both partner lanes), so all lanes agree bit for bit.
__device__ __forceinline__ float warp_max_f32(float v) {
  MOE_UNROLL
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, m));
  return v;
}

__device__ __forceinline__ float warp_sum_f32(float v) {
  MOE_UNROLL
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Inclusive prefix sum over the warp's lanes.
__device__ __forceinline__ int warp_inclusive_scan(int v, int lane) {
  MOE_UNROLL
  for (int d = 1; d < 32; d <<= 1) {
    const int o = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += o;
  }
  return v;
}

// 16 bytes <-> N elements. On the GPU one 128-bit access; in the emulator memcpy, because
// reading a uint4 through a T* breaks C++ aliasing rules (GCC then drops the load at -O2).
template <typename T, int N>
__device__ __forceinline__ void load16(const T* src, T (&dst)[N]) {
  static_assert(N * sizeof(T) == 16, "load16 moves exactly 16 bytes");
#if defined(__CUDACC__)
  const uint4 raw = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&raw);
  MOE_UNROLL
  for (int v = 0; v < N; ++v) dst[v] = e[v];
#else
  memcpy(dst, src, 16);
#endif
}

template <typename T, int N>
__device__ __forceinline__ void store16(T* dst, const T (&src)[N]) {
  static_assert(N * sizeof(T) == 16, "store16 moves exactly 16 bytes");
#if defined(__CUDACC__)
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
  MOE_UNROLL
  for (int v = 0; v < N; ++v) e[v] = src[v];
  *reinterpret_cast<uint4*>(dst) = raw;
#else
  memcpy(dst, src, 16);
#endif
}

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace kern
}  // namespace moe_ops
