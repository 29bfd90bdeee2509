// Torch-free CPU compute kernels shared by the moe_ops CPU ops (see kernels.cpp).
//
// Dataflow: the ops pack their left-hand operand ("A": activations) into float32 rows once,
// then call the block GEMMs below on (expert, row-block, column-block) tiles; the right-hand
// operand ("B": expert weights) is read in its storage dtype and widened to float32 in registers,
// so weights are never copied. Row helpers move/accumulate rows between dtypes for
// permute/unpermute/combine.
//
// Determinism: every output element's float32 reduction order depends only on the reduction
// length and dtype -- never on the block shape, tile boundaries or thread count -- so results
// are bitwise identical for any scheduling.
#pragma once

#include <cstdint>

namespace moe_cpu {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int64_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// Whether the AVX2+FMA+F16C kernels run on this CPU (else portable scalar code, same results
// up to FMA contraction).
bool have_avx2();

// ------------------------------------------------------------------------------ row helpers
// dst[i] = float(src[i])
void row_to_f32(const void* src, DType dt, float* dst, int64_t n);
// dst[i] = round_to_dt(src[i])  (round to nearest even)
void row_from_f32(const float* src, void* dst, DType dt, int64_t n);
// x rounded through dt and back to float (models storing an intermediate in dt)
float round_through(float x, DType dt);

// --------------------------------------------------------------------------- GEMM packing
// The "NT" kernel reads A rows packed as float32 with the reduction dim padded to a multiple of
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
void gemm_nt_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K,
                   float* C, int64_t ldc, int64_t M, int64_t N, const void* next = nullptr);

// C[i*ldc + j] = sum_r A[i*lda + r] * B[r*ldb + j]   for i < M, j < N, r < R (r ascending)
// A: float32 rows (any lda), B: R rows of N contiguous values in dt.
void gemm_nn_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R,
                   float* C, int64_t ldc, int64_t M, int64_t N);

// --------------------------------------------------------------- packed-panel ("P") GEMM
// Weights repacked once (pack_panels) into column panels of kPanel=16: panel p holds the
// columns [16p, 16p+16) of the logical [K, N] operand as K rows of 16 values (zero-padded past
// N), contiguous, in the weights' dtype. The P kernel broadcasts one A element per row and
// multiplies it with a whole panel row (bf16: one 256-bit load widened by shift / mask into
// the even and odd columns), so it needs ~1/2 the loads per FMA of the NT kernel and reaches
// the FMA peak; each output element is one FMA chain over k ascending -- the result depends
// only on K, never on the blocking or the thread count.
constexpr int64_t kPanel = 16;
inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }
// src: N rows of K values (row stride ld elements) in dt -> dst: num_panels(N) panels of
// K x 16 values in dt (panel stride K*16 elements).
void pack_panels(const void* src, DType dt, int64_t N, int64_t K, int64_t ld, void* dst);
// C[i*ldc + 16*p + c] = sum_k A[i*lda + k] * P[p][k][c]   for i < M, p < np, c < 16
// A: plain float32 rows. Panels p are at P + p * pstride elements (pstride >= K*16). next
// (optional): the panels the caller runs after this call, prefetched during the first row block.
void gemm_panels(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K,
                 int64_t np, float* C, int64_t ldc, int64_t M, const void* next = nullptr);

// Router scores of one row of n float32 logits (topk_gating): softmax (max-subtracted exp, 8-lane
// sum in a fixed order, then x/sum) or sigmoid 1/(1+exp(-x)), with libm's exp at +-inf and in the
// denormal range (sigmoid(-inf) = 0, as torch). Return false, writing nothing
// meaningful, when the row holds a NaN (the caller's scalar path defines that case) or the CPU
// lacks AVX2 (the caller's scalar path is the portable version).
bool softmax_row_f32(const float* x, float* out, int64_t n);
bool sigmoid_row_f32(const float* x, float* out, int64_t n);

// Gated activations on float32 (values already rounded through the model dtype by the caller).
float silu_f32(float x);
float gelu_f32(float x);

// out[i] = round_dt(act(round_dt(gate[i])) * round_dt(up[i])), act = silu (swiglu) or exact gelu:
// the unfused pipeline's rounding (h stored in dt, activation in float32, result stored in dt).
void gated_act_rows(const float* gate, const float* up, float* out, int64_t n, DType dt, bool swiglu);
// gated_act_rows on `rows` rows of `cols` values: gate/up rows ldi apart, out rows ldo apart.
void gated_act_block(const float* gate, const float* up, int64_t ldi, float* out, int64_t ldo, int64_t rows,
                     int64_t cols, DType dt, bool swiglu);
// dst[i] = round_dt(src[i]) kept as float32.
void round_rows(const float* src, float* dst, int64_t n, DType dt);

}  // namespace moe_cpu
