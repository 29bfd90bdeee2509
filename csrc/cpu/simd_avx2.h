// The 8-lane float32 building blocks every AVX2 kernel shares, so they all round alike:
// loads / stores between the kernel dtypes and float32 (load8 / store8), rounding through a
// dtype (round8), exp over the whole float range (exp8), the horizontal sum (hsum) and the row
// blocking of the register-blocked GEMMs (for_row_blocks).
//
// Everything here is compiled for AVX2+FMA+F16C by a function-level target (no global -mavx2),
// so the extension still loads on CPUs without AVX2; the kernels call it only when have_avx2()
// (cpu_features.h). A .cpp that includes this header wraps its own AVX2 functions in
// MOE_AVX2_BEGIN / MOE_AVX2_END (they must share the target to inline these). Defines MOE_CPU_X86.
#pragma once

#include "dtype.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOE_CPU_X86 1
#include <immintrin.h>

#include <cstdint>

// MOE_AVX2_BEGIN ... MOE_AVX2_END: a region whose functions are compiled for AVX2+FMA+F16C while
// the rest of the file is not (they run only after have_avx2()); one spelling for GCC and clang.
#if defined(__clang__)
#define MOE_AVX2_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define MOE_AVX2_END _Pragma("clang attribute pop")
#else
#define MOE_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define MOE_AVX2_END _Pragma("GCC pop_options")
#endif

MOE_AVX2_BEGIN

namespace moe_cpu::avx2 {

// bf16 stores round to nearest even with NaN -> 0x7FC0 (c10::BFloat16's rule); f16 stores use
// F16C's round to nearest even; tails are the callers' business.
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

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// x rounded through dt (bf16: round to nearest even on the bit pattern; f16: F16C).
template <DType DT>
inline __m256 round8(__m256 x) {
  if constexpr (DT == DType::F32) {
    return x;
  } else if constexpr (DT == DType::F16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  } else {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, nan);
  }
}

// exp(x), Cephes-style range reduction + degree-5 polynomial (~1-2 ulp), over the whole float
// range like libm and torch: exp(+inf) = +inf (and x > ~88.72 overflows to it), exp(-inf) = 0,
// results below FLT_MIN are denormals (down to 0 below ~-103.97); NaN propagates. Clamping x to
// the range where the result is normal instead would make sigmoid(-inf) = 4e-39 > 0 (a masked
// expert beating a real denormal score) and silu(-inf) = -inf (torch: NaN). 2^n is applied as
// two factors 2^(n>>1) * 2^(n - (n>>1)), so neither exponent field overflows and the one
// rounding is that of the final (possibly denormal) product.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(89.0f), x);    // exp(89) overflows anyway; NaN in x is kept (2nd operand)
  x = _mm256_max_ps(_mm256_set1_ps(-110.0f), x);  // exp(-110) rounds to 0 anyway
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_cvttps_epi32(fx);  // in [-159, 128]
  const __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, p1), p2);
}

// Row blocks of a GEMM tile, in order: as many 6-row blocks as possible; a remainder of 1 or 2 rows
// folds one 6-row block into 4+3 / 4+4 (a 1-2 row pass costs a full pass over the weight block
// for almost no FMAs). Row blocks are the outer loop of all block GEMMs: the MR rows of A stay
// close (L1/L2) while the weight block streams from L2. Calls fn.template operator()<MR>(i) for
// each block of MR rows starting at row i (the micro-kernels are templates on MR).
template <class Fn>
inline void for_row_blocks(int64_t M, Fn&& fn) {
  int64_t n6 = M / 6;
  const int64_t rem = M % 6;
  int64_t tail[2] = {0, 0}, nt = 0;
  if ((rem == 1 || rem == 2) && n6 > 0) {
    --n6;
    tail[nt++] = 4;
    tail[nt++] = rem == 1 ? 3 : 4;
  } else if (rem > 0) {
    tail[nt++] = rem;
  }
  int64_t i = 0;
  auto run = [&](int64_t mr) {
    switch (mr) {
      case 6: fn.template operator()<6>(i); break;
      case 5: fn.template operator()<5>(i); break;
      case 4: fn.template operator()<4>(i); break;
      case 3: fn.template operator()<3>(i); break;
      case 2: fn.template operator()<2>(i); break;
      default: fn.template operator()<1>(i); break;
    }
    i += mr;
  };
  for (int64_t b = 0; b < n6; ++b) run(6);
  for (int64_t b = 0; b < nt; ++b) run(tail[b]);
}

}  // namespace moe_cpu::avx2

MOE_AVX2_END

#endif  // x86

// Where the AVX2 kernels run (have_avx2(), cpu_features.h): FN<DT>(args...) for the run-time dtype
// dt (the AVX2 kernels are templates on it), then return from the caller. Elsewhere nothing: the
// caller goes on to its portable code.
#ifdef MOE_CPU_X86
#define MOE_CPU_RETURN_IF_AVX2(dt, FN, ...)                 \
  if (have_avx2()) {                                        \
    switch (dt) {                                           \
      case DType::F32: FN<DType::F32>(__VA_ARGS__); return; \
      case DType::F16: FN<DType::F16>(__VA_ARGS__); return; \
      default: FN<DType::BF16>(__VA_ARGS__); return;        \
    }                                                       \
  }
#else
#define MOE_CPU_RETURN_IF_AVX2(dt, FN, ...)
#endif
