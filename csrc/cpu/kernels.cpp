// Torch-free CPU kernels: dtype row helpers and the two block GEMMs (see kernels.h).
//
// Dataflow of a block GEMM call: A (float32, packed by the op) x B (weights, read in place in
// their dtype) -> C (float32 scratch tile; the op rounds/stores it). Two register-blocked
// micro-kernels:
//   * NT ("dot"): C[i,j] = <A_i, B_j> with B rows contiguous along the reduction -- the layout of
//     HF/moe_ops weights (w_gate_up[E,2I,H], w_down[E,H,I], trans_b). Register tiles of 8-lane
//     accumulators (6x2, 4x3, 3x3, 2x4, 1x4), one horizontal sum per output; bf16 weights widen with
//     shift/mask only.
//   * NN ("broadcast"): C[i,j..j+16] += A[i,r] * B[r,j..j+16] for B rows contiguous along the
//     output dim (trans_b=False and weight gradients); 6x16 tiles.
// The AVX2 code is compiled with a function-level target (no global -mavx2), and chosen at run
// time, so the extension still loads on CPUs without AVX2.
#include "kernels.h"
#include "dtype_io.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <cstdlib>
#include <algorithm>
#include <cstring>

namespace moe_cpu {
namespace {

using io::load_scalar;
using io::store_scalar;

// ------------------------------------------------------------------------ portable fallback
void row_to_f32_scalar(const void* src, DType dt, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load_scalar(src, dt, i);
}
void row_from_f32_scalar(const float* src, void* dst, DType dt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store_scalar(dst, dt, i, src[i]);
}
void gemm_nt_scalar(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K,
                    float* C, int64_t ldc, int64_t M, int64_t N) {
  const int64_t es = dtype_size(dt);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      const void* b = static_cast<const char*>(B) + j * ldb * es;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(A[i * lda + pack_index(k, dt)], load_scalar(b, dt, k), acc);
      C[i * ldc + j] = acc;
    }
}
void gemm_panels_scalar(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K,
                        int64_t np, float* C, int64_t ldc, int64_t M) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t p = 0; p < np; ++p)
      for (int64_t c = 0; c < kPanel; ++c) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k)
          acc = std::fma(A[i * lda + k], load_scalar(P, dt, p * pstride + k * kPanel + c), acc);
        C[i * ldc + p * kPanel + c] = acc;
      }
}
void gemm_nn_scalar(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R,
                    float* C, int64_t ldc, int64_t M, int64_t N) {
  const int64_t es = dtype_size(dt);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r)
        acc = std::fma(A[i * lda + r], load_scalar(static_cast<const char*>(B) + r * ldb * es, dt, j), acc);
      C[i * ldc + j] = acc;
    }
}

}  // namespace
}  // namespace moe_cpu

// ------------------------------------------------------------------------------------ AVX2
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_CPU_X86 1
#include <immintrin.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#include "dtype_io_avx.h"

namespace moe_cpu {
namespace {

using io::load8;
using io::store8;

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// Row helpers: 8 at a time; the tail goes through an 8-wide scratch so it rounds exactly like
// the body (no scalar FMA contraction differences).
template <DType DT>
void row_to_f32_avx(const void* src, float* dst, int64_t n) {
  const char* s = static_cast<const char*>(src);
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8<DT>(s + i * es));
  if (i < n) {
    alignas(32) char tmp[32] = {0};
    std::memcpy(tmp, s + i * es, (n - i) * es);
    alignas(32) float out[8];
    _mm256_store_ps(out, load8<DT>(tmp));
    std::memcpy(dst + i, out, (n - i) * sizeof(float));
  }
}

template <DType DT>
void row_from_f32_avx(const float* src, void* dst, int64_t n) {
  char* d = static_cast<char*>(dst);
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8<DT>(d + i * es, _mm256_loadu_ps(src + i));
  if (i < n) {
    alignas(32) float in[8] = {0};
    alignas(32) char out[32];
    std::memcpy(in, src + i, (n - i) * sizeof(float));
    store8<DT>(out, _mm256_load_ps(in));
    std::memcpy(d + i * es, out, (n - i) * es);
  }
}

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
  constexpr int64_t kStepBytes = CH * es;                      // bytes of one weight row per chunk
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
        bv[j] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp[j])), hi_mask));
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
template <int MR> constexpr int nt_cols() { return MR >= 5 ? 2 : MR >= 3 ? 3 : 4; }

