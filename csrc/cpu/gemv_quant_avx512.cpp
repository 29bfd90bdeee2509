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
//
// The fast paths (measured, docs/quantization.md "Speed"): per-element conversion work, not the
// weight bytes, bounded the GEMV above. So fp8 (k blocks a multiple of 64, AVX512-VBMI) converts
// 64 codes at a time: two vpermi2b lookups of the 7 magnitude bits give the bf16 high and low
// bytes, vpunpck*bw interleaves them. mxfp4 takes nibble v of each 16-bit code word through one
// vpermw of the unscaled e2m1 values (64 code bytes, 4 blocks, a step) and multiplies each
// block's partial sums by its 2^(s-127) (exact); rows with a scale >= 253, where code *
// 2^(s-127) can overflow as the reference's weights do, take the table path. Both hand the
// weights over in the instructions' lane order, not K's: the activation rows are permuted once
// per call to match (job.xbuf; the dot product does not care, only the float summation order
// changes, the same in both builds).

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"
#include "quant_codes_avx512.h"

#include <cstring>

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

// Byte `byte` of the weight rows (prefetch_rows) or the mxfp4 e8m0 rows (prefetch_scale_rows) of
// columns pf[0..npf), into L2.
inline void prefetch_rows(const GemvQuantJob& job, const int* pf, int npf, int64_t byte) {
  for (int r = 0; r < npf; ++r) _mm_prefetch(reinterpret_cast<const char*>(job.w[pf[r]] + byte), _MM_HINT_T1);
}
inline void prefetch_scale_rows(const GemvQuantJob& job, const int* pf, int npf, int64_t byte) {
  for (int r = 0; r < npf; ++r) _mm_prefetch(static_cast<const char*>(job.s[pf[r]]) + byte, _MM_HINT_T1);
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
    if (((k0 >> shift) & 63) == 0) prefetch_rows(job, pf, npf, k0 >> shift);
    if (job.fmt == 3 && (k0 & 2047) == 0) prefetch_scale_rows(job, pf, npf, k0 / 32);  // a line per 2048 elements
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

#if MOE_CPU_AVX512_EMULATED
#define MOE_VBMI
inline bool have_vbmi() { return true; }
#else
#define MOE_VBMI __attribute__((target("avx512vbmi")))
inline bool have_vbmi() {
  static const bool ok = __builtin_cpu_supports("avx512vbmi");
  return ok;
}
#endif

// Where the activation's elements go (vpermt2w indices into a pair of 32-element vectors):
// fp8, per 64 elements, two vectors: lane 8L+i <- element 16L+i (vpunpcklbw's order) and 16L+8+i
// (vpunpckhbw's); mxfp4, per 128 elements (4 blocks), four vectors: lane j of vector v <- element
// 4j + v (nibble v of 16-bit word j of the codes), the two halves (blocks 0-1, 2-3) blended at
// lane 16.
struct PermIdx {
  alignas(64) uint16_t fp8[2][32];
  alignas(64) uint16_t mx[4][32];
  constexpr PermIdx() : fp8(), mx() {
    for (int j = 0; j < 32; ++j) {
      const int L = j / 8, i = j % 8;
      fp8[0][j] = static_cast<uint16_t>(16 * L + i);
      fp8[1][j] = static_cast<uint16_t>(16 * L + 8 + i);
      for (int v = 0; v < 4; ++v) mx[v][j] = static_cast<uint16_t>(4 * (j % 16) + v);
    }
  }
};
inline constexpr PermIdx kPermIdx{};

// The high and low bytes of kFp8Magnitudes (vpermi2b tables: 128 entries in two vectors each).
struct Fp8Bytes {
  alignas(64) uint8_t hi[128];
  alignas(64) uint8_t lo[128];
  constexpr Fp8Bytes() : hi(), lo() {
    for (int m = 0; m < 128; ++m) {
      hi[m] = static_cast<uint8_t>(kFp8Magnitudes.v[m] >> 8);
      lo[m] = static_cast<uint8_t>(kFp8Magnitudes.v[m] & 0xFF);
    }
  }
};
inline constexpr Fp8Bytes kFp8Bytes{};

// e2m1 (unscaled) as bf16 bits, twice: a vpermw table whose index bit 4 (the next nibble's bit 0,
// never masked off) does not matter.
struct E2m1Words {
  alignas(64) uint16_t v[32];
  constexpr E2m1Words() : v() {
    constexpr uint16_t e[16] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
    for (int b = 0; b < 32; ++b) v[b] = e[b % 16];
  }
};
inline constexpr E2m1Words kE2m1Words{};

// Rows [0, M) of A (K elements each) into xbuf (rows of gemv_xbuf_elems(K)), permuted per step of
// S = 64 (fp8) or 128 (mxfp4) elements as PermIdx says, zero past K.
template <int S>
void permute_rows(const uint16_t* A, int64_t lda, int M, int64_t K, uint16_t* xbuf) {
  const int64_t ld = gemv_xbuf_elems(K);
  const __m512i* ix = reinterpret_cast<const __m512i*>(S == 64 ? &kPermIdx.fp8[0][0] : &kPermIdx.mx[0][0]);
  for (int r = 0; r < M; ++r) {
    const uint16_t* a = A + r * lda;
    uint16_t* o = xbuf + r * ld;
    for (int64_t k0 = 0; k0 < ld; k0 += S) {
      __m512i v[S / 32];
      for (int q = 0; q < S / 32; ++q) {
        const int64_t left = K - k0 - 32 * q;
        const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (left > 0 ? left : 0)) - 1ull);
        v[q] = left > 0 ? _mm512_maskz_loadu_epi16(m, a + k0 + 32 * q) : _mm512_setzero_si512();
      }
      if (S == 64) {
        for (int h = 0; h < 2; ++h)
          _mm512_storeu_si512(o + k0 + 32 * h, _mm512_permutex2var_epi16(v[0], _mm512_load_si512(ix + h), v[1]));
      } else {
        for (int h = 0; h < 4; ++h) {
          const __m512i idx = _mm512_load_si512(ix + h);
          const __m512i lo = _mm512_permutex2var_epi16(v[0], idx, v[1]);
          const __m512i hi = _mm512_permutex2var_epi16(v[S / 32 - 2], idx, v[S / 32 - 1]);
          _mm512_storeu_si512(o + k0 + 32 * h, _mm512_mask_blend_epi16(0xFFFF0000u, lo, hi));
        }
      }
    }
  }
}

