// permute / unpermute on CPU.
//
// permute: slot experts -> per-chunk counts -> exclusive scan (expert_offsets, padded to
// block_m) -> stable placement (slot_rows, sorted_slots) -> parallel row copy x[s/k] ->
// x_sorted[row] (memcpy; padding rows zeroed). unpermute: per token (tokens in parallel), a
// float32 row accumulator sums w[t,j] * y_sorted[slot_rows[t*k+j]] in j order, then one rounded
// store. Both are plain row moves, so they run at memory-copy speed; nothing depends on the
// thread count.
#include <cstring>

#include <torch/library.h>

#include "arg_checks.h"
#include "host_alloc.h"
#include "scan.h"
#include "token_combine.h"

namespace moe_cpu {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                                                       int64_t E, int64_t block_m) {
  const char* op = "permute";
  check_cpu(x_in, op, "x");
  check_cpu(ids_in, op, "ids");
  check_float(x_in, op, "x");
  check_int32(ids_in, op, "ids");
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0),
              "moe_ops::permute (cpu): need x[T,H] and ids[T,k], got ", x_in.sizes(), " and ", ids_in.sizes());
  TORCH_CHECK(E >= 1 && E <= moe_ops::limits::kMaxExperts && block_m >= 1 && block_m <= moe_ops::limits::kInt32Max,
              "moe_ops::permute (cpu): need 1 <= num_experts <= ", moe_ops::limits::kMaxExperts,
              " and 1 <= block_m <= ", moe_ops::limits::kInt32Max);
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const int64_t T_ = x.size(0), H = x.size(1), k = ids.size(1), S = T_ * k;
  const int64_t P = S + E * (block_m - 1);
  TORCH_CHECK(P <= moe_ops::limits::kInt32Max, "moe_ops::permute (cpu): P = ", P, " rows overflow int32 row indexing");
  auto i32 = ids.options();
  at::Tensor x_sorted = empty_cached({P, H}, x.options());
  at::Tensor sorted_slots = at::empty({P}, i32);
  at::Tensor offsets = at::empty({E + 1}, i32);
  at::Tensor slot_rows = at::empty({S}, i32);

  const int32_t* id = ids.const_data_ptr<int32_t>();
  int32_t* rows = slot_rows.data_ptr<int32_t>();
  int32_t* sorted = sorted_slots.data_ptr<int32_t>();
  int32_t* offs = offsets.data_ptr<int32_t>();
  std::vector<int64_t> counts(E), start(E);
  stable_ranks(S, E, [&](int64_t s) { return static_cast<int64_t>(id[s]); }, rows, counts.data());
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    offs[e] = static_cast<int32_t>(run);
    start[e] = run;
    run += (counts[e] + block_m - 1) / block_m * block_m;
  }
  offs[E] = static_cast<int32_t>(run);
  std::fill(sorted, sorted + P, -1);
  at::parallel_for(0, S, 4096, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      if (rows[s] < 0) continue;
      const int64_t r = start[id[s]] + rows[s];
      rows[s] = static_cast<int32_t>(r);
      sorted[r] = static_cast<int32_t>(s);
    }
  });
  const int64_t rb = H * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  at::parallel_for(0, P, row_grain(rb), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t s = sorted[r];
      if (s >= 0) std::memcpy(dst + r * rb, src + (s / k) * rb, rb);
      else std::memset(dst + r * rb, 0, rb);
    }
  });
  return {x_sorted, sorted_slots, offsets, slot_rows};
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& slot_rows_in,
                         const c10::optional<at::Tensor>& weights, int64_t k) {
  const char* op = "unpermute";
  check_cpu(y_in, op, "y_sorted");
  check_cpu(slot_rows_in, op, "slot_rows");
  check_float(y_in, op, "y_sorted");
  check_int32(slot_rows_in, op, "slot_rows");
  TORCH_CHECK(y_in.dim() == 2, "moe_ops::unpermute (cpu): y_sorted must be 2-D, got ", y_in.sizes());
  TORCH_CHECK(k >= 1 && slot_rows_in.numel() % k == 0, "moe_ops::unpermute (cpu): slot_rows has ", slot_rows_in.numel(),
              " entries, not a multiple of k=", k);
  const int64_t T_ = slot_rows_in.numel() / k;
  if (weights.has_value()) {
    check_cpu(*weights, op, "weights");
    check_float(*weights, op, "weights");
    TORCH_CHECK(weights->dim() == 2 && weights->size(0) == T_ && weights->size(1) == k,
                "moe_ops::unpermute (cpu): weights must be [", T_, ", ", k, "], got ", weights->sizes());
  }
  const at::Tensor y = y_in.contiguous(), slot_rows = slot_rows_in.contiguous();
  at::Tensor out = empty_cached({T_, y.size(1)}, y.options());
  const int32_t* rows = slot_rows.const_data_ptr<int32_t>();
  combine_rows(y, y.size(0), T_, k, weights, [&](int64_t t, int64_t j) { return int64_t(rows[t * k + j]); }, out);
  return out;
}

}  // namespace
}  // namespace moe_cpu

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("permute", &moe_cpu::permute_cpu);
  m.impl("unpermute", &moe_cpu::unpermute_cpu);
}
