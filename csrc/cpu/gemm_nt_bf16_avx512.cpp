// The AVX512-BF16 "NT" (dot-product) GEMM for bf16 weights as stored (avx512_bf16.h
// gemm_nt_bf16_avx512) in AVX-512 intrinsics, compiled once per instruction set
// (avx512_bf16_isa.h).
//
// Dataflow: 4x4 blocks of outputs; per 32-step of the reduction, 4 A-row loads and 4 weight-row
// loads of 32 bf16 (16 (k, k+1) pairs each), 16 vdpbf16ps into 16 zmm accumulators (16 partial
// sums per output); the last partial step uses masked loads (no padding needed on either
// operand). Each output is then reduced 16 -> 8 -> 4 -> 2 -> 1 lanes in a fixed tree, so its
// value depends only on K, never on the block shape, the tile or the thread count.

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"

#ifndef MOE_CPU_AVX512_NS
#error "compiled by cpu.cmake once per instruction set, with -DMOE_CPU_AVX512_NS=avx512_native|avx512_emu"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {

namespace {

inline float nt_hsum(__m512 a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

template <int MR, int NR>
inline void nt_block(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t K, float* C, int64_t ldc) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh b[NR];
#pragma GCC unroll 4
    for (int n = 0; n < NR; ++n) b[n] = bits_as<__m512bh>(_mm512_loadu_si512(B + n * ldb + k));
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = bits_as<__m512bh>(_mm512_loadu_si512(A + m * lda + k));
#pragma GCC unroll 4
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, b[n]);
    }
  }
  if (K32 < K) {  // masked tail: the lanes past K read as zero on both operands
    const uint32_t mask = static_cast<uint32_t>((1ull << (K - K32)) - 1ull);
    __m512bh b[NR];
    for (int n = 0; n < NR; ++n) b[n] = bits_as<__m512bh>(_mm512_maskz_loadu_epi16(mask, B + n * ldb + K32));
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = bits_as<__m512bh>(_mm512_maskz_loadu_epi16(mask, A + m * lda + K32));
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, b[n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) C[m * ldc + n] = nt_hsum(acc[m][n]);
}

template <int NR, int MR = 4>
inline void nt_rows(int r, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t K, float* C,
                    int64_t ldc) {
  if constexpr (MR >= 1) {
    if (r == MR) return nt_block<MR, NR>(A, lda, B, ldb, K, C, ldc);
    nt_rows<NR, MR - 1>(r, A, lda, B, ldb, K, C, ldc);
  }
}

}  // namespace

void gemm_nt_bf16_avx512(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, int64_t K, float* C,
                         int64_t ldc, int64_t M, int64_t N) {
  // Column groups outside, rows inside: 4 weight rows (4*K bf16) stream from memory once and stay
  // in L1 for every row block.
  for (int64_t j = 0; j < N; j += 4) {
    const int nr = static_cast<int>(N - j < 4 ? N - j : 4);
    for (int64_t i = 0; i < M; i += 4) {
      const int r = static_cast<int>(M - i < 4 ? M - i : 4);
      const uint16_t* a = A + i * lda;
      const uint16_t* b = B + j * ldb;
      float* c = C + i * ldc + j;
      switch (nr) {
        case 4: nt_rows<4>(r, a, lda, b, ldb, K, c, ldc); break;
        case 3: nt_rows<3>(r, a, lda, b, ldb, K, c, ldc); break;
        case 2: nt_rows<2>(r, a, lda, b, ldb, K, c, ldc); break;
        default: nt_rows<1>(r, a, lda, b, ldb, K, c, ldc); break;
      }
    }
  }
}

}  // namespace moe_cpu::MOE_CPU_AVX512_NS
