// What the two fused expert ops (fused_moe.cpp: weights as stored, fused_moe_packed.cpp: packed
// weights) share: their argument checks, their Meta kernel and their frame -- slot placement by
// expert before the op's own GEMM stages, the weighted token combine after them.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <string>

#include "arg_checks.h"
#include "host_alloc.h"
#include "scan.h"
#include "token_combine.h"

namespace moe_cpu {

// Checks shared by the fused expert ops: x[T,H] in a kernel dtype, ids[T,k] int32 (k <= kMaxK,
// T*k rows indexable in int32), weights [T,k] or None, activation swiglu|geglu; all CPU tensors.
inline void check_fused_inputs(const char* op, const at::Tensor& x, const at::Tensor& ids,
                               const c10::optional<at::Tensor>& weights, const std::string& act) {
  check_cpu(x, op, "x");
  check_cpu(ids, op, "ids");
  check_int32(ids, op, "ids");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "moe_ops::", op, " (cpu): x must be float16/bfloat16/float32, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && ids.size(0) == x.size(0), "moe_ops::", op,
              " (cpu): need x[T,H] and ids[T,k], got ", x.sizes(), " and ", ids.sizes());
  TORCH_CHECK(act == "swiglu" || act == "geglu", "moe_ops::", op, " (cpu): unknown activation ", act);
  TORCH_CHECK(ids.size(1) <= moe_ops::limits::kMaxK, "moe_ops::", op, " (cpu): k = ", ids.size(1), " > ",
              moe_ops::limits::kMaxK);
  TORCH_CHECK(x.size(0) * ids.size(1) <= moe_ops::limits::kInt32Max, "moe_ops::", op,
              " (cpu): T*k = ", x.size(0) * ids.size(1), " overflows int32 row indexing");
  if (weights.has_value()) {
    check_cpu(*weights, op, "weights");
    check_float(*weights, op, "weights");
    TORCH_CHECK(weights->sizes() == ids.sizes(), "moe_ops::", op, " (cpu): weights must be ", ids.sizes(), ", got ",
                weights->sizes());
  }
}

// Meta kernel of both fused expert ops (same argument list): out has x's shape and dtype.
inline at::Tensor fused_experts_meta(const at::Tensor& x, const at::Tensor&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, const at::Tensor&, c10::string_view) {
  return at::empty(x.sizes(), x.options());
}

// The frame both fused expert ops share (x, ids contiguous and checked): 1. stable placement of
// the T*k slots by expert; 2-4. `experts(pl, ybuf)`, the op's own stage, writes the float32
// expert output of every routed row r into ybuf[r] (called only when there are routed rows and
// I > 0; with I == 0 every expert outputs zeros); 5. out[t] = sum_j w[t,j] *
// ybuf[slot_rows[t*k+j]] in j order, rounded to x's dtype. Output and ybuf come from the host
// cache (host_alloc.h): no page faults at steady state.
template <class Experts>
at::Tensor fused_experts_frame(const at::Tensor& x, const at::Tensor& ids, const c10::optional<at::Tensor>& weights,
                               int64_t E, int64_t I, Experts experts) {
  const int64_t T_ = x.size(0), H = x.size(1), k = ids.size(1);
  at::Tensor out = empty_cached({T_, H}, x.options());
  if (T_ == 0 || H == 0) return out;
  const Placement pl = place_slots(ids.data_ptr<int32_t>(), T_ * k, E);
  at::Tensor ybuf = empty_cached({std::max<int64_t>(pl.rows(), 1), H}, x.options().dtype(at::kFloat));
  if (pl.rows() > 0 && I > 0) experts(pl, ybuf);
  else if (pl.rows() > 0) ybuf.zero_();
  combine_rows(
      ybuf, pl.rows(), T_, k, weights, [&](int64_t t, int64_t j) { return int64_t(pl.slot_rows[t * k + j]); }, out);
  return out;
}

}  // namespace moe_cpu
