// Quantized weight codes -> their exact bf16 bits in registers, for the AVX512-BF16 kernels that
// read quantized experts (pack_vnni_avx512.cpp's repack, gemv_quant_avx512.cpp's decode GEMV).
// Included inside one compilation's namespace (avx512_bf16_isa.h), after avx512_intrinsics.h.
#pragma once

#include <cstring>

#ifndef MOE_CPU_AVX512_NS
#error "included by the AVX512-BF16 kernel sources only (compiled once per instruction set)"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {
namespace {

// |e4m3| -> bf16 bits for the 128 magnitudes S.EEEE.MMM without S: a normal is (EEEE + 120) << 7
// | MMM << 4, a subnormal MMM * 2^-9 a bf16 normal, 0x7F a quiet NaN. Built by the compiler.
struct Fp8Magnitudes {
  alignas(64) uint16_t v[128];
  constexpr Fp8Magnitudes() : v() {
    constexpr uint16_t sub[8] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};  // m * 2^-9
    for (int m = 0; m < 128; ++m)
      v[m] = m == 0x7F ? 0x7FC0 : m < 8 ? sub[m] : static_cast<uint16_t>((m << 4) + (120 << 7));
  }
};
inline constexpr Fp8Magnitudes kFp8Magnitudes{};

// 32 int8 (fmt 1) or float8_e4m3fn (fmt 2) codes (the first `count` read, the rest zero) ->
// their bf16 bits, exactly: int8 through float (every int8 is a bf16 value); e4m3 by table
// (kFp8Magnitudes, two 64-entry vpermi2w lookups picked by the magnitude's bit 6) and its sign.
inline __m512i codes_to_bf16(const uint8_t* src, int64_t count, int fmt) {
  __m256i b;
  if (count >= 32) {
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  } else {  // (SIMDe has no masked byte load)
    alignas(32) uint8_t tail[32] = {};
    if (count > 0) std::memcpy(tail, src, static_cast<size_t>(count));
    b = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
  }
  const __m512i x16 = _mm512_cvtepi8_epi16(b);  // sign-extended codes, 32 lanes of 16 bits
  if (fmt == 1) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(x16)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(x16, 1)));
    return bits_as<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
  }
  const __m512i* t = reinterpret_cast<const __m512i*>(kFp8Magnitudes.v);
  const __m512i lo = _mm512_permutex2var_epi16(_mm512_load_si512(t), x16, _mm512_load_si512(t + 1));
  const __m512i hi = _mm512_permutex2var_epi16(_mm512_load_si512(t + 2), x16, _mm512_load_si512(t + 3));
  const __m512i v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(x16, _mm512_set1_epi16(0x40)), lo, hi);
  // the sign: bit 15 of the sign-extended code (0xF8 is A | (B & C))
  return _mm512_ternarylogic_epi32(v, x16, _mm512_set1_epi16(static_cast<short>(0x8000)), 0xF8);
}

// One 32-element e8m0 block of mxfp4 (16 bytes, low nibble first) as 32 bf16 values: the block's
// 16 possible values come from `table` (the e2m1 codes times 2^(s-127), exact in bf16), each
// nibble picks one. Nibbles to 16-bit lanes: byte b -> 32-bit lane b = (hi nibble << 16) | lo.
inline __m512i mxfp4_block_to_bf16(const uint8_t* blocks, const uint16_t* table) {
  const __m512i tab = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)));
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks)));
  // (d | d << 12) & 0x000F000F: 0xA8 is (A | B) & C
  const __m512i idx = _mm512_ternarylogic_epi32(d, _mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
  return _mm512_permutexvar_epi16(idx, tab);
}

}  // namespace
}  // namespace moe_cpu::MOE_CPU_AVX512_NS
