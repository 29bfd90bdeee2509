// The k-way row combine kernel (see combine_row.h).
//
// Dataflow per output row: n source rows (dtype sdt, anywhere in memory) -> 4 float32 8-lane
// accumulators per 32-column chunk, held in registers across the whole j loop -> one rounded
// store in dtype odt. The j loop is innermost, so every source row streams through exactly once
// per token and nothing but the output row is written. The AVX2 code is compiled with a
// function-level target (no global -mavx2, simd_avx2.h) and chosen at run time.
#include "combine_row.h"

#include <algorithm>
#include <cstring>

#include "avx512_bf16.h"
#include "cpu_features.h"
#include "scalar_io.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

using io::load_scalar;
using io::store_scalar;

void combine_scalar(const void* const* src, const float* w, int n, DType sdt, void* out, DType odt, int64_t H) {
  constexpr int64_t B = 64;
  float acc[B];
  for (int64_t h0 = 0; h0 < H; h0 += B) {
    const int64_t nb = std::min(B, H - h0);
    for (int64_t i = 0; i < nb; ++i) acc[i] = 0.f;
    for (int j = 0; j < n; ++j) {
      if (w) {
        const float wj = w[j];
        for (int64_t i = 0; i < nb; ++i) {
          volatile float p = wj * load_scalar(src[j], sdt, h0 + i);
          acc[i] = acc[i] + p;
        }
      } else {
        for (int64_t i = 0; i < nb; ++i) acc[i] = acc[i] + load_scalar(src[j], sdt, h0 + i);
      }
    }
    for (int64_t i = 0; i < nb; ++i) store_scalar(out, odt, h0 + i, acc[i]);
  }
}

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

constexpr int64_t esize(DType dt) { return dt == DType::F32 ? 4 : 2; }

using avx2::load8;
using avx2::store8;

// acc = acc + w*y (kW) or acc + y; the empty asm keeps GCC/clang from contracting into an FMA.
template <bool kW>
inline __m256 acc_step(__m256 acc, __m256 y, __m256 wv) {
  if constexpr (kW) {
    y = _mm256_mul_ps(wv, y);
    __asm__("" : "+x"(y));
  }
  return _mm256_add_ps(acc, y);
}

// 8-column and partial tail chunks in column order (any dtypes); starts at column h.
template <DType SDT, DType ODT, bool kW>
void combine_avx_rest(const void* const* src, const float* w, int n, char* o, int64_t h, int64_t H) {
  constexpr int64_t es = esize(SDT), oes = esize(ODT);
  const __m256 one = _mm256_set1_ps(1.f);
  for (; h + 8 <= H; h += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const __m256 wv = kW ? _mm256_broadcast_ss(w + j) : one;
      a = acc_step<kW>(a, load8<SDT>(static_cast<const char*>(src[j]) + h * es), wv);
    }
    store8<ODT>(o + h * oes, a);
  }
  if (h < H) {  // partial chunk: zero-filled scratch, same instructions as the body
    const int64_t r = H - h;
    __m256 a = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      alignas(32) char tmp[32] = {0};
      std::memcpy(tmp, static_cast<const char*>(src[j]) + h * es, r * es);
      const __m256 wv = kW ? _mm256_broadcast_ss(w + j) : one;
      a = acc_step<kW>(a, load8<SDT>(tmp), wv);
    }
    alignas(32) char res[32];
    store8<ODT>(res, a);
    std::memcpy(o + h * oes, res, r * oes);
  }
}

// Generic body: 64 columns (8 accumulators, enough independent add chains to hide the add
// latency at any k) in column order.
// Software prefetch of the next token's source rows, at the same columns as the chunk being
// combined (one token ahead: the rows are scattered, so the hardware prefetcher only catches up
// part way into each row).
template <int64_t kBytes>
inline void prefetch_next(const void* const* next, int n_next, int64_t off) {
  for (int j = 0; j < n_next; ++j)
    for (int64_t b = 0; b < kBytes; b += 64) _mm_prefetch(static_cast<const char*>(next[j]) + off + b, _MM_HINT_T0);
}