// int8: the table path's arithmetic, without its per-chunk format dispatch and tail masks.
template <int M, int G>
void group_int8(const GemvQuantJob& job, int j0, const uint16_t* A, int64_t lda, float* C, int64_t ldc, const int* pf,
                int npf) {
  const int64_t K = job.K;
  const uint8_t* w[G];
  for (int g = 0; g < G; ++g) w[g] = job.w[j0 + g];
  __m512 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) acc[g][i] = _mm512_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 32 <= K; k0 += 32) {
    if ((k0 & 63) == 0) prefetch_rows(job, pf, npf, k0);
    __m512bh x[M];
    for (int i = 0; i < M; ++i) x[i] = bits_as<__m512bh>(_mm512_loadu_si512(A + i * lda + k0));
    for (int g = 0; g < G; ++g) {
      const __m512 lo =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[g] + k0))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[g] + k0 + 16))));
      const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);
      for (int i = 0; i < M; ++i) acc[g][i] = _mm512_dpbf16_ps(acc[g][i], wv, x[i]);
    }
  }
  if (k0 < K) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (K - k0)) - 1ull);
    for (int g = 0; g < G; ++g) {
      const __m512bh wv = bits_as<__m512bh>(codes_to_bf16(w[g] + k0, K - k0, 1));
      for (int i = 0; i < M; ++i)
        acc[g][i] = _mm512_dpbf16_ps(acc[g][i], wv, bits_as<__m512bh>(_mm512_maskz_loadu_epi16(m, A + i * lda + k0)));
    }
  }
  for (int g = 0; g < G; ++g) {
    const float rs = *static_cast<const float*>(job.s[j0 + g]);
    for (int i = 0; i < M; ++i) C[i * ldc + j0 + g] = sum16(acc[g][i]) * rs;
  }
}

// 64 e4m3 codes -> two vectors of their bf16 bits, in vpunpck{l,h}bw's lane order.
MOE_VBMI inline void fp8_step(const uint8_t* p, const __m512i (&t)[4], __m512i& w0, __m512i& w1) {
  const __m512i c = _mm512_loadu_si512(p);
  // vpermi2b reads index bits 0-6 (the magnitude); the sign, bit 7, goes to the high byte (0xF8: A | (B & C)).
  const __m512i hb = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(t[0], c, t[1]), c,
                                               _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);
  const __m512i lb = _mm512_permutex2var_epi8(t[2], c, t[3]);
  w0 = _mm512_unpacklo_epi8(lb, hb);
  w1 = _mm512_unpackhi_epi8(lb, hb);
}

