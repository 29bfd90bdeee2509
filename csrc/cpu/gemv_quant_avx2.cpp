// The quantized experts' GEMV for CPUs with AVX2 but not the AVX512-BF16 kernels (quant_gemv.h).
//
// Dataflow: the activation rows (bf16) are widened to float32 once per call into a zero-padded
// buffer; then per 32 elements of K, each weight row's codes are converted to float32 exactly in
// registers and multiplied into 8-lane float32 accumulators with FMA:
//   int8   sign-extend, convert; the row scale multiplies the final sum;
//   fp8    the code's bits moved into a float16 (S.EEEE.MMM -> S.0EEEE.MMM0000000 is the value
//          times 2^-8, subnormals included), F16C-converted; 2^8 goes into the k-block scale,
//          which multiplies the block's partial sums. NaN codes (S.1111.111) are rare: a chunk
//          holding one takes a per-lane fix-up;
//   mxfp4  nibbles split and interleaved, looked up (pshufb) as twice the e2m1 value in int8,
//          converted; 2^(s - 128) multiplies the block's partial sums. e8m0 255 (2^128, beyond
//          float32) goes element by element as the reference computes it (a code 0 stays 0).
// With no VNNI panels on these CPUs, this kernel runs every tile, whatever its rows (4 at a
// time): each weight is converted once per 4 rows. Lanes are summed in a fixed order.
#include "quant_gemv.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "simd_avx2.h"

#ifdef MOE_CPU_X86

MOE_AVX2_BEGIN

namespace moe_cpu {
namespace {

inline float hsum_fixed(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int w = 4; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// 32 int8/fp8 codes from p (the first `count`, the rest zero) as 16-byte halves.
inline void load_codes32(const uint8_t* p, int64_t count, __m128i& lo, __m128i& hi) {
  if (count >= 32) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
    return;
  }
  alignas(16) uint8_t t[32] = {};
  if (count > 0) std::memcpy(t, p, static_cast<size_t>(count));
  lo = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  hi = _mm_load_si128(reinterpret_cast<const __m128i*>(t + 16));
}

// 8 int8 values (the low 8 bytes of b) as float.
inline __m256 i8_to_ps(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

// 8 e4m3 codes (low 8 bytes of b) as their value times 2^-8 (no NaN among them).
inline __m256 fp8_to_ps_scaled(__m128i b) {
  const __m128i s = _mm_cvtepi8_epi16(b);  // sign-extended: bit 15 = the sign, bit 14 too
  const __m128i h = _mm_and_si128(_mm_slli_epi16(s, 7), _mm_set1_epi16(static_cast<short>(0xBF80)));
  return _mm256_cvtph_ps(h);
}

// The 32 weights of chunk k0 of column j as float, in w[4] (int8: the codes; fp8: value * 2^-8;
// mxfp4: 2 * e2m1; an mxfp4 block with e8m0 255 is the caller's slow path).
inline void chunk_ps(const GemvQuantJob& job, int j, int64_t k0, __m256 w[4]) {
  if (job.fmt == 3) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(job.w[j] + k0 / 2));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    const __m128i lut = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m128i v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));  // elements 0..15
    const __m128i v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));  // 16..31
    w[0] = i8_to_ps(v0), w[1] = i8_to_ps(_mm_unpackhi_epi64(v0, v0));
    w[2] = i8_to_ps(v1), w[3] = i8_to_ps(_mm_unpackhi_epi64(v1, v1));
    return;
  }
  __m128i lo, hi;
  load_codes32(job.w[j] + k0, job.K - k0, lo, hi);
  if (job.fmt == 1) {
    w[0] = i8_to_ps(lo), w[1] = i8_to_ps(_mm_unpackhi_epi64(lo, lo));
    w[2] = i8_to_ps(hi), w[3] = i8_to_ps(_mm_unpackhi_epi64(hi, hi));
    return;
  }
  w[0] = fp8_to_ps_scaled(lo), w[1] = fp8_to_ps_scaled(_mm_unpackhi_epi64(lo, lo));
  w[2] = fp8_to_ps_scaled(hi), w[3] = fp8_to_ps_scaled(_mm_unpackhi_epi64(hi, hi));
  const __m128i m7 = _mm_set1_epi8(0x7F);
  const int nan = _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(lo, m7), m7)) |
                  (_mm_movemask_epi8(_mm_cmpeq_epi8(_mm_and_si128(hi, m7), m7)) << 16);
  if (nan) {  // rare: NaN codes become NaN lanes
    alignas(32) float t[32];
    for (int q = 0; q < 4; ++q) _mm256_store_ps(t + 8 * q, w[q]);
    for (int e = 0; e < 32; ++e)
      if ((nan >> e) & 1) t[e] = std::nanf("");
    for (int q = 0; q < 4; ++q) w[q] = _mm256_load_ps(t + 8 * q);
  }
}

