// Tensor-core and async-copy warp primitives (sm_80+), namespace moe_ops::warp: one spelling for
// nvcc (inline PTX) and for the SIMT host emulator (functional models, csrc/sim/warp_matrix.cpp).
//
// Layouts are the PTX ISA's (section "Warp Level Matrix Multiply-Accumulate Instructions"):
//
//   cp_async_16(dst, src, src_bytes)   cp.async.cg.shared.global [dst], [src], 16, src_bytes:
//       copies 16 bytes global -> shared without passing through registers; bytes past src_bytes
//       (0..16, the PTX src-size operand) are zero-filled, so a predicated-off row is
//       cp_async_16(dst, any_valid_ptr, 0) (nothing is read). dst and src 16-byte aligned.
//   cp_async_8(dst, src, src_bytes), cp_async_4(...)   the same with cp.async.ca (L1-cached),
//       8 / 4 bytes, src_bytes in [0, 8] / [0, 4], both addresses 8- / 4-byte aligned.
//   cp_async_commit()                  cp.async.commit_group: closes this thread's open group.
//   cp_async_wait<N>()                 cp.async.wait_group N: waits until at most the N most
//       recently committed groups of this thread are pending (N = 0: all committed ones);
//       copies never committed are not waited for. Other threads see the data only after a
//       barrier (__syncthreads) that follows the wait.
//   ldmatrix_x{1,2,4}[_trans](r..., row)
//       ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16 (PTX "Warp-level matrix load
//       instruction: ldmatrix"): loads 1/2/4 8x8 matrices of 16-bit elements from shared memory.
//       Lane l passes the address of row (l % 8) of matrix (l / 8) (x1: lanes 0-7 are read,
//       x2: 0-15, x4: all 32; the others' addresses are ignored); each row is 16 contiguous,
//       16-byte aligned bytes. Register j receives from matrix j, with g = l >> 2, t = l % 4:
//         plain:  low half = M[g][2t], high half = M[g][2t+1]  (the mma A/C-style row fragment)
//         .trans: low half = M[2t][g], high half = M[2t+1][g]  (the same of the transpose)
//   mma_m16n8k16<T>(d, a, b, c)        mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32,
//       T = __nv_bfloat16 (.bf16) or __half (.f16): D (16x8) = A (16x16) * B (16x8) + C, f32
//       accumulate. Fragments as in PTX "Matrix Fragments for mma.m16n8k16 with floating point
//       type", with g = lane >> 2, t = lane % 4, each 32-bit register holding two elements, the
//       lower column/row index in the low half:
//         a[0]: A[g][2t..2t+1]     a[1]: A[g+8][2t..2t+1]
//         a[2]: A[g][2t+8..2t+9]   a[3]: A[g+8][2t+8..2t+9]
//         b[0]: B[2t..2t+1][g]     b[1]: B[2t+8..2t+9][g]          (B is k x n, "col")
//         c/d[0..1]: C[g][2t..2t+1]   c/d[2..3]: C[g+8][2t..2t+1]
//       So ldmatrix_x4 of a row-major 16x16 A tile (lane l -> &A[l % 16][(l / 16) * 8]) gives
//       a[0..3], and ldmatrix_x2 of B stored n-major ([n][k], lane l -> &B[l % 8][(l / 8) * 8])
//       gives b[0..1]; stored k-major ([k][n]), ldmatrix_x2_trans with lane l -> &B[l % 16][0] does.
//
// ldmatrix and mma are warp collectives (.sync.aligned): every lane of the warp executes the same
// one, converged; the emulator raises if a lane has returned or is elsewhere (docs/sim.md).
//
// Under nvcc the bodies need sm_80 (cp.async, bf16 mma); an older target still compiles and
// traps if a primitive is reached. Shared-memory ordering: ldmatrix reads what a preceding
// barrier made visible; like any shared load it needs __syncthreads/__syncwarp after the writes.
#pragma once

#include "portable.cuh"

#if defined(MOE_OPS_SIM)
#include "../sim/warp_matrix.h"
#endif
#if defined(__CUDACC_RTC__)
// NVRTC has no <cstdint>; a typedef may be repeated with the same type, so this coexists with
// any other declaration of ::uint32_t (always unsigned int on CUDA's platforms).
typedef unsigned int uint32_t;
#else
#include <cstdint>
#endif