// One row block of MR rows against all N columns of the block. `first`: this row block is the
// first pass over these weights, so each micro call prefetches the next column group's rows
// (the last one prefetches `after`: the first rows of the next tile's weight block, if any).
template <DType DT, int MR>
void nt_rows(const float* A, int64_t lda, const char* B, int64_t lb, int64_t K, float* C, int64_t ldc,
             int64_t N, bool first, const char* after) {
  constexpr int NR = nt_cols<MR>();
  int64_t j = 0;
  for (; j + NR <= N; j += NR) {
    const char* nx = j + 2 * NR <= N ? B + (j + NR) * lb : (j + NR < N ? nullptr : after);
    if (first && nx) micro_nt<DT, MR, NR, true>(A, lda, B + j * lb, lb, K, C + j, ldc, nx);
    else micro_nt<DT, MR, NR, false>(A, lda, B + j * lb, lb, K, C + j, ldc, nullptr);
  }
  const char* bj = B + j * lb;
  if constexpr (NR > 3) if (N - j == 3) { micro_nt<DT, MR, 3, false>(A, lda, bj, lb, K, C + j, ldc, nullptr); return; }
  if constexpr (NR > 2) if (N - j == 2) { micro_nt<DT, MR, 2, false>(A, lda, bj, lb, K, C + j, ldc, nullptr); return; }
  if (N - j == 1) micro_nt<DT, MR, 1, false>(A, lda, bj, lb, K, C + j, ldc, nullptr);
}

// Row blocks of a tile, in order: as many 6-row blocks as possible; a remainder of 1 or 2 rows
// folds one 6-row block into 4+3 / 4+4 (a 1-2 row pass costs a full pass over the weight block
// for almost no FMAs). Row blocks are the outer loop of all block GEMMs: the MR rows of A stay
// close (L1/L2) while the weight block streams from L2. Calls fn.template operator()<MR>(i) for
// each block of MR rows starting at row i (the micro-kernels are templates on MR).
template <class Fn>
inline void for_row_blocks(int64_t M, Fn&& fn) {
  int64_t n6 = M / 6;
  const int64_t rem = M % 6;
  int64_t tail[2] = {0, 0}, nt = 0;
  if ((rem == 1 || rem == 2) && n6 > 0) {
    --n6;
    tail[nt++] = 4;
    tail[nt++] = rem == 1 ? 3 : 4;
  } else if (rem > 0) {
    tail[nt++] = rem;
  }
  int64_t i = 0;
  auto run = [&](int64_t mr) {
    switch (mr) {
      case 6: fn.template operator()<6>(i); break;
      case 5: fn.template operator()<5>(i); break;
      case 4: fn.template operator()<4>(i); break;
      case 3: fn.template operator()<3>(i); break;
      case 2: fn.template operator()<2>(i); break;
      default: fn.template operator()<1>(i); break;
    }
    i += mr;
  };
  for (int64_t b = 0; b < n6; ++b) run(6);
  for (int64_t b = 0; b < nt; ++b) run(tail[b]);
}

template <DType DT>
void gemm_nt_avx(const float* A, int64_t lda, const void* Bv, int64_t ldb, int64_t K, float* C,
                 int64_t ldc, int64_t M, int64_t N, const void* pfv) {
  const char* B = static_cast<const char*>(Bv);
  const char* after = static_cast<const char*>(pfv);
  const int64_t lb = ldb * (DT == DType::F32 ? 4 : 2);
  // The first row block streams the weights from memory: it prefetches.
  for_row_blocks(M, [&]<int MR>(int64_t i) {
    nt_rows<DT, MR>(A + i * lda, lda, B, lb, K, C + i * ldc, ldc, N, i == 0, after);
  });
}

