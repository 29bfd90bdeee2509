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

struct VnniWeights {
  const uint16_t* gate_up;  // packed [E, P1, Hp/2, 2, 16, 2], or as stored [E, 2I, H]
  const uint16_t* down;     // packed [E, ceil(H/32), Iv/2, 32, 2], or as stored [E, H, I]
  bool packed;
};

// x[T,H] bf16 (contiguous), pl: the slots placed by expert, k: slots per token, I: the experts'
// intermediate size (packed: the even Iv of the packing); writes the float32 expert output of
// every routed row r (rounded through bf16) into ybuf[r].
void vnni_experts(const at::Tensor& x, const Placement& pl, int64_t k, int64_t I, const VnniWeights& w, bool swiglu,
                  at::Tensor& ybuf);

}  // namespace moe_cpu