// fp8 with bk % 64 == 0: steps of 64 elements, a k block's partial sums scaled as the table path does.
template <int M, int G>
MOE_VBMI void group_fp8(const GemvQuantJob& job, int j0, const uint16_t* X, float* C, int64_t ldc, const int* pf,
                        int npf) {
  const int64_t K = job.K, ldx = gemv_xbuf_elems(K), nsteps = (K + 63) / 64, spb = job.bk / 64;
  const int64_t nkb = (K + job.bk - 1) / job.bk;
  const __m512i* tb = reinterpret_cast<const __m512i*>(kFp8Bytes.hi);
  const __m512i t[4] = {_mm512_load_si512(tb), _mm512_load_si512(tb + 1), _mm512_load_si512(tb + 2),
                        _mm512_load_si512(tb + 3)};
  const uint8_t* w[G];
  const float* s[G];
  for (int g = 0; g < G; ++g) w[g] = job.w[j0 + g], s[g] = static_cast<const float*>(job.s[j0 + g]);
  __m512 acc[G][M], tot[G][M];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) acc[g][i] = tot[g][i] = _mm512_setzero_ps();
  // The last step's codes past K read as zero (their activations are zero too: no 0 * NaN), copied
  // here once: a library call inside the loop would make every accumulator live in memory.
  alignas(64) uint8_t tail[G][64];
  const int64_t kt = (nsteps - 1) * 64;
  if (kt + 64 > K)
    for (int g = 0; g < G; ++g) {
      std::memset(tail[g], 0, 64);
      std::memcpy(tail[g], w[g] + kt, static_cast<size_t>(K - kt));
    }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t s1 = (kb + 1) * spb < nsteps ? (kb + 1) * spb : nsteps;
    for (int64_t st = kb * spb; st < s1; ++st) {
      const int64_t k0 = st * 64;
      prefetch_rows(job, pf, npf, k0);
      __m512bh x0[M], x1[M];
      for (int i = 0; i < M; ++i) {
        x0[i] = bits_as<__m512bh>(_mm512_loadu_si512(X + i * ldx + k0));
        x1[i] = bits_as<__m512bh>(_mm512_loadu_si512(X + i * ldx + k0 + 32));
      }
      const bool part = k0 + 64 > K;
      for (int g = 0; g < G; ++g) {
        __m512i w0, w1;
        fp8_step(part ? tail[g] : w[g] + k0, t, w0, w1);
        for (int i = 0; i < M; ++i)
          acc[g][i] =
              _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[g][i], bits_as<__m512bh>(w0), x0[i]), bits_as<__m512bh>(w1), x1[i]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 sc = _mm512_set1_ps(s[g][kb]);
      for (int i = 0; i < M; ++i) {
        __m512 p = _mm512_mul_ps(acc[g][i], sc);
        MOE_NO_CONTRACT(p);  // the same rounding in both builds
        tot[g][i] = _mm512_add_ps(tot[g][i], p);
        acc[g][i] = _mm512_setzero_ps();
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) C[i * ldc + j0 + g] = sum16(tot[g][i]);
}

