// Row conversions between the kernel dtypes and float32 (see row_io.h): portable code, the AVX2
// versions, and the run-time choice between them.
#include "row_io.h"

#include <cstring>

#include "cpu_features.h"
#include "scalar_io.h"
#include "simd_avx2.h"

namespace moe_cpu {
namespace {

using io::load_scalar;
using io::store_scalar;

void row_to_f32_scalar(const void* src, DType dt, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load_scalar(src, dt, i);
}
void row_from_f32_scalar(const float* src, void* dst, DType dt, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store_scalar(dst, dt, i, src[i]);
}

#ifdef MOE_CPU_X86
MOE_AVX2_BEGIN

using avx2::load8;
using avx2::round8;
using avx2::store8;

// 8 at a time; the tail goes through an 8-wide scratch so it rounds exactly like the body (no
// scalar FMA contraction differences).
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

MOE_AVX2_END
#endif  // MOE_CPU_X86

}  // namespace

void row_to_f32(const void* src, DType dt, float* dst, int64_t n) {
  MOE_CPU_RETURN_IF_AVX2(dt, row_to_f32_avx, src, dst, n);
  row_to_f32_scalar(src, dt, dst, n);
}

void row_from_f32(const float* src, void* dst, DType dt, int64_t n) {
  MOE_CPU_RETURN_IF_AVX2(dt, row_from_f32_avx, src, dst, n);
  row_from_f32_scalar(src, dst, dt, n);
}

void round_rows(const float* src, float* dst, int64_t n, DType dt) {
  MOE_CPU_RETURN_IF_AVX2(dt, round_avx, src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = round_through(src[i], dt);
}

}  // namespace moe_cpu