template <DType SDT, DType ODT, bool kW>
void combine_avx(const void* const* src, const float* w, int n, void* out, int64_t H, const void* const* next,
                 int n_next) {
  constexpr int64_t es = esize(SDT), oes = esize(ODT);
  constexpr int NV = 8;
  char* o = static_cast<char*>(out);
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t h = 0;
  for (; h + 8 * NV <= H; h += 8 * NV) {
    prefetch_next<8 * NV * es>(next, n_next, h * es);
    __m256 a[NV];
    for (int v = 0; v < NV; ++v) a[v] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const char* s = static_cast<const char*>(src[j]) + h * es;
      const __m256 wv = kW ? _mm256_broadcast_ss(w + j) : one;
      for (int v = 0; v < NV; ++v) a[v] = acc_step<kW>(a[v], load8<SDT>(s + 8 * v * es), wv);
    }
    for (int v = 0; v < NV; ++v) store8<ODT>(o + (h + 8 * v) * oes, a[v]);
  }
  combine_avx_rest<SDT, ODT, kW>(src, w, n, o, h, H);
}

// bf16 -> bf16 body. One 256-bit load of 16 bf16 widens with one shift (even columns) and one
// AND (odd columns), no cross-lane shuffles; the two accumulators are rounded and merged back
// with one shift/AND + OR into 16 interleaved bf16 (one store). Every element sees the same
// mul/add/round as the column-order code, so the bits are identical.
#define MOE_CPU_UNLIKELY(x) __builtin_expect(!!(x), 0)

// Stores 16 bf16: even columns from `e`, odd columns from `o`, each rounded to nearest even
// (c10::BFloat16's rule; NaN -> 0x7FC0 when kNaN). Works on the interleaved 16-bit words
// directly: u = the truncated bf16 words, lo = the discarded low halves; the round-up bit is
// bit 16 of lo + 0x7FFF + lsb(u) = bit 15 of avg_epu16(lo, 0x7FFE + lsb) (avg computes
// (a + b + 1) >> 1 in 17 bits), so u + that bit is the rounded value (a compare instead of a
// shift: shifts compete with the bf16 widening for Zen3's two shift pipes).
template <bool kNaN>
inline void store16_bf16(char* dst, __m256 e, __m256 o) {
  const __m256i be = _mm256_castps_si256(e), bo = _mm256_castps_si256(o);
  const __m256i u = _mm256_blend_epi16(_mm256_srli_epi32(be, 16), bo, 0xAA);
  const __m256i lo = _mm256_blend_epi16(be, _mm256_slli_epi32(bo, 16), 0xAA);
  const __m256i c = _mm256_add_epi16(_mm256_and_si256(u, _mm256_set1_epi16(1)), _mm256_set1_epi16(0x7FFE));
  // round-up bit set <=> the avg is >= 0x8000 <=> negative as int16: u - (0 > avg ? -1 : 0)
  __m256i r = _mm256_sub_epi16(u, _mm256_cmpgt_epi16(_mm256_setzero_si256(), _mm256_avg_epu16(lo, c)));
  if constexpr (kNaN) {
    const __m256i ne = _mm256_castps_si256(_mm256_cmp_ps(e, e, _CMP_UNORD_Q));
    const __m256i no = _mm256_castps_si256(_mm256_cmp_ps(o, o, _CMP_UNORD_Q));
    const __m256i nan = _mm256_blend_epi16(ne, no, 0xAA);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi16(0x7FC0), nan);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), r);
}

__attribute__((noinline)) void store64_bf16_nan(char* dst, __m256 e0, __m256 o0, __m256 e1, __m256 o1, __m256 e2,
                                                __m256 o2, __m256 e3, __m256 o3) {
  store16_bf16<true>(dst, e0, o0);
  store16_bf16<true>(dst + 32, e1, o1);
  store16_bf16<true>(dst + 64, e2, o2);
  store16_bf16<true>(dst + 96, e3, o3);
}