// ---- P micro-kernel: MR rows x NP panels of 16 columns; per k one broadcast per row, one
// 256-bit (bf16/f16) or two (f32) panel-row loads per panel, 2*MR*NP FMAs. The accumulators are
// named through fully unrolled loops so GCC keeps them in registers (an array it cannot scalarize
// would be stored to the stack every iteration).
template <DType DT>
inline void load_panel_row(const char* b, __m256& lo, __m256& hi) {
  if constexpr (DT == DType::BF16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));  // even columns
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
void micro_p(const float* A, int64_t lda, const char* P, int64_t pstride, int64_t rs, int64_t K, float* C,
             int64_t ldc, const char* next) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  constexpr int64_t rb = kPanel * es;                     // bytes of one panel row
  constexpr int64_t kPfEvery = rb >= 64 ? 1 : 64 / rb;    // k steps per cache line
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
void p_rows(const float* A, int64_t lda, const char* P, int64_t pstride, int64_t rs, int64_t K, int64_t np,
            float* C, int64_t ldc, bool first, const char* after) {
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
void gemm_panels_avx(const float* A, int64_t lda, const void* Pv, int64_t pstride, int64_t K, int64_t np,
                     float* C, int64_t ldc, int64_t M, const void* nextv) {
  const char* P = static_cast<const char*>(Pv);
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  p_blocks<DT>(A, lda, P, pstride * es, kPanel * es, K, np, C, ldc, M, true, static_cast<const char*>(nextv));
}

// ---- NN micro-kernel: MR rows x (NV*8) columns, r ascending, one FMA chain per element.
template <DType DT, int MR, int NV>
void micro_nn(const float* A, int64_t lda, const char* B, int64_t ldb_bytes, int64_t R, float* C,
              int64_t ldc) {
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
void nn_rows(const float* A, int64_t lda, const char* B, int64_t ldb_bytes, int64_t R, float* C,
             int64_t ldc, int64_t N, int64_t j) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  for (; j + 8 <= N; j += 8) micro_nn<DT, MR, 1>(A, lda, B + j * es, ldb_bytes, R, C + j, ldc);
  // Remaining columns: scalar std::fma in the same r order == the vector lanes' result.
  for (; j < N; ++j)
    for (int i = 0; i < MR; ++i) {
      float acc = 0.f;
      for (int64_t r = 0; r < R; ++r)
        acc = std::fma(A[i * lda + r], load_scalar(B + r * ldb_bytes, DT, j), acc);
      C[i * ldc + j] = acc;
    }
}

// Columns in 16-wide groups run the P micro-kernel on B's own rows (a 16-column group of B rows
// is a panel with row stride ldb: same single-FMA-chain arithmetic as micro_nn, at the FMA
// peak); the last N % 16 columns use micro_nn / scalar FMAs in the same r order.
template <DType DT>
void gemm_nn_avx(const float* A, int64_t lda, const void* Bv, int64_t ldb, int64_t R, float* C,
                 int64_t ldc, int64_t M, int64_t N) {
  constexpr int64_t es = DT == DType::F32 ? 4 : 2;
  const char* B = static_cast<const char*>(Bv);
  const int64_t ldb_bytes = ldb * es;
  const int64_t np = N / kPanel, j0 = np * kPanel;
  if (np > 0) p_blocks<DT>(A, lda, B, kPanel * es, ldb_bytes, R, np, C, ldc, M, false, nullptr);
  if (j0 == N) return;
  for_row_blocks(M, [&]<int MR>(int64_t i) {
    nn_rows<DT, MR>(A + i * lda, lda, B, ldb_bytes, R, C + i * ldc, ldc, N, j0);
  });
}

// x rounded through dt (bf16: round to nearest even on the bit pattern; f16: F16C).
template <DType DT>
inline __m256 round8(__m256 x) {
  if constexpr (DT == DType::F32) {
    return x;
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, nan);
  }
}

// exp(x), Cephes-style range reduction + degree-5 polynomial (~1-2 ulp), over the whole float
// range like libm and torch: exp(+inf) = +inf (and x > ~88.72 overflows to it), exp(-inf) = 0,
// results below FLT_MIN are denormals (down to 0 below ~-103.97); NaN propagates. Clamping x to
// the range where the result is normal instead would make sigmoid(-inf) = 4e-39 > 0 (a masked
// expert beating a real denormal score) and silu(-inf) = -inf (torch: NaN). 2^n is applied as
// two factors 2^(n>>1) * 2^(n - (n>>1)), so neither exponent field overflows and the one
// rounding is that of the final (possibly denormal) product.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);  // exp(89) overflows anyway; NaN in x is kept (2nd operand)
  x = _mm256_max_ps(_mm256_set1_ps(-110.0f), x);  // exp(-110) rounds to 0 anyway
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_cvttps_epi32(fx);  // in [-159, 128]
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}

