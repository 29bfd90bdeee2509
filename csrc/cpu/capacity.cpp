// capacity_dispatch / capacity_combine on CPU.
//
// dispatch: slots walked in priority order (kmajor: (j,t); token_major: (t,j)) -> stable
// per-expert positions (chunked counts + scan, scan.h) -> slot_pos, demand, kept, and an
// inverse map buf row -> token -> parallel row copy into buf[E,C,H] (unused rows zeroed).
// combine: the shared token combine (token_combine.h) over rows ids*C + slot_pos.
#include <string>

#include <torch/library.h>

#include "arg_checks.h"
#include "host_alloc.h"
#include "scan.h"
#include "token_combine.h"

namespace moe_cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> capacity_dispatch_cpu(const at::Tensor& x_in,
                                                                                 const at::Tensor& ids_in, int64_t E,
                                                                                 int64_t C, c10::string_view priority) {
  const char* op = "capacity_dispatch";
  check_cpu(x_in, op, "x");
  check_cpu(ids_in, op, "ids");
  check_float(x_in, op, "x");
  check_int32(ids_in, op, "ids");
  TORCH_CHECK(x_in.dim() == 2 && ids_in.dim() == 2 && ids_in.size(0) == x_in.size(0),
              "moe_ops::capacity_dispatch (cpu): need x[T,H] and ids[T,k], got ", x_in.sizes(), " and ",
              ids_in.sizes());
  TORCH_CHECK(E >= 1 && E <= moe_ops::limits::kMaxExperts && C >= 0 && C <= moe_ops::limits::kInt32Max / E,
              "moe_ops::capacity_dispatch (cpu): need 1 <= num_experts <= ", moe_ops::limits::kMaxExperts,
              ", capacity >= 0 and E*C <= ", moe_ops::limits::kInt32Max, ", got E=", E, " C=", C);
  const std::string pr(priority.data(), priority.size());
  TORCH_CHECK(pr == "kmajor" || pr == "token_major", "moe_ops::capacity_dispatch (cpu): unknown priority ", pr);
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const int64_t T_ = x.size(0), H = x.size(1), k = ids.size(1), S = T_ * k;
  const bool kmajor = pr == "kmajor";
  auto i32 = ids.options();
  at::Tensor buf = empty_cached({E, C, H}, x.options());
  at::Tensor slot_pos = at::empty({T_, k}, i32);
  at::Tensor demand = at::empty({E}, i32);
  at::Tensor kept = at::empty({E}, i32);

  const int32_t* id = ids.const_data_ptr<int32_t>();
  // The i-th slot in priority order is s = t*k + j with i = j*T + t (kmajor) or i = s; the
  // experts are laid out in that order first (nested loops: no division per slot, which cost
  // more than the ranking itself; docs/cpu.md, "Design notes and measured history").
  std::vector<int32_t> key;
  const int32_t* prio = id;
  if (kmajor && k > 1) {
    key.resize(static_cast<size_t>(S));
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < T_; ++t) key[j * T_ + t] = id[t * k + j];
    prio = key.data();
  }
  std::vector<int32_t> rank(static_cast<size_t>(S));
  std::vector<int64_t> counts(E);
  stable_ranks(S, E, [&](int64_t i) { return static_cast<int64_t>(prio[i]); }, rank.data(), counts.data());
  int32_t* pos = slot_pos.data_ptr<int32_t>();
  std::vector<int64_t> src_token(static_cast<size_t>(E * C), -1);
  at::parallel_for(0, T_, 4096, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t s = t * k + j;
        const int32_t r = rank[kmajor ? j * T_ + t : s];
        if (r >= 0 && r < C) {
          pos[s] = r;
          src_token[id[s] * C + r] = t;
        } else {
          pos[s] = -1;
        }
      }
  });
  for (int64_t e = 0; e < E; ++e) {
    demand.data_ptr<int32_t>()[e] = static_cast<int32_t>(counts[e]);
    kept.data_ptr<int32_t>()[e] = static_cast<int32_t>(std::min<int64_t>(counts[e], C));
  }
  const int64_t rb = H * x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(buf.data_ptr());
  at::parallel_for(0, E * C, row_grain(rb), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = src_token[r];
      if (t >= 0) std::memcpy(dst + r * rb, src + t * rb, rb);
      else std::memset(dst + r * rb, 0, rb);
    }
  });
  return {buf, slot_pos, demand, kept};
}

at::Tensor capacity_combine_cpu(const at::Tensor& buf_in, const at::Tensor& ids_in, const at::Tensor& pos_in,
                                const c10::optional<at::Tensor>& weights) {
  const char* op = "capacity_combine";
  check_cpu(buf_in, op, "buf_out");
  check_cpu(ids_in, op, "ids");
  check_cpu(pos_in, op, "slot_pos");
  check_float(buf_in, op, "buf_out");
  check_int32(ids_in, op, "ids");
  check_int32(pos_in, op, "slot_pos");
  TORCH_CHECK(buf_in.dim() == 3, "moe_ops::capacity_combine (cpu): buf_out must be [E,C,H], got ", buf_in.sizes());
  TORCH_CHECK(ids_in.dim() == 2 && pos_in.sizes() == ids_in.sizes(),
              "moe_ops::capacity_combine (cpu): ids and slot_pos must be the same [T,k], got ", ids_in.sizes(), " and ",
              pos_in.sizes());
  const int64_t E = buf_in.size(0), C = buf_in.size(1), H = buf_in.size(2);
  const int64_t T_ = ids_in.size(0), k = ids_in.size(1);
  if (weights.has_value()) {
    check_cpu(*weights, op, "weights");
    check_float(*weights, op, "weights");
    TORCH_CHECK(weights->sizes() == ids_in.sizes(), "moe_ops::capacity_combine (cpu): weights must be ", ids_in.sizes(),
                ", got ", weights->sizes());
  }
  const at::Tensor buf = buf_in.contiguous().view({E * C, H});
  const at::Tensor ids = ids_in.contiguous(), pos = pos_in.contiguous();
  const int32_t* id = ids.const_data_ptr<int32_t>();
  const int32_t* p = pos.const_data_ptr<int32_t>();
  at::Tensor out = empty_cached({T_, H}, buf.options());
  combine_rows(
      buf, E * C, T_, k, weights,
      [&](int64_t t, int64_t j) -> int64_t {
        const int64_t e = id[t * k + j], q = p[t * k + j];
        return (e >= 0 && e < E && q >= 0 && q < C) ? e * C + q : -1;
      },
      out);
  return out;
}

}  // namespace
}  // namespace moe_cpu

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("capacity_dispatch", &moe_cpu::capacity_dispatch_cpu);
  m.impl("capacity_combine", &moe_cpu::capacity_combine_cpu);
}