template <bool kW>
void combine_avx_bf16(const void* const* src, const float* w, int n, void* out, int64_t H, const void* const* next,
                      int n_next) {
  constexpr int NV = 4;  // 4 x 16 columns = 8 accumulators
  char* o = static_cast<char*>(out);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t h = 0;
  for (; h + 16 * NV <= H; h += 16 * NV) {
    prefetch_next<16 * NV * 2>(next, n_next, h * 2);
    __m256 ae[NV], ao[NV];
    for (int v = 0; v < NV; ++v) ae[v] = ao[v] = _mm256_setzero_ps();
    for (int j = 0; j < n; ++j) {
      const char* s = static_cast<const char*>(src[j]) + h * 2;
      const __m256 wv = kW ? _mm256_broadcast_ss(w + j) : one;
      for (int v = 0; v < NV; ++v) {
        const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32 * v));
        ae[v] = acc_step<kW>(ae[v], _mm256_castsi256_ps(_mm256_slli_epi32(y, 16)), wv);
        ao[v] = acc_step<kW>(ao[v], _mm256_castsi256_ps(_mm256_and_si256(y, hi)), wv);
      }
    }
    // NaN is rare: one unordered compare per accumulator pair decides for the whole chunk, and
    // the NaN-aware store is out of line (keeps the common path free of spills).
    __m256 anynan = _mm256_cmp_ps(ae[0], ao[0], _CMP_UNORD_Q);
    for (int v = 1; v < NV; ++v) anynan = _mm256_or_ps(anynan, _mm256_cmp_ps(ae[v], ao[v], _CMP_UNORD_Q));
    if (MOE_CPU_UNLIKELY(!_mm256_testz_ps(anynan, anynan))) {
      store64_bf16_nan(o + h * 2, ae[0], ao[0], ae[1], ao[1], ae[2], ao[2], ae[3], ao[3]);
    } else {
      for (int v = 0; v < NV; ++v) store16_bf16<false>(o + (h + 16 * v) * 2, ae[v], ao[v]);
    }
  }
  combine_avx_rest<DType::BF16, DType::BF16, kW>(src, w, n, o, h, H);
}

template <DType SDT, DType ODT>
void combine_avx_w(const void* const* src, const float* w, int n, void* out, int64_t H, const void* const* next,
                   int n_next) {
  if constexpr (SDT == DType::BF16 && ODT == DType::BF16) {
    if (w) combine_avx_bf16<true>(src, w, n, out, H, next, n_next);
    else combine_avx_bf16<false>(src, w, n, out, H, next, n_next);
    return;
  }
  if (w) combine_avx<SDT, ODT, true>(src, w, n, out, H, next, n_next);
  else combine_avx<SDT, ODT, false>(src, w, n, out, H, next, n_next);
}

template <DType SDT>
void combine_avx_o(const void* const* src, const float* w, int n, DType odt, void* out, int64_t H,
                   const void* const* next, int n_next) {
  switch (odt) {
    case DType::F32: combine_avx_w<SDT, DType::F32>(src, w, n, out, H, next, n_next); break;
    case DType::F16: combine_avx_w<SDT, DType::F16>(src, w, n, out, H, next, n_next); break;
    default: combine_avx_w<SDT, DType::BF16>(src, w, n, out, H, next, n_next); break;
  }
}

MOE_AVX2_END
#endif  // MOE_CPU_X86

}  // namespace

void combine_row(const void* const* src, const float* w, int n, DType sdt, void* out, DType odt, int64_t H,
                 const void* const* next, int n_next) {
  if (sdt == DType::BF16 && odt == DType::BF16 && use_avx512_bf16())
    return combine_row_bf16_avx512(src, w, n, out, H, next, n_next);
#ifdef MOE_CPU_X86
  if (have_avx2()) {
    switch (sdt) {
      case DType::F32: combine_avx_o<DType::F32>(src, w, n, odt, out, H, next, n_next); return;
      case DType::F16: combine_avx_o<DType::F16>(src, w, n, odt, out, H, next, n_next); return;
      default: combine_avx_o<DType::BF16>(src, w, n, odt, out, H, next, n_next); return;
    }
  }
#endif
  (void)next;
  (void)n_next;
  combine_scalar(src, w, n, sdt, out, odt, H);
}

}  // namespace moe_cpu