// n floats from p, the lanes past n filled with `fill`.
inline __m256 load_partial(const float* p, int64_t n, float fill) {
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = i < n ? p[i] : fill;
  return _mm256_load_ps(t);
}

bool softmax_row_avx(const float* x, float* out, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  __m256 mx = _mm256_set1_ps(ninf), bad = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = i + 8 <= n ? _mm256_loadu_ps(x + i) : load_partial(x + i, n - i, ninf);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, v);
  }
  if (!_mm256_testz_ps(bad, bad)) return false;
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const __m256 m = _mm256_set1_ps(_mm_cvtss_f32(m4));
  // exp(x - m): a -inf logit weighs exactly 0, a very negative one a denormal, as in torch.softmax.
  auto expd = [&](__m256 v) { return exp8(_mm256_sub_ps(v, m)); };
  __m256 sum = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    if (i + 8 <= n) {
      const __m256 ev = expd(_mm256_loadu_ps(x + i));
      _mm256_storeu_ps(out + i, ev);
      sum = _mm256_add_ps(sum, ev);
    } else {  // lanes past n: -inf -> 0, so the sum's lane order stays that of a full chunk
      alignas(32) float t[8];
      const __m256 ev = expd(load_partial(x + i, n - i, -std::numeric_limits<float>::infinity()));
      _mm256_store_ps(t, ev);
      for (int64_t l = 0; l < n - i; ++l) out[i + l] = t[l];
      sum = _mm256_add_ps(sum, ev);
    }
  }
  const __m256 s = _mm256_set1_ps(hsum(sum));
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), s));
  const float sv = _mm256_cvtss_f32(s);
  for (; i < n; ++i) out[i] = out[i] / sv;
  return true;
}

bool sigmoid_row_avx(const float* x, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256 bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm256_storeu_ps(out + i, _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)))));
  }
  if (i < n) {
    alignas(32) float t[8];
    const __m256 v = load_partial(x + i, n - i, 0.f);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    _mm256_store_ps(t, _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)))));
    for (int64_t l = 0; l < n - i; ++l) out[i + l] = t[l];
  }
  return _mm256_testz_ps(bad, bad);
}

template <DType DT>
inline void swiglu8(const float* gp, const float* up, float* op) {
  __m256 gv = round8<DT>(_mm256_loadu_ps(gp)), uv = round8<DT>(_mm256_loadu_ps(up));
  __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
  _mm256_storeu_ps(op, round8<DT>(_mm256_mul_ps(s, uv)));
}

template <DType DT>
void swiglu_avx(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) swiglu8<DT>(g + i, u + i, out + i);
  if (i < n) {
    alignas(32) float gt[8] = {0}, ut[8] = {0}, ot[8];
    std::memcpy(gt, g + i, (n - i) * sizeof(float));
    std::memcpy(ut, u + i, (n - i) * sizeof(float));
    swiglu8<DT>(gt, ut, ot);
    std::memcpy(out + i, ot, (n - i) * sizeof(float));
  }
}

template <DType DT>
void round_avx(const float* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, round8<DT>(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) {
    alignas(32) float t[8] = {src[i]};
    _mm256_store_ps(t, round8<DT>(_mm256_load_ps(t)));
    dst[i] = t[0];
  }
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

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // namespace
}  // namespace moe_cpu

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // x86

// --------------------------------------------------------------------------------- dispatch
namespace moe_cpu {

bool have_avx2() {
#ifdef MOE_CPU_X86
  static const bool ok = cpu_has_avx2() && std::getenv("MOE_OPS_CPU_NO_AVX2") == nullptr;
  return ok;
#else
  return false;
#endif
}

#ifdef MOE_CPU_X86
#define MOE_CPU_DISPATCH(dt, FN, ...)                         \
  switch (dt) {                                               \
    case DType::F32: FN<DType::F32>(__VA_ARGS__); break;      \
    case DType::F16: FN<DType::F16>(__VA_ARGS__); break;      \
    default: FN<DType::BF16>(__VA_ARGS__); break;             \
  }
#endif

void row_to_f32(const void* src, DType dt, float* dst, int64_t n) {
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, row_to_f32_avx, src, dst, n); return; }
#endif
  row_to_f32_scalar(src, dt, dst, n);
}

