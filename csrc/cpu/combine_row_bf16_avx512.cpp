// The bf16 -> bf16 k-way row combine (avx512_bf16.h combine_row_bf16_avx512) in AVX-512
// intrinsics, compiled once per instruction set (avx512_bf16_isa.h).
//
// Dataflow per output row, 64 columns at a time: n source rows -> 16-column bf16 loads widened
// to float32 (zero-extend + shift) -> acc = acc + w*y in j order in 4 zmm accumulators (the
// reference's multiply-then-add, accumulator from +0.0) -> vcvtne2ps2bf16 rounds 32 columns to
// bf16 in one instruction. That instruction flushes denormals and keeps NaN payloads, where
// c10::BFloat16 rounds denormals and stores every NaN as 0x7FC0: a chunk whose sums hold a NaN or
// a denormal (one vfpclassps per 16 columns) takes the scalar c10 rounding instead. Row tails
// use masked loads and stores. The result is bitwise that of the AVX2 and portable combines.

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"

#ifndef MOE_CPU_AVX512_NS
#error "compiled by cpu.cmake once per instruction set, with -DMOE_CPU_AVX512_NS=avx512_native|avx512_emu"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {

namespace {

inline uint16_t c512_round_bf16(float f) {  // c10::BFloat16's rounding (round to nearest even)
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <bool kW>
void c512_combine(const void* const* src, const float* w, int n, uint16_t* out, int64_t H, const void* const* next,
                  int n_next) {
  constexpr int64_t kChunk = 64;
  for (int64_t h = 0; h < H; h += kChunk) {
    const int64_t r = H - h < kChunk ? H - h : kChunk;  // columns in this chunk
    // The next token's rows at these columns (scattered rows: the hardware prefetcher only
    // catches up part way into each).
    for (int j = 0; j < n_next; ++j) {
      const char* p = static_cast<const char*>(next[j]) + h * 2;
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + 64, _MM_HINT_T0);
    }
    __m512 acc[4];
    for (int v = 0; v < 4; ++v) acc[v] = _mm512_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const uint16_t* s = static_cast<const uint16_t*>(src[j]) + h;
      const __m512 wv = _mm512_set1_ps(kW ? w[j] : 1.f);
      for (int v = 0; v < 4; ++v) {
        const int64_t c0 = 16 * v;
        if (c0 >= r) break;
        const __m256i raw = r - c0 >= 16
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + c0))
                                : _mm256_maskz_loadu_epi16(static_cast<uint16_t>((1u << (r - c0)) - 1u), s + c0);
        __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        if (kW) {
          y = _mm512_mul_ps(wv, y);
          MOE_NO_CONTRACT(y);
        }
        acc[v] = _mm512_add_ps(acc[v], y);
      }
    }
    for (int p = 0; p < 2; ++p) {  // 32 columns per rounding step
      const int64_t c0 = 32 * p;
      if (c0 >= r) break;
      const int64_t m = r - c0 < 32 ? r - c0 : 32;
      const unsigned bad = static_cast<unsigned>(_mm512_fpclass_ps_mask(acc[2 * p], 0xA1)) |
                           static_cast<unsigned>(_mm512_fpclass_ps_mask(acc[2 * p + 1], 0xA1));  // NaN | denormal
      uint16_t* dst = out + h + c0;
      if (__builtin_expect(bad == 0, 1)) {
        const __m512i b = bits_as<__m512i>(_mm512_cvtne2ps_pbh(acc[2 * p + 1], acc[2 * p]));
        if (m == 32) _mm512_storeu_si512(dst, b);
        else _mm512_mask_storeu_epi16(dst, static_cast<uint32_t>((1ull << m) - 1ull), b);
      } else {
        float f[32];
        _mm512_storeu_ps(f, acc[2 * p]);
        _mm512_storeu_ps(f + 16, acc[2 * p + 1]);
        for (int64_t i = 0; i < m; ++i) dst[i] = c512_round_bf16(f[i]);
      }
    }
  }
}

}  // namespace

void combine_row_bf16_avx512(const void* const* src, const float* w, int n, void* out, int64_t H,
                             const void* const* next, int n_next) {
  if (w) c512_combine<true>(src, w, n, static_cast<uint16_t*>(out), H, next, n_next);
  else c512_combine<false>(src, w, n, static_cast<uint16_t*>(out), H, next, n_next);
}

}  // namespace moe_cpu::MOE_CPU_AVX512_NS
