// Router scores of one row of logits, torch-free (topk_gating.cpp): softmax (max-subtracted exp,
// 8-lane sum in a fixed order, then x/sum) or sigmoid 1/(1+exp(-x)), vectorised with the AVX2 exp
// of simd_avx2.h, which matches libm at +-inf and in the denormal range (sigmoid(-inf) = 0, as
// torch). Deterministic: the sum's order depends only on the row length.
#pragma once

#include <cstdint>

namespace moe_cpu {

// Return false, writing nothing meaningful, when the row holds a NaN (the caller's scalar path
// defines that case) or the CPU lacks AVX2 (the caller's scalar path is the portable version).
bool softmax_row_f32(const float* x, float* out, int64_t n);
bool sigmoid_row_f32(const float* x, float* out, int64_t n);

}  // namespace moe_cpu
