// Run-time choice of the CPU kernel sets (see cpu_features.h). Each answer is computed once: the
// kernels ask on every call.
#include "cpu_features.h"

#include "env.h"

namespace moe_cpu {

bool have_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           moe_ops::env::get("CPU_NO_AVX2") == nullptr;
  }();
  return ok;
#else
  return false;
#endif
}

bool have_avx512_bf16() {
#ifdef MOE_OPS_HAVE_AVX512_NATIVE  // cpu.cmake: the native build of the AVX512-BF16 kernels is linked in
  static const bool ok = [] {
    __builtin_cpu_init();  // also checks that the OS saves the zmm state (XCR0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16") && moe_ops::env::get("CPU_NO_AVX512") == nullptr;
  }();
  return ok;
#else
  return false;
#endif
}

bool avx512_emulation_built() {
#ifdef MOE_OPS_HAVE_SIMDE
  return true;
#else
  return false;
#endif
}

bool use_avx512_bf16() {
  static const bool on =
      have_avx512_bf16() || (avx512_emulation_built() && moe_ops::env::get("CPU_EMULATE_AVX512") != nullptr);
  return on;
}

}  // namespace moe_cpu
