// AVX512-BF16 kernels, chosen at run time: the bf16 "vnni" packed-panel GEMM (vdpbf16ps, see
// vnni_kernel.inc), the bf16 GEMM on weights as stored (vdpbf16ps, nt_bf16_kernel.inc) and the
// bf16 row combine (vcvtne2ps2bf16, see bf16_combine_kernel.inc).
//
// VNNI layout (pack_panels_vnni): panel p holds the columns [16p, 16p+16) of the logical [K, N]
// operand as K2 = ceil(K/2) rows of 16 (k even, k odd) bf16 pairs: one 512-bit load is 16
// columns x 2 reduction steps, which is what vdpbf16ps multiplies against a broadcast pair of A.
// Columns past N and the odd-K tail are zero.
//
// Each kernel is one source compiled twice: natively (AVX512F/BW/VL/DQ/BF16, used when the CPU
// has them) and through SIMDe's portable AVX-512 (avx512_bf16_emu.cpp), so the same code runs --
// and is tested -- on CPUs without AVX-512 (slowly: "auto" packing never picks vnni there, and
// the ops with an AVX2 path too use the emulation only when MOE_OPS_CPU_EMULATE_AVX512=1, for tests).
#pragma once

#include <cstdint>

namespace moe_cpu {

inline int64_t vnni_pairs(int64_t K) { return (K + 1) / 2; }

// Whether this CPU runs the AVX512-BF16 kernels natively (AVX512F/BW/VL/DQ/BF16 and the OS saves
// the zmm state); MOE_OPS_CPU_NO_AVX512 set in the environment turns it off.
bool have_avx512_bf16();
// Whether the emulated (SIMDe) build of the kernels is in this library.
bool avx512_emulation_built();
// Whether the VNNI GEMM runs here at all: natively, or emulated.
inline bool vnni_available() { return have_avx512_bf16() || avx512_emulation_built(); }
// Whether the ops that also have AVX2 code (the bf16 combine, fused_experts on bf16 weights as
// stored) use the AVX512-BF16 kernels: natively, or emulated under MOE_OPS_CPU_EMULATE_AVX512=1.
bool use_avx512_bf16();

// src: N rows of K bf16 (row stride ld elements) -> dst: num_panels(N) panels of
// vnni_pairs(K) x 16 x 2 bf16 (panel stride vnni_pairs(K) * 32 elements).
void pack_panels_vnni(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst);

// C[i*ldc + 16*p + c] = sum_k A[i*lda + k] * P[p][k/2][c][k%2]  for i < M, p < np, c < 16
// A: bf16 rows holding 2*K2 values each (an odd K's pad element must be finite: it meets a zero
// weight). Panels p are at P + p * pstride elements. Each output is one vdpbf16ps chain over
// the pairs in ascending order: independent of M, the blocking and the thread count.
void gemm_panels_vnni(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t K2,
                      int64_t np, float* C, int64_t ldc, int64_t M);

// C[i*ldc + j] = sum_k A[i*lda + k] * B[j*ldb + k]  for i < M, j < N, k < K: bf16 A rows and
// bf16 weight rows as stored (trans_b). Per output a vdpbf16ps chain over 32-wide steps of k,
// then a fixed 16 -> 1 lane reduction: independent of M, N, the blocking and the thread count.
void gemm_nt_bf16_avx512(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t K, float* C,
                         int64_t ldc, int64_t M, int64_t N);

// combine_row (combine_kernels.h) for bf16 sources and a bf16 output, bitwise the same result.
void combine_row_bf16_avx512(const void* const* src, const float* w, int n, void* out, int64_t H,
                             const void* const* next, int n_next);

}  // namespace moe_cpu