// The partial-sum factor of k block kb of column j: fp8 its scale_inv * 2^8, mxfp4 2^(s - 128)
// (the lookup gave twice the e2m1 value).
struct Pow2Table {  // 2^(s - 128) for every e8m0 byte s, exact (2^-128 is a float subnormal)
  float v[256];
  Pow2Table() {
    for (int s = 0; s < 256; ++s) v[s] = std::ldexp(1.0f, s - 128);
  }
};
const Pow2Table& pow2_table() {
  static const Pow2Table t;
  return t;
}

inline float block_factor(const GemvQuantJob& job, int j, int64_t kb) {
  if (job.fmt == 2) return static_cast<const float*>(job.s[j])[kb] * 256.0f;
  return pow2_table().v[static_cast<const uint8_t*>(job.s[j])[kb]];
}

// Columns [j0, j0 + G) against M rows of xf (float32, K padded to 32 with zeros, row stride ldx).
// pf[0..npf): the columns of the next two groups, whose rows are prefetched into L2 alongside
// this group's reads (as the AVX512-BF16 GEMV does, gemv_quant_avx512.cpp).
template <int M, int G>
void gemv_group(const GemvQuantJob& job, int j0, const float* xf, int64_t ldx, float* C, int64_t ldc, const int* pf,
                int npf) {
  const int64_t K = job.K;
  const int shift = job.fmt == 3 ? 1 : 0;  // bytes of a chunk: 32 codes, or 16 for mxfp4
  const bool blocked = job.fmt != 1;       // scales per k block: fp8 every bk, mxfp4 every 32
  const int64_t bk = job.fmt == 3 ? 32 : job.bk;
  __m256 acc[G][M], tot[G][M];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) acc[g][i] = tot[g][i] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    if (((k0 >> shift) & 63) == 0) {
      for (int r = 0; r < npf; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(job.w[pf[r]] + (k0 >> shift)), _MM_HINT_T1);
      if (job.fmt == 3 && (k0 & 2047) == 0)
        for (int r = 0; r < npf; ++r) _mm_prefetch(static_cast<const char*>(job.s[pf[r]]) + k0 / 32, _MM_HINT_T1);
    }
    for (int g = 0; g < G; ++g) {
      const int j = j0 + g;
      if (job.fmt == 3 && static_cast<const uint8_t*>(job.s[j])[k0 / 32] == 255) {
        // 2^128 overflows float: each weight as the reference makes it (ldexp(e2m1, 128): 0 or
        // +-inf, the bf16 table row job.mx[255] holds them exactly), its product added in element
        // order into lane 0.
        const uint8_t* blk = job.w[j] + k0 / 2;
        const uint16_t* row = job.mx + 16 * 255;
        for (int i = 0; i < M; ++i) {
          float s = 0.0f;
          for (int e = 0; e < 32; ++e) {
            const uint32_t bits = static_cast<uint32_t>(row[(blk[e / 2] >> (4 * (e % 2))) & 15]) << 16;
            float wv;
            std::memcpy(&wv, &bits, 4);
            s += xf[i * ldx + k0 + e] * wv;
          }
          tot[g][i] = _mm256_add_ps(tot[g][i], _mm256_setr_ps(s, 0, 0, 0, 0, 0, 0, 0));
        }
        continue;
      }
      __m256 w[4];
      chunk_ps(job, j, k0, w);
      for (int i = 0; i < M; ++i) {
        const float* x = xf + i * ldx + k0;
        __m256 a = acc[g][i];
        a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), a);
        a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), a);
        a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), a);
        acc[g][i] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), a);
      }
      if (blocked && (k0 + 32 >= K || (k0 + 32) % bk == 0)) {  // the end of a k block
        const __m256 f = _mm256_set1_ps(block_factor(job, j, k0 / bk));
        for (int i = 0; i < M; ++i) {
          tot[g][i] = _mm256_fmadd_ps(acc[g][i], f, tot[g][i]);
          acc[g][i] = _mm256_setzero_ps();
        }
      }
    }
  }
  for (int g = 0; g < G; ++g) {
    const float rs = job.fmt == 1 ? *static_cast<const float*>(job.s[j0 + g]) : 1.0f;
    for (int i = 0; i < M; ++i) {
      const float r = hsum_fixed(blocked ? tot[g][i] : acc[g][i]);
      C[i * ldc + j0 + g] = job.fmt == 1 ? r * rs : r;
    }
  }
}

