// The broadcast-form ("P") block GEMMs: packed panels and B read as panels in place (see
// gemm_panels.h).
//
// Dataflow of a call: row blocks of A (float32) x panels (weights in their dtype, one contiguous
// K*16 stream per panel, which the hardware prefetcher follows across pages) -> C (float32
// scratch tile). Per k step: one panel-row load, one broadcast of A per row, 2 FMAs per row. The
// NN kernel runs the same micro-kernel on 16-column groups of B's own rows and an 8-wide / scalar
// kernel with the same per-element FMA chain on the last N % 16 columns. AVX2 chosen at run time
// (cpu_features.h); portable scalar code otherwise.
#include "gemm_panels.h"

#include <algorithm>
#include <cmath>

#include "cpu_features.h"
#include "scalar_io.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

using io::load_scalar;

void gemm_panels_scalar(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K, int64_t np,
                        float* C, int64_t ldc, int64_t M) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = 0; p < np; ++p)
      for (int64_t c = 0; c < kPanel; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k)
          acc = std::fma(A[i * lda + k], load_scalar(P, dt, p * pstride + k * kPanel + c), acc);
        C[i * ldc + p * kPanel + c] = acc;
      }
}
void gemm_nn_scalar(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R, float* C, int64_t ldc,
                    int64_t M, int64_t N) {
  const int64_t es = dtype_size(dt);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r)
        acc = std::fma(A[i * lda + r], load_scalar(static_cast<const char*>(B) + r * ldb * es, dt, j), acc);
      C[i * ldc + j] = acc;
    }
}

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

using avx2::for_row_blocks;
using avx2::load8;

// ---- P micro-kernel: MR rows x NP panels of 16 columns; per k one broadcast per row, one
// 256-bit (bf16/f16) or two (f32) panel-row loads per panel, 2*MR*NP FMAs. The accumulators are
// named through fully unrolled loops so GCC keeps them in registers (an array it cannot scalarize
// would be stored to the stack every iteration).
template <DType DT>
inline void load_panel_row(const char* b, __m256& lo, __m256& hi) {
  if constexpr (DT == DType::BF16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));                                               // even columns
    hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));  // odd
  } else {
    constexpr int64_t es = DT == DType::F32 ? 4 : 2;
    lo = load8<DT>(b);
    hi = load8<DT>(b + 8 * es);
  }
}

// Stores one row of a panel's 16 results in column order (bf16 accumulators hold even / odd
// columns: interleave them back).
template <DType DT>
inline void store_panel_row(float* c, __m256 lo, __m256 hi) {
  if constexpr (DT == DType::BF16) {
    const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
    _mm256_storeu_ps(c, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(c + 8, _mm256_permute2f128_ps(a, b, 0x31));
  } else {
    _mm256_storeu_ps(c, lo);
    _mm256_storeu_ps(c + 8, hi);
  }
}

// rs: bytes from one k row of a panel to the next (16 * element size for packed panels; the
// row stride of B when the NN kernel runs this micro-kernel on B's own rows).
template <DType DT, int MR, int NP, bool kNext>
void micro_p(const float* A, int64_t lda, const char* P, int64_t pstride, int64_t rs, int64_t K, float* C, int64_t ldc,
             const char* next) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  constexpr int64_t rb = kPanel * es;                   // bytes of one panel row
  constexpr int64_t kPfEvery = rb >= 64 ? 1 : 64 / rb;  // k steps per cache line
  __m256 acc[MR][NP][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) acc[i][p][0] = acc[i][p][1] = _mm256_setzero_ps();
  const int64_t la = lda * 4;
  const char* a0 = reinterpret_cast<const char*>(A);
  const char* a3 = a0 + 3 * la;
  const char* b = P;
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (kNext) {
      if (k % kPfEvery == 0)
#pragma GCC unroll 4
        for (int p = 0; p < NP; ++p) _mm_prefetch(next + p * pstride + k * rb, _MM_HINT_T0);
    }
    __m256 lo[NP], hi[NP];
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) load_panel_row<DT>(b + p * pstride, lo[p], hi[p]);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(reinterpret_cast<const float*>(i < 3 ? a0 + i * la : a3 + (i - 3) * la));
#pragma GCC unroll 4
      for (int p = 0; p < NP; ++p) {
        acc[i][p][0] = _mm256_fmadd_ps(a, lo[p], acc[i][p][0]);
        acc[i][p][1] = _mm256_fmadd_ps(a, hi[p], acc[i][p][1]);
      }
    }
    a0 += 4;
    a3 += 4;
    b += rs;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < NP; ++p) store_panel_row<DT>(C + i * ldc + p * kPanel, acc[i][p][0], acc[i][p][1]);
}

