// The broadcast-form block GEMMs, torch-free: on weights repacked once into 16-column panels
// (pack_panels, gemm_panels: the fused_experts_packed path), and on a B whose rows run along the
// output dim (gemm_nn_block: grouped_gemm with trans_b=False and the weight gradient), whose
// 16-column groups are panels with B's own row stride.
//
// Panel layout: panel p holds the columns [16p, 16p+16) of the logical [K, N] operand as K rows
// of 16 values (zero-padded past N), contiguous, in the weights' dtype. The kernel broadcasts one
// A element per row and multiplies it with a whole panel row (bf16: one 256-bit load widened by
// shift / mask into the even and odd columns), so it needs about half the loads per FMA of the NT
// kernel (gemm_nt.h); each output element is one FMA chain over k ascending -- the result depends
// only on K, never on the blocking or the thread count.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {

constexpr int64_t kPanel = 16;
inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }
// src: N rows of K values (row stride ld elements) in dt -> dst: num_panels(N) panels of
// K x 16 values in dt (panel stride K*16 elements).
void pack_panels(const void* src, DType dt, int64_t N, int64_t K, int64_t ld, void* dst);
// C[i*ldc + 16*p + c] = sum_k A[i*lda + k] * P[p][k][c]   for i < M, p < np, c < 16
// A: plain float32 rows. Panels p are at P + p * pstride elements (pstride >= K*16). next
// (optional): the panels the caller runs after this call, prefetched during the first row block.
void gemm_panels(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K, int64_t np, float* C,
                 int64_t ldc, int64_t M, const void* next = nullptr);

// C[i*ldc + j] = sum_r A[i*lda + r] * B[r*ldb + j]   for i < M, j < N, r < R (r ascending)
// A: float32 rows (any lda), B: R rows of N contiguous values in dt.
void gemm_nn_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R, float* C, int64_t ldc,
                   int64_t M, int64_t N);

}  // namespace moe_cpu
