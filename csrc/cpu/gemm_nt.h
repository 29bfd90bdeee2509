// The NT ("dot-product") block GEMM, torch-free: C = A * B^T with B as the expert weights are
// stored (w_gate_up[E,2I,H], w_down[E,H,I]: each output column's weights contiguous along the
// reduction). The ops pack their activations ("A") into float32 rows once (pack_row_nt), then
// call gemm_nt_block on (expert, row-block, column-block) tiles (tile_schedule.h); the weights
// ("B") are read in their storage dtype and widened to float32 in registers, so weights are
// never copied.
//
// Determinism: every output element's float32 reduction order depends only on the reduction
// length and dtype -- never on the block shape, tile boundaries or thread count -- so results
// are bitwise identical for any scheduling.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {

// The NT kernel reads A rows packed as float32 with the reduction dim padded to a multiple of
// kKPad and zero-filled. For a bf16 B, each 16-chunk of A is stored as [8 even k | 8 odd k] so
// that one 256-bit load of 16 bf16 weights widens into two float vectors with one shift and one
// mask (no cross-lane shuffles). pack_index maps logical column k to its packed position.
constexpr int64_t kKPad = 16;
inline int64_t padded_k(int64_t K) { return (K + kKPad - 1) / kKPad * kKPad; }
inline int64_t pack_index(int64_t k, DType b_dt) {
  if (b_dt != DType::BF16) return k;
  const int64_t r = k & 15;
  return (k & ~int64_t(15)) + ((r & 1) << 3) + (r >> 1);
}
// Pack one row of K values (dtype src_dt) into dst[padded_k(K)] for a B of dtype b_dt.
void pack_row_nt(const void* src, DType src_dt, int64_t K, DType b_dt, float* dst);

// C[i*ldc + j] = sum_k A[i*lda + pk(k)] * B[j*ldb + k]   for i < M, j < N, k < K
// A: packed float32 rows (pack_row_nt layout for B's dtype), B: N rows of K values in dt.
// next (optional): the weights the caller runs next (the next tile's weight block). The first
// row block streams B from memory and prefetches, one group of rows ahead, into L1; its last
// group prefetches the first rows at next, so a chain of tiles keeps the weight stream ahead of
// the FMAs.
void gemm_nt_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K, float* C, int64_t ldc,
                   int64_t M, int64_t N, const void* next = nullptr);

}  // namespace moe_cpu
