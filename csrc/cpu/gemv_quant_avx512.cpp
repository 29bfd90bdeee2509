// The quantized experts' decode GEMV (avx512_bf16.h gemv_quant) in AVX-512 intrinsics, compiled
// once per instruction set (avx512_bf16_isa.h).
//
// Dataflow: a tile with few activation rows (decode: one or two per expert) needs each weight once
// and for little arithmetic, so the repack into VNNI panels (a transpose) costs more than the GEMM
// it feeds. Here the weight rows are read as stored instead: per 32 elements of K, one load of
// each of up to 4 weight rows' codes, converted to bf16 in registers (quant_codes_avx512.h), and one
// vdpbf16ps per activation row against the activation's own 32 elements -- a row-major weight
// row and an activation row pair up lane for lane, no transpose. fp8's k-block scales multiply
// the block's partial sums (bk a multiple of 32), int8's row scale the final sum; mxfp4's
// power-of-two scale is inside the conversion table. The 16 lanes are summed in a fixed order
// at the end, so the native and the emulated builds give the same bits.

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"
#include "quant_codes_avx512.h"

#ifndef MOE_CPU_AVX512_NS
#error "compiled by cpu.cmake once per instruction set, with -DMOE_CPU_AVX512_NS=avx512_native|avx512_emu"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {

namespace {

// The 16 lanes summed pairwise in a fixed order (the emulated build's reduce intrinsics may
// order them otherwise).
inline float sum16(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

inline __m512i weight_chunk(const GemvQuantJob& job, int j, int64_t k0, int64_t left) {
  if (job.fmt == 3) {
    const uint8_t sc = static_cast<const uint8_t*>(job.s[j])[k0 / 32];
    return mxfp4_block_to_bf16(job.w[j] + k0 / 2, job.mx + 16 * sc);
  }
  return codes_to_bf16(job.w[j] + k0, left, job.fmt == 2 ? 2 : 1);
}

// Columns [j0, j0 + G) (all present) against M activation rows. pf[0..npf): the weight rows the
// next two groups read, prefetched into L2 line by line alongside this group's own reads: a row
// is only 0.5-2 KiB, too short for the hardware prefetcher to ramp up on. Into L2, not L1: L1's
// few miss buffers throttled it (measured, docs/cpu.md "Quantized experts": cold int8 decode at
// T = 1 went from 1.16 ms with L1 prefetches to 0.67 ms).
template <int M, int G>
void gemv_group(const GemvQuantJob& job, int j0, const uint16_t* A, int64_t lda, float* C, int64_t ldc, const int* pf,
                int npf) {
  const int64_t K = job.K;
  const bool fp8 = job.fmt == 2;
  const int shift = job.fmt == 3 ? 1 : 0;  // bytes of a chunk: 32 codes, or 16 for mxfp4
  __m512 acc[G][M], tot[G][M];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) acc[g][i] = tot[g][i] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    const int64_t left = K - k0;
    if (((k0 >> shift) & 63) == 0)
      for (int r = 0; r < npf; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(job.w[pf[r]] + (k0 >> shift)), _MM_HINT_T1);
    if (job.fmt == 3 && (k0 & 2047) == 0)  // and mxfp4's e8m0 rows, a line per 2048 elements
      for (int r = 0; r < npf; ++r) _mm_prefetch(static_cast<const char*>(job.s[pf[r]]) + k0 / 32, _MM_HINT_T1);
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << left) - 1ull);
    __m512bh x[M];
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) x[i] = bits_as<__m512bh>(_mm512_maskz_loadu_epi16(m, A + i * lda + k0));
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const __m512bh wv = bits_as<__m512bh>(weight_chunk(job, j0 + g, k0, left));
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], wv, x[i]);
    }
    if (fp8 && (left <= 32 || (k0 + 32) % job.bk == 0)) {  // the end of a k block: scale it in
      const int64_t kb = k0 / job.bk;
#pragma GCC unroll 4
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(static_cast<const float*>(job.s[j0 + g])[kb]);
#pragma GCC unroll 4
        for (int i = 0; i < M; ++i) {
          __m512 p = _mm512_mul_ps(acc[g][i], s);
          MOE_NO_CONTRACT(p);  // the same rounding in both builds
          tot[g][i] = _mm512_add_ps(tot[g][i], p);
          acc[g][i] = _mm512_setzero_ps();
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float rs = job.fmt == 1 ? *static_cast<const float*>(job.s[j0 + g]) : 1.0f;
    for (int i = 0; i < M; ++i) {
      const float r = sum16(fp8 ? tot[g][i] : acc[g][i]);
      C[i * ldc + j0 + g] = job.fmt == 1 ? r * rs : r;
    }
  }
}

// Accumulators: G x M (x 2 for fp8) of the 32 zmm registers.
template <int M>
void gemv_rows(const GemvQuantJob& job, const uint16_t* A, int64_t lda, float* C, int64_t ldc) {
  constexpr int G = M <= 2 ? 4 : 2;
  int j = 0;
  while (j < job.n) {
    if (!job.w[j]) {  // absent column: zero, as the GEMM's zero-filled panel gives
      for (int i = 0; i < M; ++i) C[i * ldc + j] = 0.0f;
      ++j;
      continue;
    }
    int run = 1;
    while (run < G && j + run < job.n && job.w[j + run]) ++run;
    int pf[2 * G];  // the next two groups' columns
    int npf = 0;
    for (int c = j + run; c < job.n && npf < 2 * G; ++c)
      if (job.w[c]) pf[npf++] = c;
    if (run == G) gemv_group<M, G>(job, j, A, lda, C, ldc, pf, npf);
    else
      for (int r = 0; r < run; ++r) gemv_group<M, 1>(job, j + r, A, lda, C, ldc, pf, r + 1 == run ? npf : 0);
    j += run;
  }
}

}  // namespace

void gemv_quant(const GemvQuantJob& job, const uint16_t* A, int64_t lda, int64_t M, float* C, int64_t ldc) {
  switch (M) {
    case 1: return gemv_rows<1>(job, A, lda, C, ldc);
    case 2: return gemv_rows<2>(job, A, lda, C, ldc);
    case 3: return gemv_rows<3>(job, A, lda, C, ldc);
    case 4: return gemv_rows<4>(job, A, lda, C, ldc);
    default:  // the dispatcher (avx512_bf16.cpp) splits larger M
      for (int64_t i0 = 0; i0 < M; i0 += 4)
        gemv_quant(job, A + i0 * lda, lda, M - i0 < 4 ? M - i0 : 4, C + i0 * ldc, ldc);
  }
}

}  // namespace moe_cpu::MOE_CPU_AVX512_NS
