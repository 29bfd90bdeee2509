// The CPU ops' argument checks (device, dtype) and the at::ScalarType -> DType map. The user-facing
// errors are raised earlier, by moe_ops/ops.py; these are short invariant checks for callers that
// go straight to torch.ops.moe_ops.*, with the shared limits of csrc/arg_limits.h.
#pragma once

#include <torch/types.h>

#include "arg_limits.h"
#include "dtype.h"

namespace moe_cpu {

inline bool is_kernel_dtype(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

inline DType to_dtype(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "moe_ops(cpu): unsupported dtype ", st);
  }
  return DType::F32;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moe_ops::", op, " (cpu): ", name, " must be a CPU tensor, got ", t.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "moe_ops::", op,
              " (cpu): ", name, " must be float16/bfloat16/float32/float64, got ", st);
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "moe_ops::", op, " (cpu): ", name, " must be int32, got ", t.scalar_type());
}

}  // namespace moe_cpu