inline int load_u32(const uint8_t* p) {
  int v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

// mxfp4, 4 blocks a step: the unscaled e2m1 values (one block a 128-bit lane), their partial
// sums times 2^(s-127) (exact: a power of two). false (nothing written): a scale >= 253, where
// the table path must run (its weights overflow to inf exactly where the reference's do).
template <int M, int G>
bool group_mx(const GemvQuantJob& job, int j0, const uint16_t* X, float* C, int64_t ldc, const int* pf, int npf) {
  const int64_t K = job.K, ldx = gemv_xbuf_elems(K), nb = K / 32, nsteps = (nb + 3) / 4;
  const __m512i tab = _mm512_load_si512(kE2m1Words.v);
  // dwords of 128-bit lane L <- byte L of the 4 scale bytes, zero-extended (0x80: vpshufb's zero)
  const __m512i ssel =
      _mm512_set_epi32(0x80808003, 0x80808003, 0x80808003, 0x80808003, 0x80808002, 0x80808002, 0x80808002, 0x80808002,
                       0x80808001, 0x80808001, 0x80808001, 0x80808001, 0x80808000, 0x80808000, 0x80808000, 0x80808000);
  const uint8_t* w[G];
  const uint8_t* s[G];
  for (int g = 0; g < G; ++g) w[g] = job.w[j0 + g], s[g] = static_cast<const uint8_t*>(job.s[j0 + g]);
  __m512 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) acc[g][i] = _mm512_setzero_ps();
  // A scale >= 253 anywhere in the rows: the table path (before any work; 32 bytes at a time).
  const __m256i lim = _mm256_set1_epi8(static_cast<char>(253));
  for (int g = 0; g < G; ++g) {
    int64_t b = 0;
    for (; b + 32 <= nb; b += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s[g] + b));
      if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(v, lim), v))) return false;
    }
    for (; b < nb; ++b)
      if (s[g][b] >= 253) return false;
  }
  // The last step's blocks past the row: zero codes (and zero activations), scale 2^0; copied
  // here once (a library call inside the loop would make every accumulator live in memory).
  alignas(64) uint8_t tail[G][64];
  uint32_t tail_s[G];
  const int64_t bt = (nsteps - 1) * 4;
  if (bt + 4 > nb)
    for (int g = 0; g < G; ++g) {
      std::memset(tail[g], 0, 64);
      std::memcpy(tail[g], w[g] + bt * 16, static_cast<size_t>((nb - bt) * 16));
      tail_s[g] = 0x7F7F7F7Fu;
      std::memcpy(&tail_s[g], s[g] + bt, static_cast<size_t>(nb - bt));
    }
  for (int64_t st = 0; st < nsteps; ++st) {
    const int64_t b0 = 4 * st;
    prefetch_rows(job, pf, npf, b0 * 16);
    if ((st & 15) == 0) prefetch_scale_rows(job, pf, npf, b0);  // a line per 64 blocks
    const bool part = b0 + 4 > nb;
    for (int g = 0; g < G; ++g) {
      const uint8_t* src = part ? tail[g] : w[g] + b0 * 16;
      const uint8_t* sp = part ? reinterpret_cast<const uint8_t*>(&tail_s[g]) : s[g] + b0;
      const __m512i c = _mm512_loadu_si512(src);
      // nibble v of each 16-bit word: vpermw reads index bits 0-4, so no mask
      const __m512bh wv[4] = {bits_as<__m512bh>(_mm512_permutexvar_epi16(c, tab)),
                              bits_as<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(c, 4), tab)),
                              bits_as<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(c, 8), tab)),
                              bits_as<__m512bh>(_mm512_permutexvar_epi16(_mm512_srli_epi16(c, 12), tab))};
      const __m512 sc =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_shuffle_epi8(_mm512_set1_epi32(load_u32(sp)), ssel), 23));
      for (int i = 0; i < M; ++i) {
        const uint16_t* xr = X + i * ldx + b0 * 32;
        __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), wv[0], bits_as<__m512bh>(_mm512_loadu_si512(xr)));
        p = _mm512_dpbf16_ps(p, wv[1], bits_as<__m512bh>(_mm512_loadu_si512(xr + 32)));
        p = _mm512_dpbf16_ps(p, wv[2], bits_as<__m512bh>(_mm512_loadu_si512(xr + 64)));
        p = _mm512_dpbf16_ps(p, wv[3], bits_as<__m512bh>(_mm512_loadu_si512(xr + 96)));
        acc[g][i] = _mm512_fmadd_ps(p, sc, acc[g][i]);  // p * 2^(s-127) is exact: one rounding either way
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < M; ++i) C[i * ldc + j0 + g] = sum16(acc[g][i]);
  return true;
}

// Columns [j0, j0 + G) by the fastest path that takes them.
template <int M, int G>
void run_group(const GemvQuantJob& job, bool fast, int j0, const uint16_t* A, int64_t lda, float* C, int64_t ldc,
               const int* pf, int npf) {
  if (job.fmt == 1) return group_int8<M, G>(job, j0, A, lda, C, ldc, pf, npf);
  if (fast && job.fmt == 2) return group_fp8<M, G>(job, j0, job.xbuf, C, ldc, pf, npf);
  if (fast && job.fmt == 3 && group_mx<M, G>(job, j0, job.xbuf, C, ldc, pf, npf)) return;
  gemv_group<M, G>(job, j0, A, lda, C, ldc, pf, npf);
}

// Accumulators: G x M (x 2 for fp8) of the 32 zmm registers.
template <int M>
void gemv_rows(const GemvQuantJob& job, const uint16_t* A, int64_t lda, float* C, int64_t ldc) {
  constexpr int G = M <= 2 ? 4 : 2;
  const bool fast = job.xbuf && (job.fmt == 3 || (job.fmt == 2 && job.bk % 64 == 0 && have_vbmi()));
  if (fast) {
    if (job.fmt == 2) permute_rows<64>(A, lda, M, job.K, job.xbuf);
    else permute_rows<128>(A, lda, M, job.K, job.xbuf);
  }
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
    for (int c = j + run; c < job.n + job.n_next && npf < 2 * G; ++c)
      if (job.w[c]) pf[npf++] = c;
    if (run == G) run_group<M, G>(job, fast, j, A, lda, C, ldc, pf, npf);
    else
      for (int r = 0; r < run; ++r) run_group<M, 1>(job, fast, j + r, A, lda, C, ldc, pf, r + 1 == run ? npf : 0);
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