// One row block against np panels: single panels for 3+ rows (2*MR accumulators), pairs for 1-2
// rows (decode: 4 independent chains per row to cover the FMA latency). first: the first pass
// over these weights (they stream from memory): prefetch the next panels one call ahead.
template <DType DT, int MR>
void p_rows(const float* A, int64_t lda, const char* P, int64_t pstride, int64_t rs, int64_t K, int64_t np, float* C,
            int64_t ldc, bool first, const char* after) {
  constexpr int NP = MR <= 2 ? 2 : 1;
  int64_t p = 0;
  for (; p + NP <= np; p += NP) {
    const char* nx = p + 2 * NP <= np ? P + (p + NP) * pstride : (p + NP < np ? nullptr : after);
    if (first && nx) micro_p<DT, MR, NP, true>(A, lda, P + p * pstride, pstride, rs, K, C + p * kPanel, ldc, nx);
    else micro_p<DT, MR, NP, false>(A, lda, P + p * pstride, pstride, rs, K, C + p * kPanel, ldc, nullptr);
  }
  if (p < np) {  // a last single panel (np odd for 1-2 rows, or a one-panel tile): prefetch `after`
    if (first && after) micro_p<DT, MR, 1, true>(A, lda, P + p * pstride, pstride, rs, K, C + p * kPanel, ldc, after);
    else micro_p<DT, MR, 1, false>(A, lda, P + p * pstride, pstride, rs, K, C + p * kPanel, ldc, nullptr);
  }
}

// All row blocks of M rows against np panels (ps: bytes between panels, rs: between k rows).
template <DType DT>
void p_blocks(const float* A, int64_t lda, const char* P, int64_t ps, int64_t rs, int64_t K, int64_t np, float* C,
              int64_t ldc, int64_t M, bool prefetch, const char* after) {
  // The first row block streams the weights from memory: it prefetches (only packed panels,
  // rs = 16 elements, are laid out for that prefetch).
  for_row_blocks(M, [&]<int MR>(int64_t i) {
    p_rows<DT, MR>(A + i * lda, lda, P, ps, rs, K, np, C + i * ldc, ldc, prefetch && i == 0, after);
  });
}

template <DType DT>
void gemm_panels_avx(const float* A, int64_t lda, const void* Pv, int64_t pstride, int64_t K, int64_t np, float* C,
                     int64_t ldc, int64_t M, const void* nextv) {
  const char* P = static_cast<const char*>(Pv);
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  p_blocks<DT>(A, lda, P, pstride * es, kPanel * es, K, np, C, ldc, M, true, static_cast<const char*>(nextv));
}

