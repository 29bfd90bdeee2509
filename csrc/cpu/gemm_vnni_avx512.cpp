// The VNNI panel GEMM (avx512_bf16.h gemm_panels_vnni) in AVX-512 intrinsics, compiled once per
// instruction set (avx512_bf16_isa.h).
//
// Dataflow per call: for each pair of panels (32 columns) -> row blocks of at most 12 rows, as
// even as possible: up to 24 zmm accumulators (12 rows x 2 panels); per reduction pair kk, 2
// panel loads (16 columns x (k, k+1) each, at P + panel * pstride + kk * prow) and per row one
// 32-bit broadcast of A's (k, k+1) pair, then vdpbf16ps into both accumulators -> 16-column
// float32 stores. 24 accumulators + 2 panel vectors + 1 broadcast stay within the 32 zmm
// registers. Every step also prefetches a share of `next` (the next call's weights) into L2.

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"

#ifndef MOE_CPU_AVX512_NS
#error "compiled by cpu.cmake once per instruction set, with -DMOE_CPU_AVX512_NS=avx512_native|avx512_emu"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {

namespace {

// The lines of PrefetchRanges (the next call's weights), handed out a few per reduction step so
// they arrive in L2 while this call computes.
struct LineStream {
  const char* cur[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  int64_t per_step = 0;

  // The lines of r, `steps` steps to hand them out in (nullptr r or steps <= 0: none).
  LineStream(const PrefetchRanges* r, int64_t steps) {
    if (!r || steps <= 0) return;
    int64_t lines = 0;
    for (int i = 0; i < 2; ++i) {
      cur[i] = static_cast<const char*>(r->p[i]);
      end[i] = cur[i] + (r->p[i] ? r->bytes[i] : 0);
      lines += (r->p[i] ? r->bytes[i] : 0) / 64;
    }
    per_step = (lines + steps - 1) / steps;
  }
  bool active() const { return per_step > 0; }
  void step() {
    for (int64_t l = 0; l < per_step; ++l) {
      const int r = cur[0] < end[0] ? 0 : 1;
      if (cur[r] >= end[r]) return;
      _mm_prefetch(cur[r], _MM_HINT_T1);  // into L2: a block (64-128 KiB) exceeds L1
      cur[r] += 64;
    }
  }
};

// KS: per k block of kbp pairs, the block's sums times ks[n][kb] added into C (rounded multiply,
// rounded add, in k-block order), the accumulators restarting from zero.
template <int MR, int NP, bool KS>
inline void vnni_block(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow, int64_t K2,
                       float* C, int64_t ldc, LineStream* pf, const float* const* ks, int64_t kbp) {
  __m512 acc[MR][NP];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
    for (int n = 0; n < NP; ++n) acc[m][n] = _mm512_setzero_ps();
  const int64_t kstep = KS ? kbp : K2;
  for (int64_t k0 = 0, kb = 0; k0 < K2; k0 += kstep, ++kb) {
    const int64_t k1 = K2 - k0 < kstep ? K2 : k0 + kstep;
    for (int64_t kk = k0; kk < k1; ++kk) {
      if (pf) pf->step();
      __m512bh b[NP];
#pragma GCC unroll 2
      for (int n = 0; n < NP; ++n) b[n] = bits_as<__m512bh>(_mm512_loadu_si512(P + n * pstride + kk * prow));
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        int32_t pair;  // A[m][2kk], A[m][2kk+1] as one 32-bit lane
        __builtin_memcpy(&pair, A + m * lda + 2 * kk, sizeof(pair));
        const __m512bh a = bits_as<__m512bh>(_mm512_set1_epi32(pair));
#pragma GCC unroll 2
        for (int n = 0; n < NP; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], a, b[n]);
      }
    }
    if constexpr (KS) {
      __m512 s[NP];
#pragma GCC unroll 2
      for (int n = 0; n < NP; ++n) s[n] = _mm512_set1_ps(ks[n][kb]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
        for (int n = 0; n < NP; ++n) {
          __m512 p = _mm512_mul_ps(acc[m][n], s[n]);
          MOE_NO_CONTRACT(p);  // the same rounding in both builds
          float* c = C + m * ldc + 16 * n;
          _mm512_storeu_ps(c, _mm512_add_ps(kb == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(c), p));
          acc[m][n] = _mm512_setzero_ps();
        }
    }
  }
  if constexpr (!KS) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int n = 0; n < NP; ++n) _mm512_storeu_ps(C + m * ldc + 16 * n, acc[m][n]);
  }
}

constexpr int kVnniMR = 12;

// Row block of r (1..kVnniMR) rows: the compile-time MR that equals r.
template <int NP, bool KS = false, int MR = kVnniMR>
inline void vnni_rows(int r, const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow,
                      int64_t K2, float* C, int64_t ldc, LineStream* pf, const float* const* ks = nullptr,
                      int64_t kbp = 0) {
  if constexpr (MR >= 1) {
    if (r == MR) return vnni_block<MR, NP, KS>(A, lda, P, pstride, prow, K2, C, ldc, pf, ks, kbp);
    vnni_rows<NP, KS, MR - 1>(r, A, lda, P, pstride, prow, K2, C, ldc, pf, ks, kbp);
  }
}

// Row blocks of at most kVnniMR rows, as even as possible (16 rows: 8 + 8, not 12 + 4: a thin
// block spends its loads on few FMAs): the count and the size.
inline int64_t row_block(int64_t M) {
  const int64_t nblk = (M + kVnniMR - 1) / kVnniMR;
  return (M + nblk - 1) / nblk;
}

}  // namespace

void gemm_panels_vnni(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow, int64_t K2,
                      int64_t np, float* C, int64_t ldc, int64_t M, const PrefetchRanges* next) {
  const int64_t mr = row_block(M), nblk = (M + mr - 1) / mr;
  // Every reduction step also prefetches an equal share of `next`, so the next call's weights
  // arrive in L2 while this one computes.
  LineStream pf(next, (np + 1) / 2 * nblk * K2);
  LineStream* pfp = pf.active() ? &pf : nullptr;
  // Panel pairs outside, rows inside: a pair (2 x K2 x 64 bytes) streams from memory once and is
  // re-read from L2 by the following row blocks.
  for (int64_t p = 0; p < np; p += 2) {
    const uint16_t* Pp = P + p * pstride;
    for (int64_t i = 0; i < M; i += mr) {
      const int r = static_cast<int>(M - i < mr ? M - i : mr);
      if (np - p >= 2) vnni_rows<2>(r, A + i * lda, lda, Pp, pstride, prow, K2, C + i * ldc + 16 * p, ldc, pfp);
      else vnni_rows<1>(r, A + i * lda, lda, Pp, pstride, prow, K2, C + i * ldc + 16 * p, ldc, pfp);
    }
  }
}

void gemm_panels_vnni_ks(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow, int64_t K2,
                         const float* const* ks, int64_t kbp, float* C, int64_t ldc, int64_t M,
                         const PrefetchRanges* next) {
  const int64_t mr = row_block(M), nblk = (M + mr - 1) / mr;
  LineStream pf(next, nblk * K2);
  LineStream* pfp = pf.active() ? &pf : nullptr;
  for (int64_t i = 0; i < M; i += mr) {
    const int r = static_cast<int>(M - i < mr ? M - i : mr);
    vnni_rows<2, true>(r, A + i * lda, lda, P, pstride, prow, K2, C + i * ldc, ldc, pfp, ks, kbp);
  }
}

}  // namespace moe_cpu::MOE_CPU_AVX512_NS
