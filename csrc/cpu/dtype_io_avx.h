// 8-lane loads/stores between the kernel dtypes and float32 (x86 AVX2 + F16C), shared by
// kernels.cpp and combine_kernels.cpp. Include it inside the file's AVX2 target region
// (`#pragma GCC target("avx2,fma,f16c")` / clang attribute), so the intrinsics compile without a
// global -mavx2. bf16 stores round to nearest even with NaN -> 0x7FC0 (c10::BFloat16's rule);
// f16 stores use F16C's round to nearest even; tails are the callers' business.
#pragma once

#include <immintrin.h>

#include "dtype_io.h"

namespace moe_cpu {
namespace io {

template <DType DT>
inline __m256 load8(const void* p) {
  if constexpr (DT == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  } else {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}

template <DType DT>
inline void store8(void* p, __m256 x) {
  if constexpr (DT == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(p), x);
  } else if constexpr (DT == DType::F16) {
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(static_cast<__m128i*>(p), packed);
  }
}
}  // namespace io
}  // namespace moe_cpu
