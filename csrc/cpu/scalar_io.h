// One element between a kernel dtype (float32, float16, bfloat16) and float32, through c10's
// conversions (round to nearest even): the portable kernels' loads and stores, and the rule the
// 8-lane versions (simd_avx2.h load8 / store8) reproduce bit for bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {
namespace io {

inline float load_scalar(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
}

inline void store_scalar(void* p, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::F16: static_cast<c10::Half*>(p)[i] = c10::Half(v); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(v); break;
  }
}

}  // namespace io
}  // namespace moe_cpu
