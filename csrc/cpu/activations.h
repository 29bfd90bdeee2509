// The gated activations of the expert MLP, torch-free: h = [gate | up] -> act(gate) * up with
// act = silu (swiglu) or exact gelu (geglu), computed in float32 between the rounding points of
// the unfused pipeline (h stored in the model dtype, the product stored in it). The fused ops run
// it in GEMM1's epilogue. SwiGLU is vectorised (AVX2 exp of simd_avx2.h) where the CPU has AVX2.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {

// Gated activations on float32 (values already rounded through the model dtype by the caller).
float silu_f32(float x);
float gelu_f32(float x);

// out[i] = round_dt(act(round_dt(gate[i])) * round_dt(up[i])), act = silu (swiglu) or exact gelu:
// the unfused pipeline's rounding (h stored in dt, activation in float32, result stored in dt).
void gated_act_rows(const float* gate, const float* up, float* out, int64_t n, DType dt, bool swiglu);
// gated_act_rows on `rows` rows of `cols` values: gate/up rows ldi apart, out rows ldo apart.
void gated_act_block(const float* gate, const float* up, int64_t ldi, float* out, int64_t ldo, int64_t rows,
                     int64_t cols, DType dt, bool swiglu);

}  // namespace moe_cpu