// Accumulators: 2 x G x M of the 16 ymm registers.
template <int M>
void gemv_rows(const GemvQuantJob& job, const float* xf, int64_t ldx, float* C, int64_t ldc) {
  constexpr int G = M == 1 ? 4 : M == 2 ? 2 : 1;
  int j = 0;
  while (j < job.n) {
    if (!job.w[j]) {
      for (int i = 0; i < M; ++i) C[i * ldc + j] = 0.0f;
      ++j;
      continue;
    }
    int run = 1;
    while (run < G && j + run < job.n && job.w[j + run]) ++run;
    int pf[2 * G];
    int npf = 0;
    for (int c = j + run; c < job.n + job.n_next && npf < 2 * G; ++c)
      if (job.w[c]) pf[npf++] = c;
    if (run == G) gemv_group<M, G>(job, j, xf, ldx, C, ldc, pf, npf);
    else
      for (int r = 0; r < run; ++r) gemv_group<M, 1>(job, j + r, xf, ldx, C, ldc, pf, r + 1 == run ? npf : 0);
    j += run;
  }
}

}  // namespace

void gemv_quant_avx2(const GemvQuantJob& job, const uint16_t* A, int64_t lda, int64_t M, float* C, int64_t ldc) {
  if (M <= 0 || job.n <= 0) return;
  const int64_t ldx = (job.K + 31) / 32 * 32;
  thread_local std::vector<float> xf;
  for (int64_t i0 = 0; i0 < M; i0 += 4) {
    const int64_t m = M - i0 < 4 ? M - i0 : 4;
    xf.resize(static_cast<size_t>(m * ldx));
    for (int64_t i = 0; i < m; ++i) {
      const uint16_t* a = A + (i0 + i) * lda;
      float* x = xf.data() + i * ldx;
      int64_t k = 0;
      for (; k + 8 <= job.K; k += 8)  // bf16 -> float: the bits shifted up
        _mm256_storeu_ps(x + k,
                         _mm256_castsi256_ps(_mm256_slli_epi32(
                             _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + k))), 16)));
      for (; k < job.K; ++k) {
        const uint32_t u = static_cast<uint32_t>(a[k]) << 16;
        std::memcpy(x + k, &u, 4);
      }
      for (; k < ldx; ++k) x[k] = 0.0f;
    }
    float* c = C + i0 * ldc;
    switch (m) {
      case 1: gemv_rows<1>(job, xf.data(), ldx, c, ldc); break;
      case 2: gemv_rows<2>(job, xf.data(), ldx, c, ldc); break;
      case 3: gemv_rows<3>(job, xf.data(), ldx, c, ldc); break;
      default: gemv_rows<4>(job, xf.data(), ldx, c, ldc); break;
    }
  }
}

}  // namespace moe_cpu

MOE_AVX2_END

#endif  // MOE_CPU_X86
