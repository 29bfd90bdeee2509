// The NT ("dot-product") block GEMM on weights as stored, and the packing of its A operand (see
// gemm_nt.h).
//
// Dataflow of a call: A (float32, packed by the op with pack_row_nt) x B (weight rows, read in
// place in their dtype) -> C (float32 scratch tile; the op rounds/stores it). C[i,j] = <A_i, B_j>
// with B rows contiguous along the reduction -- the layout of HF/moe_ops weights
// (w_gate_up[E,2I,H], w_down[E,H,I], trans_b). Register tiles of 8-lane accumulators (6x2, 4x3,
// 3x3, 2x4, 1x4), one horizontal sum per output; bf16 weights widen with shift/mask only. The
// AVX2 code is chosen at run time (cpu_features.h); portable scalar code otherwise.
#include "gemm_nt.h"

#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "row_io.h"
#include "scalar_io.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

using io::load_scalar;

void gemm_nt_scalar(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K, float* C, int64_t ldc,
                    int64_t M, int64_t N) {
  const int64_t es = dtype_size(dt);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const void* b = static_cast<const char*>(B) + j * ldb * es;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(A[i * lda + pack_index(k, dt)], load_scalar(b, dt, k), acc);
      C[i * ldc + j] = acc;
    }
}

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

using avx2::for_row_blocks;
using avx2::hsum;
using avx2::load8;

// ---- NT micro-kernel: MR rows of packed A times NR weight rows, full reduction over K.
// f32/f16: chunks of 8 (A unpermuted). bf16: chunks of 16 as [even | odd] halves, widened with
// one shift (even) and one mask (odd) of the same 256-bit load: no shuffles.
//
// Addressing: rows 0-2 of A are a0 + {0,1,2}*la and rows 3-5 a3 + {0,1,2}*la (base + index*scale
// operands), B rows b + {0..NR-1}*lb, so the loop keeps every pointer in a register (no spills)
// and each A vector is loaded once per chunk. Per chunk the loop also prefetches (into L1) one
// line per weight row of `next`, the weight panel the caller runs after this one: a tile's first
// row block streams its weights from DRAM, and a stream the hardware prefetcher picks up anew at
// every 4 KiB page (one weight row is 2-4 KiB) would otherwise stall at the start of each row.
template <DType DT, int MR, int NR, bool kNext>
void micro_nt(const float* A, int64_t lda, const char* B, int64_t lb, int64_t K, float* C, int64_t ldc,
              const char* next) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  constexpr int64_t CH = DT == DType::BF16 ? 16 : 8;
  constexpr int64_t kStepBytes = CH * es;                               // bytes of one weight row per chunk
  constexpr int64_t kPfEvery = kStepBytes >= 64 ? 1 : 64 / kStepBytes;  // chunks per cache line
  const int64_t kfull = K / CH * CH;
  alignas(32) char tail[NR][32];
  if (kfull < K) {
    for (int j = 0; j < NR; ++j) {
      std::memset(tail[j], 0, sizeof(tail[j]));
      std::memcpy(tail[j], B + j * lb + kfull * es, (K - kfull) * es);
    }
  }
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t la = lda * 4;
  const char* a0 = reinterpret_cast<const char*>(A);
  const char* a3 = a0 + 3 * la;
  const char* b = B;
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto row = [&](int i) { return i < 3 ? a0 + i * la : a3 + (i - 3) * la; };
  auto step = [&](const char* const* bp, int64_t aoff) {
    if constexpr (DT == DType::BF16) {
      __m256 bv[NR];
      for (int j = 0; j < NR; ++j)
        bv[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp[j])), 16));
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_loadu_ps(reinterpret_cast<const float*>(row(i) + aoff));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(a, bv[j], acc[i][j]);
      }
      for (int j = 0; j < NR; ++j)
        bv[j] =
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp[j])), hi_mask));
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_loadu_ps(reinterpret_cast<const float*>(row(i) + aoff + 32));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(a, bv[j], acc[i][j]);
      }
    } else {
      __m256 bv[NR];
      for (int j = 0; j < NR; ++j) bv[j] = load8<DT>(bp[j]);
      for (int i = 0; i < MR; ++i) {
        const __m256 a = _mm256_loadu_ps(reinterpret_cast<const float*>(row(i) + aoff));
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(a, bv[j], acc[i][j]);
      }
    }
  };
  const int64_t steps = kfull / CH;
  const char* bp[NR];
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (kNext) {
      if (s % kPfEvery == 0)
        for (int j = 0; j < NR; ++j) _mm_prefetch(next + j * lb + s * kStepBytes, _MM_HINT_T0);
    }
    for (int j = 0; j < NR; ++j) bp[j] = b + j * lb;
    step(bp, 0);
    a0 += CH * 4;
    a3 += CH * 4;
    b += kStepBytes;
  }
  if (kfull < K) {
    for (int j = 0; j < NR; ++j) bp[j] = tail[j];
    step(bp, 0);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = hsum(acc[i][j]);
}