namespace moe_ops {
namespace warp {

#if defined(__CUDACC__)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define MOE_OPS_WARP_MMA_SM80 1
#else
#define MOE_OPS_WARP_MMA_SM80 0
#endif

namespace detail {
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
}  // namespace detail

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
#if MOE_OPS_WARP_MMA_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(detail::smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_8(void* smem_dst, const void* gmem_src, int src_bytes = 8) {
#if MOE_OPS_WARP_MMA_SM80
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(detail::smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, int src_bytes = 4) {
#if MOE_OPS_WARP_MMA_SM80
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(detail::smem_u32(smem_dst)),
               "l"(__cvta_generic_to_global(gmem_src)), "r"(src_bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if MOE_OPS_WARP_MMA_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7 here");
#if MOE_OPS_WARP_MMA_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

#if MOE_OPS_WARP_MMA_SM80
#define MOE_OPS_LDMATRIX_X1(TRANS)                                               \
  asm volatile("ldmatrix.sync.aligned.m8n8.x1" TRANS ".shared.b16 {%0}, [%1];\n" \
               : "=r"(r0)                                                        \
               : "r"(detail::smem_u32(smem_row)))
#define MOE_OPS_LDMATRIX_X2(TRANS)                                                   \
  asm volatile("ldmatrix.sync.aligned.m8n8.x2" TRANS ".shared.b16 {%0, %1}, [%2];\n" \
               : "=r"(r0), "=r"(r1)                                                  \
               : "r"(detail::smem_u32(smem_row)))
#define MOE_OPS_LDMATRIX_X4(TRANS)                                                           \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" TRANS ".shared.b16 {%0, %1, %2, %3}, [%4];\n" \
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)                                      \
               : "r"(detail::smem_u32(smem_row)))
#else
#define MOE_OPS_LDMATRIX_X1(TRANS) __trap()
#define MOE_OPS_LDMATRIX_X2(TRANS) __trap()
#define MOE_OPS_LDMATRIX_X4(TRANS) __trap()
#endif

__device__ __forceinline__ void ldmatrix_x1(uint32_t& r0, const void* smem_row) { MOE_OPS_LDMATRIX_X1(""); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* smem_row) {
  MOE_OPS_LDMATRIX_X2("");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* smem_row) {
  MOE_OPS_LDMATRIX_X4("");
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r0, const void* smem_row) { MOE_OPS_LDMATRIX_X1(".trans"); }
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* smem_row) {
  MOE_OPS_LDMATRIX_X2(".trans");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  const void* smem_row) {
  MOE_OPS_LDMATRIX_X4(".trans");
}
#undef MOE_OPS_LDMATRIX_X1
#undef MOE_OPS_LDMATRIX_X2
#undef MOE_OPS_LDMATRIX_X4

template <class T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  static_assert(sizeof(T) == 0, "mma_m16n8k16<T>: T is __nv_bfloat16 or __half");
}

#if MOE_OPS_WARP_MMA_SM80
#define MOE_OPS_MMA_M16N8K16(PTX_T)                                                                                 \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T                                             \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"                         \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), \
                 "f"(c[3]))
#else
#define MOE_OPS_MMA_M16N8K16(PTX_T) __trap()
#endif

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2], const float (&c)[4]) {
  MOE_OPS_MMA_M16N8K16("bf16");
}
template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                     const float (&c)[4]) {
  MOE_OPS_MMA_M16N8K16("f16");
}
#undef MOE_OPS_MMA_M16N8K16
#undef MOE_OPS_WARP_MMA_SM80

#else  // MOE_OPS_SIM: the emulator's functional models (csrc/sim/warp_matrix.h, docs/sim.md)

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  ::moe_sim::cp_async(smem_dst, gmem_src, 16, src_bytes);
}
inline void cp_async_8(void* smem_dst, const void* gmem_src, int src_bytes = 8) {
  ::moe_sim::cp_async(smem_dst, gmem_src, 8, src_bytes);
}
inline void cp_async_4(void* smem_dst, const void* gmem_src, int src_bytes = 4) {
  ::moe_sim::cp_async(smem_dst, gmem_src, 4, src_bytes);
}
inline void cp_async_commit() { ::moe_sim::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7 here");
  ::moe_sim::cp_async_wait(N);
}

inline void ldmatrix_x1(uint32_t& r0, const void* smem_row) {
  uint32_t r[1];
  ::moe_sim::ldmatrix(1, false, r, smem_row);
  r0 = r[0];
}
inline void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* smem_row) {
  uint32_t r[2];
  ::moe_sim::ldmatrix(2, false, r, smem_row);
  r0 = r[0];
  r1 = r[1];
}
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* smem_row) {
  uint32_t r[4];
  ::moe_sim::ldmatrix(4, false, r, smem_row);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}
inline void ldmatrix_x1_trans(uint32_t& r0, const void* smem_row) {
  uint32_t r[1];
  ::moe_sim::ldmatrix(1, true, r, smem_row);
  r0 = r[0];
}
inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* smem_row) {
  uint32_t r[2];
  ::moe_sim::ldmatrix(2, true, r, smem_row);
  r0 = r[0];
  r1 = r[1];
}
inline void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* smem_row) {
  uint32_t r[4];
  ::moe_sim::ldmatrix(4, true, r, smem_row);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k16<T>: T is __nv_bfloat16 or __half");
  ::moe_sim::mma_m16n8k16(std::is_same_v<T, __half> ? ::moe_sim::MmaInput::kF16 : ::moe_sim::MmaInput::kBF16, d, a, b,
                          c);
}

#endif

}  // namespace warp
}  // namespace moe_ops
