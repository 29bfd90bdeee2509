// VNNI panel GEMM: packing and the run-time choice between the native AVX512-BF16 kernel
// (vnni_avx512.cpp) and its SIMDe emulation (vnni_emu.cpp); see vnni.h.
#include "vnni.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>

#include "kernels.h"

namespace moe_cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#define MOE_VNNI_NATIVE 1
namespace vnni_native {
void gemm_panels(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
}
#endif
#ifdef MOE_OPS_HAVE_SIMDE
namespace vnni_emu {
void gemm_panels(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
}
#endif

bool have_avx512_bf16() {
#ifdef MOE_VNNI_NATIVE
  static const bool ok = [] {
    __builtin_cpu_init();  // also checks that the OS saves the zmm state (XCR0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16") && std::getenv("MOE_OPS_CPU_NO_AVX512") == nullptr;
  }();
  return ok;
#else
  return false;
#endif
}

bool vnni_available() {
#ifdef MOE_OPS_HAVE_SIMDE
  return true;
#else
  return have_avx512_bf16();
#endif
}

void pack_panels_vnni(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst) {
  const int64_t K2 = vnni_pairs(K);
  for (int64_t p = 0; p < num_panels(N); ++p) {
    uint16_t* d = dst + p * K2 * 32;
    const int64_t cols = std::min<int64_t>(kPanel, N - p * kPanel);
    const uint16_t* s = src + p * kPanel * ld;
    for (int64_t kk = 0; kk < K2; ++kk)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t j = 0; j < 2; ++j) {
          const int64_t k = 2 * kk + j;
          d[(kk * kPanel + c) * 2 + j] = (c < cols && k < K) ? s[c * ld + k] : uint16_t(0);
        }
  }
}

void gemm_panels_vnni(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t K2,
                      int64_t np, float* C, int64_t ldc, int64_t M) {
  if (M <= 0 || np <= 0) return;
#ifdef MOE_VNNI_NATIVE
  if (have_avx512_bf16()) return vnni_native::gemm_panels(A, lda, P, pstride, K2, np, C, ldc, M);
#endif
  gemm_panels_vnni_emulated(A, lda, P, pstride, K2, np, C, ldc, M);
}

void gemm_panels_vnni_emulated(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride,
                               int64_t K2, int64_t np, float* C, int64_t ldc, int64_t M) {
#ifdef MOE_OPS_HAVE_SIMDE
  if (M > 0 && np > 0) vnni_emu::gemm_panels(A, lda, P, pstride, K2, np, C, ldc, M);
#else
  TORCH_CHECK(false, "moe_ops (cpu): the bf16 'vnni' packed layout needs a CPU with AVX512-BF16, or a build with "
                     "SIMDe (pip install simde-py, then rebuild)");
#endif
}

}  // namespace moe_cpu
