// The element types the CPU kernels compute on (float32, float16, bfloat16), torch-free; the
// at::ScalarType -> DType map is in arg_checks.h.
#pragma once

#include <cstdint>

namespace moe_cpu {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int64_t dtype_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

}  // namespace moe_cpu
