// Steps 2-4 of both fused expert ops for bf16 on the AVX512-BF16 kernels (avx512_bf16.h), with
// the weights either packed once ('vnni' layout of pack_experts, fused_moe_packed.cpp) or as
// stored (fused_moe.cpp): the same GEMMs on the same 32-column VNNI blocks, so the two ops give
// the same bits.
//
// Weights as stored: each tile repacks its weight block (GEMM1: 16 gate + 16 up rows of H;
// GEMM2: 32 rows of I) into a per-thread buffer (64 KiB at H = I = 1024: L2-resident) right
// before the block's GEMM, so no packed copy of the experts exists; the repack (a 32-bit
// transpose, pack_vnni_avx512.cpp) reads the weights the GEMM would read anyway.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "scan.h"

namespace moe_cpu {

// Weight-only quantized experts as stored (moe_ops/quant.py layouts, fused_experts_quantized).
// The repack dequantizes each block to bf16 *exactly* -- int8 and fp8 codes, and mxfp4's
// code * 2^(s-127), are all bf16 values -- and the scales that are not powers of two are applied
// to the float32 GEMM results: int8's per output column, fp8's per (column, bk-deep k block) by
// splitting the block's GEMM at the k blocks. So no weight is rounded: the error is the bf16
// layer's own (activations and intermediates), not the format's plus a bf16 rounding.
enum class QuantFmt : int { kNone = 0, kInt8 = 1, kFp8 = 2, kMxfp4 = 3 };
struct VnniQuant {
  QuantFmt fmt = QuantFmt::kNone;
  const uint8_t* gate_up = nullptr;  // int8/fp8 [E, 2I, H]; mxfp4 blocks [E, 2I, H/32, 16]
  const uint8_t* down = nullptr;     // int8/fp8 [E, H, I]; mxfp4 blocks [E, H, I/32, 16]
  const void* gate_up_scale =
      nullptr;                       // int8 f32 [E, 2I]; fp8 f32 [E, ceil(2I/bn), ceil(H/bk)]; mxfp4 u8 [E, 2I, H/32]
  const void* down_scale = nullptr;  // the same for w_down (N = H, K = I)
  int64_t bn = 0, bk = 0;            // fp8 block (bk even)
  // No AVX512-BF16 kernels here: every tile runs the AVX2 GEMV (quant_gemv.h; fp8 needs gemv_takes).
  bool avx2 = false;
};

// Whether the GEMV kernels (quant_gemv.h) take q: every format but fp8 with k blocks that are not a
// multiple of their 32-element chunks (moe_ops/ops.py _quantized_op_takes mirrors it).
inline bool gemv_takes(const VnniQuant& q) { return q.fmt != QuantFmt::kFp8 || q.bk % 32 == 0; }

struct VnniWeights {
  const uint16_t* gate_up;  // packed [E, P1, Hp/2, 2, 16, 2], or as stored [E, 2I, H]
  const uint16_t* down;     // packed [E, ceil(H/32), Iv/2, 32, 2], or as stored [E, H, I]
  bool packed;
  VnniQuant q = {};  // q.fmt != kNone: the weights are q's (as stored), gate_up/down unused
};

// x[T,H] bf16 (contiguous), pl: the slots placed by expert, k: slots per token, I: the experts'
// intermediate size (packed: the even Iv of the packing); writes the float32 expert output of
// every routed row r (rounded through bf16) into ybuf[r].
void vnni_experts(const at::Tensor& x, const Placement& pl, int64_t k, int64_t I, const VnniWeights& w, bool swiglu,
                  at::Tensor& ybuf);

}  // namespace moe_cpu
