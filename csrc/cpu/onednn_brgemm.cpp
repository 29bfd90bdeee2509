// The oneDNN micro-GEMM through ATen (see onednn_brgemm.h).
#include "onednn_brgemm.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "../env.h"
#include "cpu_features.h"

namespace moe_cpu {
namespace {

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
// One 3 x 16 x 4 product against the exact result (small integers: every sum exact in bf16
// products and float32 adds). A torch built without the oneDNN ukernel throws instead.
bool probe() {
  uint16_t a[3 * 4], b[2 * 16 * 2];
  float c[3 * 16];
  const auto bf = [](float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return static_cast<uint16_t>(u >> 16);
  };
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 4; ++k) a[i * 4 + k] = bf(float(i + k - 2));
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 16; ++j) b[(k / 2) * 32 + 2 * j + k % 2] = bf(float((j % 5) - k));
  try {
    brgemm_bf16(3, 16, 4, a, 4, b, 16, c, 16);
    brgemm_done();
  } catch (const c10::Error&) { return false; }
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = 0.f;
      for (int k = 0; k < 4; ++k) s += float(i + k - 2) * float((j % 5) - k);
      if (c[i * 16 + j] != s) return false;
    }
  return true;
}
#endif

// AMX-BF16 (CPUID.(EAX=7,ECX=0):EDX[22]): there oneDNN runs brgemm on AMX tiles.
bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22) & 1u;
#else
  return false;
#endif
}

}  // namespace

bool brgemm_available() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  static const bool built = have_avx512_bf16() && at::globalContext().userEnabledMkldnn() && probe();
  return built && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

bool brgemm_chosen() {
  if (!brgemm_available()) return false;
  if (moe_ops::env::get("CPU_BRGEMM")) return moe_ops::env::flag("CPU_BRGEMM");
  static const bool amx = cpu_has_amx_bf16();
  return amx;
}

void brgemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/false, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "moe_ops (cpu): this torch has no bf16 brgemm");
#endif
}

void brgemm_done() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

}  // namespace moe_cpu
