// The AVX-512 intrinsics of one compilation of the AVX512-BF16 kernels (gemm_vnni_avx512.cpp,
// pack_vnni_avx512.cpp, combine_row_bf16_avx512.cpp; see avx512_bf16_isa.h), and what
// keeps that compilation's rounding identical to the other's:
//   native (MOE_CPU_AVX512_EMULATED unset, compiled with the AVX-512 target flags): <immintrin.h>.
//   emulated (MOE_CPU_AVX512_EMULATED=1): SIMDe's portable AVX-512 (the simde-py headers), so the
//     kernels run -- and are tested -- on CPUs without AVX512-BF16, as the SIMT emulator does for
//     the CUDA kernels. The instructions SIMDe lacks or rounds differently from the hardware are
//     modelled below from the Intel SDM.
// MOE_NO_CONTRACT(v) keeps the multiply that produced v from being fused into the following add
// (the reference's multiply-then-add rounding); bits_as<To>(x) reinterprets a vector's bits.
#pragma once

#if MOE_CPU_AVX512_EMULATED
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstring>

// vdpbf16ps as the hardware defines it (Intel SDM): per float lane i, two exact-product adds
// in this order -- the odd bf16 of the pair first, then the even one -- each rounded to nearest
// even, bf16 denormal inputs read as zero and denormal results flushed to zero. SIMDe's portable
// version adds the even product first, which would make the emulated kernel round differently
// from the native one.
static inline simde__m512 moe_dpbf16_sdm(simde__m512 src, simde__m512bh a, simde__m512bh b) {
  float acc[16];
  uint16_t x[32], y[32];
  std::memcpy(acc, &src, sizeof(acc));
  std::memcpy(x, &a, sizeof(x));
  std::memcpy(y, &b, sizeof(y));
  const auto in = [](uint16_t v) {  // bf16 -> float, denormals as (signed) zero
    uint32_t u = static_cast<uint32_t>(v) << 16;
    if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  };
  const auto ftz = [](float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.f, f) : f; };
  for (int i = 0; i < 16; ++i) {
    volatile float p1 = in(x[2 * i + 1]) * in(y[2 * i + 1]);  // volatile: no FMA contraction
    float s = ftz(acc[i] + p1);
    volatile float p0 = in(x[2 * i]) * in(y[2 * i]);
    acc[i] = ftz(s + p0);
  }
  simde__m512 r;
  std::memcpy(&r, acc, sizeof(r));
  return r;
}
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps moe_dpbf16_sdm

// vcvtne2ps2bf16 (SDM): 32 bf16 from b (lanes 0-15) and a (lanes 16-31); NaN -> the quieted NaN
// (payload kept), denormal -> signed zero, else round to nearest even.
static inline simde__m512bh moe_cvtne2ps_pbh_sdm(simde__m512 a, simde__m512 b) {
  uint32_t in[32];
  uint16_t r[32];
  std::memcpy(in, &b, 64);
  std::memcpy(in + 16, &a, 64);
  for (int i = 0; i < 32; ++i) {
    const uint32_t u = in[i];
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) r[i] = static_cast<uint16_t>((u >> 16) | 0x40u);
    else if ((u & 0x7F800000u) == 0) r[i] = static_cast<uint16_t>((u >> 16) & 0x8000u);
    else r[i] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  simde__m512bh out;
  std::memcpy(&out, r, 64);
  return out;
}
#define _mm512_cvtne2ps_pbh moe_cvtne2ps_pbh_sdm

// vfpclassps (SDM), the classes this code asks for: 0x01 QNaN, 0x80 SNaN, 0x20 denormal.
static inline uint32_t moe_fpclass_ps_mask(simde__m512 a, int imm) {
  uint32_t in[16], m = 0;
  std::memcpy(in, &a, 64);
  for (int i = 0; i < 16; ++i) {
    const uint32_t e = in[i] & 0x7F800000u, f = in[i] & 0x007FFFFFu;
    const bool qnan = e == 0x7F800000u && (f & 0x00400000u), snan = e == 0x7F800000u && f && !(f & 0x00400000u);
    const bool denorm = e == 0 && f;
    if (((imm & 0x01) && qnan) || ((imm & 0x80) && snan) || ((imm & 0x20) && denorm)) m |= 1u << i;
  }
  return m;
}
#define _mm512_fpclass_ps_mask moe_fpclass_ps_mask

// Masked loads and stores touch only the selected elements (the SDM; the hardware suppresses
// faults on the others). SIMDe's versions load all 32 bytes and store all 64 (zeros where the
// mask is clear), which would read and write past a row's end.
template <class V>  // simde__m256i (16 elements) or simde__m512i (32)
static inline V moe_maskz_loadu_epi16(uint32_t k, const void* p) {
  constexpr int n = sizeof(V) / 2;
  uint16_t v[n] = {0};
  for (int i = 0; i < n; ++i)
    if ((k >> i) & 1u) std::memcpy(v + i, static_cast<const char*>(p) + 2 * i, 2);
  V r;
  std::memcpy(&r, v, sizeof(r));
  return r;
}
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) moe_maskz_loadu_epi16<simde__m256i>((k), (p))
#undef _mm512_maskz_loadu_epi16
#define _mm512_maskz_loadu_epi16(k, p) moe_maskz_loadu_epi16<simde__m512i>((k), (p))
static inline void moe_mask_storeu_epi16(void* p, uint32_t k, simde__m512i a) {
  uint16_t v[32];
  std::memcpy(v, &a, sizeof(v));
  for (int i = 0; i < 32; ++i)
    if ((k >> i) & 1u) std::memcpy(static_cast<char*>(p) + 2 * i, v + i, 2);
}
#undef _mm512_mask_storeu_epi16
#define _mm512_mask_storeu_epi16 moe_mask_storeu_epi16

// vpmovzxbd / vpmovsxbd zmm, xmm (SIMDe lacks them).
#ifndef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) _mm512_cvtepu16_epi32(_mm256_cvtepu8_epi16(a))
#endif
#ifndef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32(a) _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(a))
#endif

#define MOE_NO_CONTRACT(v) ((void)0)  // no FMA in the emulated compilation to contract into
#else
#include <immintrin.h>

// An empty asm on the product keeps GCC from contracting multiply + add into an FMA.
#define MOE_NO_CONTRACT(v) __asm__("" : "+v"(v))
#endif

namespace {  // internal linkage: each compilation keeps its own (differently compiled) copy

template <class To, class From>
inline To bits_as(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between equal sizes");
  To t;
  __builtin_memcpy(&t, &f, sizeof(To));
  return t;
}

}  // namespace
