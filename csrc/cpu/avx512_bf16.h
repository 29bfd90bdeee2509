// The AVX512-BF16 kernels, chosen at run time (cpu_features.h): the bf16 "vnni" packed-panel
// GEMM (vdpbf16ps, gemm_vnni_avx512.cpp), the VNNI packing (pack_vnni_avx512.cpp; fused_experts
// repacks weights as stored block by block with it) and the bf16 row combine (vcvtne2ps2bf16,
// combine_row_bf16_avx512.cpp).
//
// VNNI panels (pack_panels_vnni): panel p holds the columns [16p, 16p+16) of the logical [K, N]
// operand as K2 = ceil(K/2) rows of 16 (k even, k odd) bf16 pairs: one 512-bit load is 16
// columns x 2 reduction steps, which is what vdpbf16ps multiplies against a broadcast pair of A.
// Columns past N and the odd-K tail are zero. Row kk of panel p sits at p * pstride + kk * prow:
// the 'vnni' packing (fused_moe_packed.cpp) interleaves two panels row by row (prow = 64), which
// makes each pair of panels one oneDNN brgemm B block of kVnniBlock = 32 columns (onednn_brgemm.h).
//
// Each kernel is one source compiled twice (avx512_bf16_isa.h): natively, used when the CPU
// has AVX512F/BW/VL/DQ/BF16, and through SIMDe's portable AVX-512, so the same code runs -- and is
// tested -- on CPUs without AVX-512 (slowly: "auto" packing never picks vnni there, and the ops
// with an AVX2 path too use the emulation only when MOE_OPS_CPU_EMULATE_AVX512=1, for tests).
#pragma once

#include <cstdint>

#include "avx512_bf16_isa.h"  // the kernels' signatures (GemmPanelsVnniFn, ...)

namespace moe_cpu {

inline int64_t vnni_pairs(int64_t K) { return (K + 1) / 2; }
constexpr int64_t kVnniBlock = 32;

// src: N rows of K bf16 (row stride ld elements) -> dst: num_panels(N) panels of
// vnni_pairs(K) rows of 16 x 2 bf16, panel p at p * pstride, row kk at kk * prow elements.
// AVX-512 where a kernel build runs (pack_vnni_avx512.cpp), else scalar: the same bits.
PackPanelsVnniFn pack_panels_vnni;

// pack_panels_vnni of N rows of K int8 (fmt 1) or float8_e4m3fn (fmt 2) codes: each code becomes its
// exact bf16 value on the way (pack_vnni_avx512.cpp): the quantized experts' repack (vnni_experts.h).
PackPanelsVnniQFn pack_panels_vnni_q;

// pack_panels_vnni of N mxfp4 rows (GPT-OSS blocks [N, K/32, 16] and e8m0 scales [N, K/32]): each
// 32-element block becomes its exact bf16 values table[16 * scale + code] in registers.
PackPanelsVnniMxFn pack_panels_vnni_mx;

// C[i*ldc + j] = sum_k A[i*lda + k] * w_j[k] for i < M, j < job.n: the quantized weight rows
// job.w[j] (GemvQuantJob) dequantized exactly to bf16 in registers, scales applied (fp8's per k
// block and mxfp4's per 32-element block to the block's partial sums, int8's to the sum), vdpbf16ps
// chains in a fixed order (gemv_quant_avx512.cpp: K's order, or the byte-table paths' permuted
// one), lanes summed in a fixed order. For the few-row tiles of decode (vnni_experts.cpp), where
// repacking the weights costs more than the GEMM.
GemvQuantFn gemv_quant;

// C[i*ldc + 16*p + c] = sum_k A[i*lda + k] * P[p*pstride + (k/2)*prow + 2*c + k%2]  for i < M, p < np, c < 16
// A: bf16 rows holding 2*K2 values each (an odd K's pad element must be finite: it meets a zero
// weight). Each output is one vdpbf16ps chain over
// the pairs in ascending order: independent of M, the blocking and the thread count.
GemmPanelsVnniFn gemm_panels_vnni;

// gemm_panels_vnni for np = 2 with per-k-block scales, one row of them per panel (ks[0], ks[1]):
// each k block's chain starts from zero, then C = (... (0 + s0 * block0) + s1 * block1 ...), a
// rounded multiply and a rounded add per block -- what summing separate per-block GEMMs gives.
// For fp8's block scales (vnni_experts.cpp block_gemm) without a GEMM call per k block.
GemmPanelsVnniKsFn gemm_panels_vnni_ks;

// combine_row (combine_row.h) for bf16 sources and a bf16 output, bitwise the same result.
CombineRowBf16Fn combine_row_bf16_avx512;

}  // namespace moe_cpu
