// The AVX512-BF16 kernels' VNNI packing and the run-time choice between their two builds
// (native, SIMDe-emulated; see avx512_bf16.h and avx512_bf16_isa.h).
#include "avx512_bf16.h"

#include <c10/util/Exception.h>

#include <algorithm>

#include "avx512_bf16_isa.h"
#include "cpu_features.h"
#include "gemm_panels.h"

namespace moe_cpu {

namespace {

// One build of the kernels: native where the CPU has AVX512-BF16, else the SIMDe emulation.
struct Kernels {
  decltype(&gemm_panels_vnni) gemm_panels;
  decltype(&combine_row_bf16_avx512) combine_bf16;
  decltype(&pack_panels_vnni) pack;
  PackPanelsVnniQFn* pack_q;
  GemvQuantFn* gemv_q;
  PackPanelsVnniMxFn* pack_mx;
  GemmPanelsVnniKsFn* gemm_ks;
};

// nullptr when neither build exists here.
const Kernels* kernels_here() {
  static const Kernels* k = []() -> const Kernels* {
#ifdef MOE_OPS_HAVE_AVX512_NATIVE
    static const Kernels native{avx512_native::gemm_panels_vnni,   avx512_native::combine_row_bf16_avx512,
                                avx512_native::pack_panels_vnni,   avx512_native::pack_panels_vnni_q,
                                avx512_native::gemv_quant,         avx512_native::pack_panels_vnni_mx,
                                avx512_native::gemm_panels_vnni_ks};
    if (have_avx512_bf16()) return &native;
#endif
#ifdef MOE_OPS_HAVE_SIMDE
    static const Kernels emu{avx512_emu::gemm_panels_vnni,   avx512_emu::combine_row_bf16_avx512,
                             avx512_emu::pack_panels_vnni,   avx512_emu::pack_panels_vnni_q,
                             avx512_emu::gemv_quant,         avx512_emu::pack_panels_vnni_mx,
                             avx512_emu::gemm_panels_vnni_ks};
    return &emu;
#else
    return nullptr;
#endif
  }();
  return k;
}

const Kernels& kernels() {
  const Kernels* k = kernels_here();
  TORCH_CHECK(k,
              "moe_ops (cpu): the AVX512-BF16 kernels (the bf16 'vnni' packed layout) need a CPU with "
              "AVX512-BF16, or a build with SIMDe (pip install simde-py, then rebuild)");
  return *k;
}

// The packing's definition, for builds without either kernel build (a layout nothing here runs,
// but pack_experts still produces it).
void pack_panels_vnni_scalar(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                             int64_t prow) {
  const int64_t K2 = vnni_pairs(K);
  for (int64_t p = 0; p < num_panels(N); ++p) {
    uint16_t* d = dst + p * pstride;
    const int64_t cols = std::min<int64_t>(kPanel, N - p * kPanel);
    const uint16_t* s = src + p * kPanel * ld;
    for (int64_t kk = 0; kk < K2; ++kk)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t j = 0; j < 2; ++j) {
          const int64_t k = 2 * kk + j;
          d[kk * prow + c * 2 + j] = (c < cols && k < K) ? s[c * ld + k] : uint16_t(0);
        }
  }
}

}  // namespace

void pack_panels_vnni(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                      int64_t prow) {
  if (N <= 0 || K <= 0) return;
  if (const Kernels* k = kernels_here()) return k->pack(src, N, K, ld, dst, pstride, prow);
  pack_panels_vnni_scalar(src, N, K, ld, dst, pstride, prow);
}

void pack_panels_vnni_q(const uint8_t* src, int fmt, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                        int64_t prow) {
  if (N > 0 && K > 0) kernels().pack_q(src, fmt, N, K, ld, dst, pstride, prow);
}

void pack_panels_vnni_mx(const uint8_t* blocks, const uint8_t* scales, const uint16_t* table, int64_t N, int64_t K,
                         uint16_t* dst, int64_t pstride, int64_t prow) {
  if (N > 0 && K > 0) kernels().pack_mx(blocks, scales, table, N, K, dst, pstride, prow);
}

void gemv_quant(const GemvQuantJob& job, const uint16_t* A, int64_t lda, int64_t M, float* C, int64_t ldc) {
  if (M > 0 && job.n > 0) kernels().gemv_q(job, A, lda, M, C, ldc);
}

void gemm_panels_vnni(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow, int64_t K2,
                      int64_t np, float* C, int64_t ldc, int64_t M, const PrefetchRanges* next) {
  if (M > 0 && np > 0) kernels().gemm_panels(A, lda, P, pstride, prow, K2, np, C, ldc, M, next);
}

void gemm_panels_vnni_ks(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow, int64_t K2,
                         const float* const* ks, int64_t kbp, float* C, int64_t ldc, int64_t M,
                         const PrefetchRanges* next) {
  if (M > 0) kernels().gemm_ks(A, lda, P, pstride, prow, K2, ks, kbp, C, ldc, M, next);
}

void combine_row_bf16_avx512(const void* const* src, const float* w, int n, void* out, int64_t H,
                             const void* const* next, int n_next) {
  kernels().combine_bf16(src, w, n, out, H, next, n_next);
}

}  // namespace moe_cpu
