// Element and 8-lane loads/stores between the kernel dtypes (float32, float16, bfloat16) and
// float32, shared by kernels.cpp and combine_kernels.cpp so both round exactly alike.
//
//   load_scalar / store_scalar: portable, c10's conversions (round to nearest even).
//   load8 / store8: in dtype_io_avx.h (x86, included inside the AVX2 target region).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "kernels.h"

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
