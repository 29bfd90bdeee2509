// The AVX512-BF16 kernels of avx512_bf16.h as compiled once per instruction set, the way ATen's
// CPU_CAPABILITY files are: gemm_vnni_avx512.cpp, pack_vnni_avx512.cpp and
// combine_row_bf16_avx512.cpp are each compiled twice by cpu.cmake, with the namespace given by
// -DMOE_CPU_AVX512_NS:
//   avx512_native  with the AVX-512 target flags (GCC >= 10 on x86-64), run where the CPU has them;
//   avx512_emu     with -DMOE_CPU_AVX512_EMULATED=1 through SIMDe (when simde-py is installed).
// avx512_bf16.cpp picks one build at run time and is the only caller. Torch-free and std-free on
// purpose: the native build is compiled for AVX-512, so no inline function it instantiates may be
// shared with (and picked by the linker for) code that runs on other CPUs.
#pragma once

#include <cstdint>

namespace moe_cpu {

// The kernels' signatures, written once: avx512_bf16.h declares (and documents) the run-time
// dispatchers with them, and each build below its own kernels.
// Up to two byte ranges a GEMM call prefetches into L2 while it runs: the weights of the call
// after it (a range with bytes == 0 is unused).
struct PrefetchRanges {
  const void* p[2] = {nullptr, nullptr};
  int64_t bytes[2] = {0, 0};
};
using GemmPanelsVnniFn = void(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow,
                              int64_t K2, int64_t np, float* C, int64_t ldc, int64_t M, const PrefetchRanges* next);
// gemm_panels_vnni on one 32-column block (np = 2) whose k blocks of kbp pairs each have their own
// scale, one per panel: C = sum over k blocks kb, in order, of ks[p][kb] * (that block's sums).
using GemmPanelsVnniKsFn = void(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t pstride, int64_t prow,
                                int64_t K2, const float* const* ks, int64_t kbp, float* C, int64_t ldc, int64_t M,
                                const PrefetchRanges* next);
using CombineRowBf16Fn = void(const void* const* src, const float* w, int n, void* out, int64_t H,
                              const void* const* next, int n_next);
using PackPanelsVnniFn = void(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                              int64_t prow);
using PackPanelsVnniQFn = void(const uint8_t* src, int fmt, int64_t N, int64_t K, int64_t ld, uint16_t* dst,
                               int64_t pstride, int64_t prow);
using PackPanelsVnniMxFn = void(const uint8_t* blocks, const uint8_t* scales, const uint16_t* table, int64_t N,
                                int64_t K, uint16_t* dst, int64_t pstride, int64_t prow);
// One decode GEMV job on quantized weight rows as stored (avx512_bf16.h gemv_quant).
struct GemvQuantJob {
  int fmt = 0;           // 1 int8, 2 float8_e4m3fn, 3 mxfp4
  int64_t K = 0;         // the dequantized row length
  int64_t bk = 0;        // fp8: the scale's k block, a multiple of 32
  int n = 0;             // output columns, <= 32
  const uint8_t* w[40];  // column j's weight row (mxfp4: its blocks); nullptr: the column is zero
  const void* s[40];     // int8: its float scale; fp8: its float k-block scales; mxfp4: its e8m0 bytes
  // w/s[n, n + n_next): up to 8 rows the next job reads first, only prefetched (by the last groups):
  // a job is one 32-column tile, and its first groups would otherwise start on cold rows.
  int n_next = 0;
  const uint16_t* mx = nullptr;  // mxfp4: [256][16] bf16 bits of e2m1(c) * 2^(s - 127)
  // Scratch of >= M * gemv_xbuf_elems(K) bf16 for the activation rows in the byte-table
  // conversions' order (the AVX512-BF16 GEMV's fp8 and mxfp4 paths); nullptr: those paths are off.
  uint16_t* xbuf = nullptr;
};
// Elements of one row of GemvQuantJob::xbuf: K rounded up to the mxfp4 path's 128-element steps.
constexpr int64_t gemv_xbuf_elems(int64_t K) { return (K + 127) / 128 * 128; }
using GemvQuantFn = void(const GemvQuantJob& job, const uint16_t* A, int64_t lda, int64_t M, float* C, int64_t ldc);

// Each build's kernels (one list for both namespaces).
#define MOE_CPU_AVX512_KERNELS              \
  GemmPanelsVnniFn gemm_panels_vnni;        \
  GemmPanelsVnniKsFn gemm_panels_vnni_ks;   \
  CombineRowBf16Fn combine_row_bf16_avx512; \
  PackPanelsVnniFn pack_panels_vnni;        \
  PackPanelsVnniQFn pack_panels_vnni_q;     \
  PackPanelsVnniMxFn pack_panels_vnni_mx;   \
  GemvQuantFn gemv_quant;

namespace avx512_native {
MOE_CPU_AVX512_KERNELS
}  // namespace avx512_native

namespace avx512_emu {
MOE_CPU_AVX512_KERNELS
}  // namespace avx512_emu

#undef MOE_CPU_AVX512_KERNELS

}  // namespace moe_cpu