// Register blocks: 6x2 / 5x2 for tall blocks (12 accumulators + 2 weight vectors + 1 A vector;
// the bf16 mask is a memory operand), 4x3 and 3x3 for the remainders, 1-2 rows (decode) x4 columns
// (more independent FMA chains per streamed weight row).
template <int MR>
constexpr int nt_cols() {
  return MR >= 5 ? 2 : MR >= 3 ? 3 : 4;
}

// One row block of MR rows against all N columns of the block. `first`: this row block is the
// first pass over these weights, so each micro call prefetches the next column group's rows
// (the last one prefetches `after`: the first rows of the next tile's weight block, if any).
template <DType DT, int MR>
void nt_rows(const float* A, int64_t lda, const char* B, int64_t lb, int64_t K, float* C, int64_t ldc, int64_t N,
             bool first, const char* after) {
  constexpr int NR = nt_cols<MR>();
  int64_t j = 0;
  for (; j + NR <= N; j += NR) {
    const char* nx = j + 2 * NR <= N ? B + (j + NR) * lb : (j + NR < N ? nullptr : after);
    if (first && nx) micro_nt<DT, MR, NR, true>(A, lda, B + j * lb, lb, K, C + j, ldc, nx);
    else micro_nt<DT, MR, NR, false>(A, lda, B + j * lb, lb, K, C + j, ldc, nullptr);
  }
  const char* bj = B + j * lb;
  if constexpr (NR > 3)
    if (N - j == 3) {
      micro_nt<DT, MR, 3, false>(A, lda, bj, lb, K, C + j, ldc, nullptr);
      return;
    }
  if constexpr (NR > 2)
    if (N - j == 2) {
      micro_nt<DT, MR, 2, false>(A, lda, bj, lb, K, C + j, ldc, nullptr);
      return;
    }
  if (N - j == 1) micro_nt<DT, MR, 1, false>(A, lda, bj, lb, K, C + j, ldc, nullptr);
}

template <DType DT>
void gemm_nt_avx(const float* A, int64_t lda, const void* Bv, int64_t ldb, int64_t K, float* C, int64_t ldc, int64_t M,
                 int64_t N, const void* pfv) {
  const char* B = static_cast<const char*>(Bv);
  const char* after = static_cast<const char*>(pfv);
  const int64_t lb = ldb * (DT == DType::F32 ? 4 : 2);
  // The first row block streams the weights from memory: it prefetches.
  for_row_blocks(
      M, [&]<int MR>(int64_t i) { nt_rows<DT, MR>(A + i * lda, lda, B, lb, K, C + i * ldc, ldc, N, i == 0, after); });
}

// bf16 row -> packed [even | odd] float32 chunks of 16: the same shift/mask as the NT kernel.
void pack_bf16_avx(const void* src, int64_t K, float* dst) {
  const char* s = static_cast<const char*>(src);
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K; k += 16) {
    __m256i v;
    if (k + 16 <= K) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k * 2));
    } else {
      alignas(32) char t[32] = {0};
      std::memcpy(t, s + k * 2, (K - k) * 2);
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
    }
    _mm256_storeu_ps(dst + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    _mm256_storeu_ps(dst + k + 8, _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)));
  }
}

MOE_AVX2_END
#endif  // MOE_CPU_X86

}  // namespace

void pack_row_nt(const void* src, DType src_dt, int64_t K, DType b_dt, float* dst) {
  const int64_t Kp = padded_k(K);
  if (b_dt != DType::BF16) {
    row_to_f32(src, src_dt, dst, K);
    for (int64_t k = K; k < Kp; ++k) dst[k] = 0.f;
    return;
  }
#ifdef MOE_CPU_X86
  if (src_dt == DType::BF16 && have_avx2()) {
    pack_bf16_avx(src, K, dst);
    for (int64_t k = (K + 15) / 16 * 16; k < Kp; ++k) dst[k] = 0.f;
    return;
  }
#endif
  alignas(32) float chunk[16];
  for (int64_t k0 = 0; k0 < Kp; k0 += 16) {
    const int64_t n = K - k0 < 16 ? (K - k0 > 0 ? K - k0 : 0) : 16;
    for (int64_t l = n; l < 16; ++l) chunk[l] = 0.f;
    if (n > 0) row_to_f32(static_cast<const char*>(src) + k0 * dtype_size(src_dt), src_dt, chunk, n);
    for (int l = 0; l < 8; ++l) {
      dst[k0 + l] = chunk[2 * l];
      dst[k0 + 8 + l] = chunk[2 * l + 1];
    }
  }
}

void gemm_nt_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K, float* C, int64_t ldc,
                   int64_t M, int64_t N, const void* next) {
  if (M <= 0 || N <= 0) return;
  MOE_CPU_RETURN_IF_AVX2(dt, gemm_nt_avx, A, lda, B, ldb, K, C, ldc, M, N, next);
  gemm_nt_scalar(A, lda, B, dt, ldb, K, C, ldc, M, N);
}

}  // namespace moe_cpu
