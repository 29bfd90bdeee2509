// SIMT host emulator: the CUDA device vocabulary for host-compiled kernel sources.
//
// Included by csrc/kernels/portable.cuh when compiling with the host compiler and
// -DMOE_OPS_SIM. Execution model (runtime in csrc/sim/runtime.cpp, see docs/sim.md):
//   * every CUDA thread of a block is a real OS thread; blocks of a grid run one after another,
//     all launches are serialised by one global mutex;
//   * __syncthreads is a block barrier, warp intrinsics meet at a per-warp barrier and exchange
//     values through a per-warp buffer; a thread that returns drops out of both for the rest of
//     its block;
//   * barriers are a std::mutex plus a futex word (std::atomic::wait), so ThreadSanitizer sees
//     exactly the happens-before a __syncthreads gives (and reports a race where one is missing);
//   * function-scope `__shared__` variables are function statics (one per kernel template
//     instantiation), shared by the block's threads -- safe because one block runs at a time;
//   * int atomics are std::atomic_ref (relaxed, as CUDA atomics); the half types are the CUDA
//     toolkit's own host implementations (cuda_fp16.h / cuda_bf16.h).
#pragma once

#if defined(__CUDACC__)
#error "csrc/sim/sim.h is for the host compiler; nvcc uses the real CUDA headers"
#endif

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// The toolkit's host-side vector types (dim3, uint4, float4, make_*), exactly as CUDA lays them out.
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// ---- execution-space and storage qualifiers -------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__
// Function-scope `__shared__ T x[N];` becomes a function static: one object per kernel (template
// instantiation), shared by all threads of the running block.
#define __shared__ static
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace moe_sim {

// ---- runtime entry points (csrc/sim/runtime.cpp) ---------------------------------------------
// Runs `body(ctx)` as every thread of every block of `grid`; throws std::runtime_error on a
// kernel error after all threads stopped. `kernel` is only used to name it in messages.
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel, void (*body)(void*), void* ctx);

void* dynamic_smem();
void syncthreads();
int syncthreads_count(int pred);  // number of live threads with pred != 0
bool syncthreads_or(int pred);
bool syncthreads_and(int pred);

enum class WarpOp : int {
  kSync,
  kShfl,
  kBallot,
  kAll,
  kAny,
  kAddU,
  kAddI,
  kMinU,
  kMinI,
  kMaxU,
  kMaxI,
  kMatchAny,
  kAnd,
  kOr,
  kXor
};
// One warp collective: `value` is this lane's contribution, `src` the lane to read (kShfl).
uint64_t warp_collective(unsigned mask, WarpOp op, uint64_t value, int src);
unsigned activemask();
unsigned lane_id();
[[noreturn]] void trap(const char* what);

template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp exchange of a type over 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace moe_sim

// ---- built-in variables -----------------------------------------------------------------------
// Thread-locals set by the runtime for each emulated thread (blockDim/gridDim too: a launch's
// threads see its configuration, a host thread sees zeros).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim{0, 0, 0};
inline thread_local dim3 gridDim{0, 0, 0};
constexpr int warpSize = 32;

// ---- block synchronisation --------------------------------------------------------------------
inline void __syncthreads() { moe_sim::syncthreads(); }
inline int __syncthreads_count(int pred) { return moe_sim::syncthreads_count(pred); }
inline int __syncthreads_or(int pred) { return moe_sim::syncthreads_or(pred); }
inline int __syncthreads_and(int pred) { return moe_sim::syncthreads_and(pred); }
// Blocks run one at a time and barriers are full mutex handoffs; a fence only has to order this
// thread's own accesses for the compiler and CPU.
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { moe_sim::trap("__trap() called"); }

// ---- warp intrinsics --------------------------------------------------------------------------
inline void __syncwarp(unsigned mask = 0xffffffffu) { moe_sim::warp_collective(mask, moe_sim::WarpOp::kSync, 0, 0); }
inline unsigned __activemask() { return moe_sim::activemask(); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  const int lane = static_cast<int>(moe_sim::lane_id());
  const int src = (lane & ~(width - 1)) | (src_lane & (width - 1));
  return moe_sim::from_bits<T>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kShfl, moe_sim::to_bits(var), src));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(moe_sim::lane_id());
  const int in_seg = lane & (width - 1);
  const int src = in_seg >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return moe_sim::from_bits<T>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kShfl, moe_sim::to_bits(var), src));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = static_cast<int>(moe_sim::lane_id());
  const int in_seg = lane & (width - 1);
  const int src = in_seg + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return moe_sim::from_bits<T>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kShfl, moe_sim::to_bits(var), src));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  const int lane = static_cast<int>(moe_sim::lane_id());
  // PTX shfl.bfly: a source past the end of this width-segment gives the own value; one in an
  // earlier segment is read (CUDA documents this).
  const int max_lane = (lane & ~(width - 1)) | (width - 1);
  int src = lane ^ lane_mask;
  if (src > max_lane) src = lane;
  return moe_sim::from_bits<T>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kShfl, moe_sim::to_bits(var), src));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kBallot, pred != 0, 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kAny, pred != 0, 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kAll, pred != 0, 0));
}
// __reduce_<op>_sync on a 32-bit value (unsigned, or int for add/min/max).
#define MOE_SIM_WARP_REDUCE(NAME, T, OP)                                                                     \
  inline T NAME(unsigned mask, T v) {                                                                        \
    return static_cast<T>(moe_sim::warp_collective(mask, moe_sim::WarpOp::OP, static_cast<uint32_t>(v), 0)); \
  }