void row_from_f32(const float* src, void* dst, DType dt, int64_t n) {
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, row_from_f32_avx, src, dst, n); return; }
#endif
  row_from_f32_scalar(src, dst, dt, n);
}

float round_through(float x, DType dt) {
  switch (dt) {
    case DType::F32: return x;
    case DType::F16: return static_cast<float>(c10::Half(x));
    default: return static_cast<float>(c10::BFloat16(x));
  }
}

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

void gemm_nt_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t K,
                   float* C, int64_t ldc, int64_t M, int64_t N, const void* next) {
  if (M <= 0 || N <= 0) return;
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, gemm_nt_avx, A, lda, B, ldb, K, C, ldc, M, N, next); return; }
#endif
  gemm_nt_scalar(A, lda, B, dt, ldb, K, C, ldc, M, N);
}

namespace {
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

void gemm_panels(const float* A, int64_t lda, const void* P, DType dt, int64_t pstride, int64_t K,
                 int64_t np, float* C, int64_t ldc, int64_t M, const void* next) {
  if (M <= 0 || np <= 0) return;
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, gemm_panels_avx, A, lda, P, pstride, K, np, C, ldc, M, next); return; }
#endif
  gemm_panels_scalar(A, lda, P, dt, pstride, K, np, C, ldc, M);
}

void gemm_nn_block(const float* A, int64_t lda, const void* B, DType dt, int64_t ldb, int64_t R,
                   float* C, int64_t ldc, int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return;
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, gemm_nn_avx, A, lda, B, ldb, R, C, ldc, M, N); return; }
#endif
  gemm_nn_scalar(A, lda, B, dt, ldb, R, C, ldc, M, N);
}

float silu_f32(float x) { return x / (1.f + std::exp(-x)); }

void gated_act_rows(const float* gate, const float* up, float* out, int64_t n, DType dt, bool swiglu) {
#ifdef MOE_CPU_X86
  if (swiglu && have_avx2()) { MOE_CPU_DISPATCH(dt, swiglu_avx, gate, up, out, n); return; }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float g = round_through(gate[i], dt), u = round_through(up[i], dt);
    out[i] = round_through((swiglu ? silu_f32(g) : gelu_f32(g)) * u, dt);
  }
}

#ifdef MOE_CPU_X86
template <DType DT>
void swiglu_block_avx(const float* g, const float* u, int64_t ldi, float* out, int64_t ldo, int64_t rows,
                      int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) swiglu_avx<DT>(g + r * ldi, u + r * ldi, out + r * ldo, cols);
}
#endif

void gated_act_block(const float* gate, const float* up, int64_t ldi, float* out, int64_t ldo, int64_t rows,
                     int64_t cols, DType dt, bool swiglu) {
#ifdef MOE_CPU_X86
  if (swiglu && have_avx2()) { MOE_CPU_DISPATCH(dt, swiglu_block_avx, gate, up, ldi, out, ldo, rows, cols); return; }
#endif
  for (int64_t r = 0; r < rows; ++r) gated_act_rows(gate + r * ldi, up + r * ldi, out + r * ldo, cols, dt, swiglu);
}

void round_rows(const float* src, float* dst, int64_t n, DType dt) {
#ifdef MOE_CPU_X86
  if (have_avx2()) { MOE_CPU_DISPATCH(dt, round_avx, src, dst, n); return; }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = round_through(src[i], dt);
}
// Without AVX2 both return false: gating.cpp's scalar path (the one NaN rows and float64 take)
// then computes the row.
bool softmax_row_f32(const float* x, float* out, int64_t n) {
#ifdef MOE_CPU_X86
  if (have_avx2()) return softmax_row_avx(x, out, n);
#endif
  return false;
}

bool sigmoid_row_f32(const float* x, float* out, int64_t n) {
#ifdef MOE_CPU_X86
  if (have_avx2()) return sigmoid_row_avx(x, out, n);
#endif
  return false;
}

float gelu_f32(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752440f)); }

}  // namespace moe_cpu
