// SIMDe build of the VNNI panel kernel (vnni_kernel.inc): the same source as the native build,
// its AVX-512 intrinsics mapped by SIMDe onto portable code. Runs anywhere (tens of times slower
// than native); the tests use it to execute the kernel on CPUs without AVX512-BF16, as the SIMT
// emulator does for the CUDA kernels. Built when CMake finds SIMDe (the simde-py package).
#include "vnni.h"

#ifdef MOE_OPS_HAVE_SIMDE
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

namespace moe_cpu::vnni_emu {
#define MOE_VNNI_ENTRY gemm_panels
#include "vnni_kernel.inc"
#undef MOE_VNNI_ENTRY
}  // namespace moe_cpu::vnni_emu
#endif