// ---- NN micro-kernel: MR rows x (NV*8) columns, r ascending, one FMA chain per element.
template <DType DT, int MR, int NV>
void micro_nn(const float* A, int64_t lda, const char* B, int64_t ldb_bytes, int64_t R, float* C, int64_t ldc) {
  __m256 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  for (int64_t r = 0; r < R; ++r) {
    __m256 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load8<DT>(B + r * ldb_bytes + v * 8 * es);
    for (int i = 0; i < MR; ++i) {
      __m256 a = _mm256_broadcast_ss(A + i * lda + r);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + i * ldc + v * 8, acc[i][v]);
}

template <DType DT, int MR>
void nn_rows(const float* A, int64_t lda, const char* B, int64_t ldb_bytes, int64_t R, float* C, int64_t ldc, int64_t N,
             int64_t j) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  for (; j + 8 <= N; j += 8) micro_nn<DT, MR, 1>(A, lda, B + j * es, ldb_bytes, R, C + j, ldc);
  // Remaining columns: scalar std::fma in the same r order == the vector lanes' result.
  for (; j < N; ++j)
    for (int i = 0; i < MR; ++i) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r) acc = std::fma(A[i * lda + r], load_scalar(B + r * ldb_bytes, DT, j), acc);
      C[i * ldc + j] = acc;
    }
}

// Columns in 16-wide groups run the P micro-kernel on B's own rows (a 16-column group of B rows
// is a panel with row stride ldb: same single-FMA-chain arithmetic as micro_nn, at the FMA
// peak); the last N % 16 columns use micro_nn / scalar FMAs in the same r order.
template <DType DT>
void gemm_nn_avx(const float* A, int64_t lda, const void* Bv, int64_t ldb, int64_t R, float* C, int64_t ldc, int64_t M,
                 int64_t N) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  const char* B = static_cast<const char*>(Bv);
  const int64_t ldb_bytes = ldb * es;
  const int64_t np = N / kPanel, j0 = np * kPanel;
  if (np > 0) p_blocks<DT>(A, lda, B, kPanel * es, ldb_bytes, R, np, C, ldc, M, false, nullptr);
  if (j0 == N) return;
  for_row_blocks(
      M, [&]<int MR>(int64_t i) { nn_rows<DT, MR>(A + i * lda, lda, B, ldb_bytes, R, C + i * ldc, ldc, N, j0); });
}

MOE_AVX2_END
#endif  // MOE_CPU_X86

// Blocked transpose (16 weight rows x 64 k at a time) so both sides stream through L1.
template <class T>
void pack_panels_t(const T* s, int64_t N, int64_t K, int64_t ld, T* d) {
  const int64_t np = num_panels(N);
  for (int64_t p = 0; p < np; ++p) {
    T* dp = d + p * K * kPanel;
    const int64_t cols = std::min<int64_t>(kPanel, N - p * kPanel);
    const T* sp = s + p * kPanel * ld;
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t k1 = std::min<int64_t>(K, k0 + 64);
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t k = k0; k < k1; ++k) dp[k * kPanel + c] = sp[c * ld + k];
      for (int64_t c = cols; c < kPanel; ++c)
        for (int64_t k = k0; k < k1; ++k) dp[k * kPanel + c] = T(0);
    }
  }
}
}  // namespace

void pack_panels(const void* src, DType dt, int64_t N, int64_t K, int64_t ld, void* dst) {
  if (dt == DType::F32) pack_panels_t(static_cast<const uint32_t*>(src), N, K, ld, static_cast<uint32_t*>(dst));
  else pack_panels_t(static_cast<const uint16_t*>(src), N, K, ld, static_cast<uint16_t*>(dst));
}

void gemm_panels(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K, int64_t np, float* C,
                 int64_t ldc, int64_t M, const void* next) {
  if (M <= 0 || np <= 0) return;
  MOE_CPU_RETURN_IF_AVX2(dt, gemm_panels_avx, A, lda, P, pstride, K, np, C, ldc, M, next);
  gemm_panels_scalar(A, lda, P, dt, pstride, K, np, C, ldc, M);
}

void gemm_nn_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R, float* C, int64_t ldc,
                   int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return;
  MOE_CPU_RETURN_IF_AVX2(dt, gemm_nn_avx, A, lda, B, ldb, R, C, ldc, M, N);
  gemm_nn_scalar(A, lda, B, dt, ldb, R, C, ldc, M, N);
}

}  // namespace moe_cpu
