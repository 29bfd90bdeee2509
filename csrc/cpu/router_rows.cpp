// Router score rows (see router_rows.h): the AVX2 softmax / sigmoid and the run-time choice.
#include "router_rows.h"

#include <limits>

#include "cpu_features.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

using avx2::exp8;
using avx2::hsum;

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

MOE_AVX2_END
#endif  // MOE_CPU_X86

}  // namespace

// Without AVX2 both return false: topk_gating.cpp's scalar path (the one NaN rows and float64 take)
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

}  // namespace moe_cpu
