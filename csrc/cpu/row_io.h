// Rows between the kernel dtypes and float32, torch-free: the ops widen activation rows into the
// float32 operands of the GEMMs (row_to_f32) and round the float32 results where the unfused
// pipeline stores a tensor (row_from_f32 into the dtype; round_rows / round_through keep the
// rounded value as float32). AVX2 where the CPU has it, else portable code; both round to nearest
// even exactly alike (the AVX2 tails go through 8-wide scratch, so they round as the body does).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {

// dst[i] = float(src[i])
void row_to_f32(const void* src, DType dt, float* dst, int64_t n);
// dst[i] = round_to_dt(src[i])  (round to nearest even)
void row_from_f32(const float* src, void* dst, DType dt, int64_t n);
// x rounded through dt and back to float (models storing an intermediate in dt)
inline float round_through(float x, DType dt) {
  switch (dt) {
    case DType::F32: return x;
    case DType::F16: return static_cast<float>(c10::Half(x));
    default: return static_cast<float>(c10::BFloat16(x));
  }
}
// dst[i] = round_dt(src[i]) kept as float32.
void round_rows(const float* src, float* dst, int64_t n, DType dt);

}  // namespace moe_cpu
