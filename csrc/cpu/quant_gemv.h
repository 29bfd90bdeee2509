// The quantized experts' GEMV kernels (vnni_experts.cpp): C[i*ldc + j] = sum_k A[i*lda + k] *
// w_j[k] for i < M, j < job.n, with the weight rows job.w[j] dequantized in registers and their
// scales applied (GemvQuantJob, avx512_bf16_isa.h).
//   avx512_bf16.h gemv_quant   the AVX512-BF16 kernels' (vdpbf16ps on exact bf16 weights): the
//                              decode tiles (few rows) where those kernels run;
//   gemv_quant_avx2            AVX2+FMA+F16C, float32 FMA on exact float32 weights: every tile on
//                              CPUs without them (gemv_quant_avx2.cpp). Call only when have_avx2().
#pragma once

#include <cstdint>

#include "avx512_bf16_isa.h"

namespace moe_cpu {

void gemv_quant_avx2(const GemvQuantJob& job, const uint16_t* A, int64_t lda, int64_t M, float* C, int64_t ldc);

}  // namespace moe_cpu