MOE_SIM_WARP_REDUCE(__reduce_add_sync, unsigned, kAddU)
MOE_SIM_WARP_REDUCE(__reduce_add_sync, int, kAddI)
MOE_SIM_WARP_REDUCE(__reduce_min_sync, unsigned, kMinU)
MOE_SIM_WARP_REDUCE(__reduce_min_sync, int, kMinI)
MOE_SIM_WARP_REDUCE(__reduce_max_sync, unsigned, kMaxU)
MOE_SIM_WARP_REDUCE(__reduce_max_sync, int, kMaxI)
MOE_SIM_WARP_REDUCE(__reduce_and_sync, unsigned, kAnd)
MOE_SIM_WARP_REDUCE(__reduce_or_sync, unsigned, kOr)
MOE_SIM_WARP_REDUCE(__reduce_xor_sync, unsigned, kXor)
#undef MOE_SIM_WARP_REDUCE
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T v) {
  return static_cast<unsigned>(moe_sim::warp_collective(mask, moe_sim::WarpOp::kMatchAny, moe_sim::to_bits(v), 0));
}

// ---- integer intrinsics -----------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) |
         __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }

// CUDA's host/device min/max overloads for the integer and float types.
#define MOE_SIM_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; } \
  inline T max(T a, T b) { return a < b ? b : a; }
MOE_SIM_MINMAX(int)
MOE_SIM_MINMAX(unsigned)
MOE_SIM_MINMAX(long)
MOE_SIM_MINMAX(unsigned long)
MOE_SIM_MINMAX(long long)
MOE_SIM_MINMAX(unsigned long long)
#undef MOE_SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline unsigned min(int a, unsigned b) { return min(static_cast<unsigned>(a), b); }
inline unsigned min(unsigned a, int b) { return min(a, static_cast<unsigned>(b)); }
inline unsigned max(int a, unsigned b) { return max(static_cast<unsigned>(a), b); }
inline unsigned max(unsigned a, int b) { return max(a, static_cast<unsigned>(b)); }

// ---- bit casts and float intrinsics (libm; the GPU's approximate ones differ in the last ulps) --
inline float __int_as_float(int x) { return moe_sim::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(static_cast<uint32_t>(moe_sim::to_bits(x))); }
inline float __uint_as_float(unsigned x) { return moe_sim::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return static_cast<uint32_t>(moe_sim::to_bits(x)); }
inline double __longlong_as_double(long long x) { return moe_sim::from_bits<double>(static_cast<uint64_t>(x)); }
inline long long __double_as_longlong(double x) { return static_cast<long long>(moe_sim::to_bits(x)); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(nearbyintf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }

// ---- read-only loads and integer atomics ------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}

namespace moe_sim {
constexpr auto kAtomicOrder = std::memory_order_relaxed;  // CUDA atomics are relaxed
// *p = v while before(old, v) holds for the value seen (a CAS loop); returns the old value.
template <typename T, typename Before>
inline T atomic_replace_while(T* p, T v, Before before) {
  std::atomic_ref<T> a(*p);
  T old = a.load(kAtomicOrder);
  while (before(old, v) && !a.compare_exchange_weak(old, v, kAtomicOrder, kAtomicOrder)) {}
  return old;
}
template <typename T>
inline T atomic_max(T* p, T v) {
  return atomic_replace_while(p, v, [](T old, T x) { return old < x; });
}
template <typename T>
inline T atomic_min(T* p, T v) {
  return atomic_replace_while(p, v, [](T old, T x) { return x < old; });
}
}  // namespace moe_sim

// Non-template overloads per type, as CUDA declares them (so `atomicAdd(unsigned_ptr, 1)` converts).
#define MOE_SIM_ATOMICS(T)                                                                                           \
  inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v, moe_sim::kAtomicOrder); }               \
  inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v, moe_sim::kAtomicOrder); }               \
  inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v, moe_sim::kAtomicOrder); }               \
  inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v, moe_sim::kAtomicOrder); }                 \
  inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v, moe_sim::kAtomicOrder); }               \
  inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v, moe_sim::kAtomicOrder); }               \
  inline T atomicMax(T* p, T v) { return moe_sim::atomic_max(p, v); }                                                \
  inline T atomicMin(T* p, T v) { return moe_sim::atomic_min(p, v); }                                                \
  inline T atomicCAS(T* p, T expected, T desired) {                                                                  \
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, moe_sim::kAtomicOrder, moe_sim::kAtomicOrder); \
    return expected; /* the old value either way */                                                                  \
  }
MOE_SIM_ATOMICS(int)
MOE_SIM_ATOMICS(unsigned)
MOE_SIM_ATOMICS(unsigned long long)
MOE_SIM_ATOMICS(long long)
#undef MOE_SIM_ATOMICS
// atomicInc/atomicDec with CUDA's wrap-around semantics (unsigned only).
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load(moe_sim::kAtomicOrder);
  while (!a.compare_exchange_weak(old, old >= limit ? 0u : old + 1, moe_sim::kAtomicOrder, moe_sim::kAtomicOrder)) {}
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load(moe_sim::kAtomicOrder);
  while (!a.compare_exchange_weak(old, (old == 0 || old > limit) ? limit : old - 1, moe_sim::kAtomicOrder,
                                  moe_sim::kAtomicOrder)) {}
  return old;
}
