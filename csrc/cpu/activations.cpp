// Gated activations (see activations.h): the AVX2 SwiGLU, the portable versions and the run-time
// choice.
#include "activations.h"

#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "row_io.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

using avx2::exp8;
using avx2::round8;

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

MOE_AVX2_END
#endif  // MOE_CPU_X86

}  // namespace

float silu_f32(float x) { return x / (1.f + std::exp(-x)); }

void gated_act_rows(const float* gate, const float* up, float* out, int64_t n, DType dt, bool swiglu) {
  if (swiglu) MOE_CPU_RETURN_IF_AVX2(dt, swiglu_avx, gate, up, out, n);
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
  if (swiglu) MOE_CPU_RETURN_IF_AVX2(dt, swiglu_block_avx, gate, up, ldi, out, ldo, rows, cols);
  for (int64_t r = 0; r < rows; ++r) gated_act_rows(gate + r * ldi, up + r * ldi, out + r * ldo, cols, dt, swiglu);
}

float gelu_f32(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752440f)); }

}  // namespace moe_cpu
