// Torch binding of the CUDA kernels, written once and instantiated per backend.
//
// How to reuse it (this is all a backend needs):
//
//   #include "../cuda/ops_binding.h"
//   struct SimBackend {                                   // csrc/sim/ops_sim.cpp
//     static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
//     static constexpr const char* kName = "moe_ops_sim";
//     struct Guard { explicit Guard(const at::Tensor&) {} };
//     static void* stream(const at::Tensor&) { return nullptr; }
//   };
//   MOE_OPS_REGISTER_KERNELS(moe_ops_sim, CPU, SimBackend)
//
// csrc/cuda/ops_cuda.cpp does the same with the current CUDA stream and a CUDAGuard.
//
// Every op: TORCH_CHECKs (device, dtype, shape, ranges), makes inputs contiguous, allocates
// outputs (and a byte workspace where the kernels need scratch), then calls the torch-free
// launcher in csrc/cuda/launcher_api.h. No host synchronisation: nothing reads tensor values here.
// The user-facing argument errors come from moe_ops/ops.py; the checks here are the invariants
// the launchers rely on, for callers that go straight to torch.ops.*, on the limits every
// backend shares (csrc/arg_limits.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "../arg_limits.h"
#include "launcher_api.h"

namespace moe_ops {
namespace binding {

inline launchers::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return launchers::DType::kFloat32;
    case at::kHalf: return launchers::DType::kFloat16;
    case at::kBFloat16: return launchers::DType::kBFloat16;
    case at::kDouble: return launchers::DType::kFloat64;
    default: TORCH_CHECK(false, "moe_ops: ", name, " must be float32/float16/bfloat16/float64, got ", t.scalar_type());
  }
  return launchers::DType::kFloat32;
}

template <class B>
struct Ops {
  static void check_device(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.device().type() == B::kDevice, "moe_ops::", op, " (", B::kName, "): ", name, " must be on ",
                c10::DeviceTypeName(B::kDevice), ", got ", t.device());
  }
  static void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name) {
    TORCH_CHECK(a.device() == b.device(), "moe_ops::", op, ": ", name, " is on ", b.device(), " but the input is on ",
                a.device());
  }
  static at::Tensor ids_arg(const at::Tensor& x, const at::Tensor& ids, const char* op, const char* name) {
    check_same_device(x, ids, op, name);
    TORCH_CHECK(ids.scalar_type() == at::kInt, "moe_ops::", op, ": ", name, " must be int32, got ", ids.scalar_type());
    TORCH_CHECK(ids.dim() == 2, "moe_ops::", op, ": ", name, " must be 2-D [T, k], got ", ids.sizes());
    return ids.contiguous();
  }
  // x[T, H] and ids[T, k] of a dispatch op (permute, capacity_dispatch) over E experts; returns ids.
  static at::Tensor dispatch_args(const at::Tensor& x, const at::Tensor& ids_in, int64_t E, const char* op) {
    check_device(x, op, "x");
    to_dtype(x, "x");
    TORCH_CHECK(x.dim() == 2, "moe_ops::", op, ": x must be 2-D [T, H], got ", x.sizes());
    const at::Tensor ids = ids_arg(x, ids_in, op, "ids");
    TORCH_CHECK(ids.size(0) == x.size(0), "moe_ops::", op, ": ids has ", ids.size(0), " rows but x has ", x.size(0));
    TORCH_CHECK(E >= 1 && E <= limits::kMaxExperts, "moe_ops::", op, ": num_experts must be in [1, ",
                limits::kMaxExperts, "], got ", E);
    return ids;
  }
  static std::optional<at::Tensor> weights_arg(const at::Tensor& x, const std::optional<at::Tensor>& w, int64_t T,
                                               int64_t k, const char* op) {
    if (!w.has_value()) return std::nullopt;
    check_same_device(x, *w, op, "weights");
    to_dtype(*w, "weights");
    TORCH_CHECK(w->dim() == 2 && w->size(0) == T && w->size(1) == k, "moe_ops::", op, ": weights must be [", T, ", ", k,
                "], got ", w->sizes());
    // the kernels' accumulator type: float32, float64 when the data is float64
    return w->to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }

  static std::tuple<at::Tensor, at::Tensor> topk_gating(const at::Tensor& logits_in, int64_t k,
                                                        c10::string_view scoring, bool renormalize, int64_t n_group,
                                                        int64_t topk_group,
                                                        const std::optional<at::Tensor>& correction_bias,
                                                        double scaling_factor) {
    const char* op = "topk_gating";
    check_device(logits_in, op, "logits");
    const auto dtype = to_dtype(logits_in, "logits");
    TORCH_CHECK(dtype != launchers::DType::kFloat64, "moe_ops::topk_gating (", B::kName,
                "): float64 logits are not supported (the kernel computes in float32); pass float32");
    TORCH_CHECK(logits_in.dim() == 2, "moe_ops::topk_gating: logits must be 2-D [T, E], got ", logits_in.sizes());
    const int64_t T = logits_in.size(0), E = logits_in.size(1);
    TORCH_CHECK(E >= 1 && E <= launchers::kGatingMaxExperts, "moe_ops::topk_gating (", B::kName,
                "): needs 1 <= E <= ", launchers::kGatingMaxExperts, ", got E=", E);
    TORCH_CHECK(k >= 1 && k <= std::min(E, limits::kMaxK), "moe_ops::topk_gating: k must be in [1, min(E, ",
                limits::kMaxK, ")], got ", k);
    int scoring_id;
    if (scoring == "softmax") scoring_id = 0;
    else if (scoring == "sigmoid") scoring_id = 1;
    else
      TORCH_CHECK(false, "moe_ops::topk_gating: scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring),
                  "'");
    TORCH_CHECK(n_group >= 0, "moe_ops::topk_gating: n_group must be >= 0 (0 = off), got ", n_group);
    if (n_group > 0) {
      TORCH_CHECK(E % n_group == 0, "moe_ops::topk_gating: E=", E, " is not divisible by n_group=", n_group);
      TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "moe_ops::topk_gating: topk_group must be in [1, ", n_group,
                  "], got ", topk_group);
      TORCH_CHECK(launchers::topk_gating_supported(static_cast<int>(E), static_cast<int>(n_group)),
                  "moe_ops::topk_gating (", B::kName, "): group-limited routing with E=", E, " needs more than ",
                  launchers::kGatingMaxGroupSmem / 1024, " KiB of shared memory per row");
    }
    TORCH_CHECK(T * k <= limits::kInt32Max, "moe_ops::topk_gating: T*k overflows int32");
    std::optional<at::Tensor> bias;
    if (correction_bias.has_value()) {
      check_same_device(logits_in, *correction_bias, op, "correction_bias");
      to_dtype(*correction_bias, "correction_bias");
      TORCH_CHECK(correction_bias->dim() == 1 && correction_bias->numel() == E,
                  "moe_ops::topk_gating: correction_bias must be 1-D with E=", E, " entries, got ",
                  correction_bias->sizes());
      bias = correction_bias->to(at::kFloat).contiguous();
    }
    typename B::Guard guard(logits_in);
    const at::Tensor logits = logits_in.contiguous();
    at::Tensor weights = at::empty({T, k}, logits.options().dtype(at::kFloat));
    at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kInt));
    launchers::topk_gating(logits.data_ptr(), dtype, bias ? bias->data_ptr<float>() : nullptr, T, static_cast<int>(E),
                           static_cast<int>(k), scoring_id, renormalize, static_cast<int>(n_group),
                           static_cast<int>(topk_group), static_cast<float>(scaling_factor), weights.data_ptr<float>(),
                           ids.data_ptr<int>(), B::stream(logits));
    return {weights, ids};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x_in,
                                                                            const at::Tensor& ids_in, int64_t E,
                                                                            int64_t block_m) {
    const char* op = "permute";
    const at::Tensor ids = dispatch_args(x_in, ids_in, E, op);
    TORCH_CHECK(block_m >= 1 && block_m <= 1 << 20, "moe_ops::permute: block_m must be in [1, 2^20], got ", block_m);
    const int64_t T = ids.size(0), k = ids.size(1), H = x_in.size(1);
    const int64_t P = T * k + E * (block_m - 1);
    TORCH_CHECK(P <= limits::kInt32Max, "moe_ops::permute: P = T*k + E*(block_m-1) = ", P, " overflows int32");
    typename B::Guard guard(x_in);
    const at::Tensor x = x_in.contiguous();
    at::Tensor x_sorted = at::empty({P, H}, x.options());
    at::Tensor sorted_slots = at::empty({P}, ids.options());
    at::Tensor offsets = at::empty({E + 1}, ids.options());
    at::Tensor slot_rows = at::empty({T * k}, ids.options());
    at::Tensor ws = at::empty(
        {static_cast<int64_t>(launchers::permute_workspace_bytes(T, static_cast<int>(k), static_cast<int>(E)))},
        ids.options().dtype(at::kByte));
    launchers::permute(x.data_ptr(), x.element_size(), T, H, ids.data_ptr<int>(), static_cast<int>(k),
                       static_cast<int>(E), static_cast<int>(block_m), x_sorted.data_ptr(),
                       sorted_slots.data_ptr<int>(), offsets.data_ptr<int>(), slot_rows.data_ptr<int>(), ws.data_ptr(),
                       B::stream(x));
    return {x_sorted, sorted_slots, offsets, slot_rows};
  }

  static at::Tensor unpermute(const at::Tensor& y_in, const at::Tensor& slot_rows_in,
                              const std::optional<at::Tensor>& weights_in, int64_t k) {
    const char* op = "unpermute";
    check_device(y_in, op, "y_sorted");
    const auto dtype = to_dtype(y_in, "y_sorted");
    TORCH_CHECK(y_in.dim() == 2, "moe_ops::unpermute: y_sorted must be 2-D [P, H], got ", y_in.sizes());
    check_same_device(y_in, slot_rows_in, op, "slot_rows");
    TORCH_CHECK(slot_rows_in.scalar_type() == at::kInt, "moe_ops::unpermute: slot_rows must be int32, got ",
                slot_rows_in.scalar_type());
    TORCH_CHECK(k >= 1 && k <= limits::kMaxK, "moe_ops::unpermute: k must be in [1, ", limits::kMaxK, "], got ", k);
    TORCH_CHECK(slot_rows_in.numel() % k == 0, "moe_ops::unpermute: slot_rows has ", slot_rows_in.numel(),
                " entries, not a multiple of k=", k);
    const int64_t T = slot_rows_in.numel() / k, H = y_in.size(1);
    const auto weights = weights_arg(y_in, weights_in, T, k, op);
    typename B::Guard guard(y_in);
    const at::Tensor y = y_in.contiguous();
    const at::Tensor slot_rows = slot_rows_in.contiguous();
    at::Tensor out = at::empty({T, H}, y.options());
    launchers::unpermute(y.data_ptr(), dtype, y.size(0), H, slot_rows.data_ptr<int>(),
                         weights ? weights->data_ptr() : nullptr, T, static_cast<int>(k), out.data_ptr(), B::stream(y));
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> capacity_dispatch(const at::Tensor& x_in,
                                                                                      const at::Tensor& ids_in,
                                                                                      int64_t E, int64_t C,
                                                                                      c10::string_view priority) {
    const char* op = "capacity_dispatch";
    const at::Tensor ids = dispatch_args(x_in, ids_in, E, op);
    TORCH_CHECK(C >= 0, "moe_ops::capacity_dispatch: capacity must be >= 0, got ", C);
    TORCH_CHECK(E * C <= limits::kInt32Max, "moe_ops::capacity_dispatch: E*C overflows int32");
    bool kmajor;
    if (priority == "kmajor") kmajor = true;
    else if (priority == "token_major") kmajor = false;
    else
      TORCH_CHECK(false, "moe_ops::capacity_dispatch: priority must be 'kmajor' or 'token_major', got '",
                  std::string(priority), "'");
    const int64_t T = ids.size(0), k = ids.size(1), H = x_in.size(1);
    TORCH_CHECK(T * k <= limits::kInt32Max, "moe_ops::capacity_dispatch: T*k overflows int32");
    typename B::Guard guard(x_in);
    const at::Tensor x = x_in.contiguous();
    at::Tensor buf = at::empty({E, C, H}, x.options());
    at::Tensor slot_pos = at::empty({T, k}, ids.options());
    at::Tensor demand = at::empty({E}, ids.options());
    at::Tensor kept = at::empty({E}, ids.options());
    at::Tensor ws = at::empty({static_cast<int64_t>(launchers::capacity_workspace_bytes(
                                  T, static_cast<int>(k), static_cast<int>(E), static_cast<int>(C)))},
                              ids.options().dtype(at::kByte));
    launchers::capacity_dispatch(x.data_ptr(), x.element_size(), T, H, ids.data_ptr<int>(), static_cast<int>(k),
                                 static_cast<int>(E), static_cast<int>(C), kmajor, buf.data_ptr(),
                                 slot_pos.data_ptr<int>(), demand.data_ptr<int>(), kept.data_ptr<int>(), ws.data_ptr(),
                                 B::stream(x));
    return {buf, slot_pos, demand, kept};
  }

  static at::Tensor capacity_combine(const at::Tensor& buf_in, const at::Tensor& ids_in, const at::Tensor& slot_pos_in,
                                     const std::optional<at::Tensor>& weights_in) {
    const char* op = "capacity_combine";
    check_device(buf_in, op, "buf_out");
    const auto dtype = to_dtype(buf_in, "buf_out");
    TORCH_CHECK(buf_in.dim() == 3, "moe_ops::capacity_combine: buf_out must be 3-D [E, C, H], got ", buf_in.sizes());
    const at::Tensor ids = ids_arg(buf_in, ids_in, op, "ids");
    const at::Tensor slot_pos = ids_arg(buf_in, slot_pos_in, op, "slot_pos");
    TORCH_CHECK(slot_pos.sizes() == ids.sizes(), "moe_ops::capacity_combine: slot_pos shape ", slot_pos.sizes(),
                " != ids shape ", ids.sizes());
    const int64_t E = buf_in.size(0), C = buf_in.size(1), H = buf_in.size(2);
    const int64_t T = ids.size(0), k = ids.size(1);
    TORCH_CHECK(E * C <= limits::kInt32Max, "moe_ops::capacity_combine: E*C overflows int32");
    TORCH_CHECK(k <= launchers::kCombineMaxK, "moe_ops::capacity_combine: k must be <= ", launchers::kCombineMaxK,
                ", got ", k);
    const auto weights = weights_arg(buf_in, weights_in, T, k, op);
    typename B::Guard guard(buf_in);
    const at::Tensor buf = buf_in.contiguous();
    if (k == 0) return at::zeros({T, H}, buf.options());
    at::Tensor out = at::empty({T, H}, buf.options());
    launchers::capacity_combine(buf.data_ptr(), dtype, static_cast<int>(E), static_cast<int>(C), H, ids.data_ptr<int>(),
                                slot_pos.data_ptr<int>(), weights ? weights->data_ptr() : nullptr, T,
                                static_cast<int>(k), out.data_ptr(), B::stream(buf));
    return out;
  }

  // a, b (or dc) and expert_offsets of a grouped GEMM: device, dtype, offsets shape.
  static void gemm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, int64_t E, const char* op,
                        const char* b_name) {
    check_device(a, op, "a");
    to_dtype(a, "a");
    check_same_device(a, b, op, b_name);
    check_same_device(a, offs, op, "expert_offsets");
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), "moe_ops::", op, " (", B::kName,
                "): operands must share a dtype, got ", a.scalar_type(), " and ", b.scalar_type());
    TORCH_CHECK(offs.scalar_type() == at::kInt, "moe_ops::", op, ": expert_offsets must be int32, got ",
                offs.scalar_type());
    TORCH_CHECK(offs.dim() == 1 && offs.numel() == E + 1, "moe_ops::", op, ": expert_offsets needs E+1 = ", E + 1,
                " entries, got ", offs.sizes());
    TORCH_CHECK(a.size(0) <= limits::kInt32Max, "moe_ops::", op, ": M overflows int32");
  }

  static at::Tensor workspace(const at::Tensor& like, int64_t E) {
    return at::empty({static_cast<int64_t>(launchers::grouped_gemm_workspace_bytes(static_cast<int>(E)))},
                     like.options().dtype(at::kByte));
  }

  static at::Tensor grouped_gemm(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offs_in,
                                 bool trans_b) {
    const char* op = "grouped_gemm";
    TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 3, "moe_ops::grouped_gemm: need a[M,K], b[E,.,.], got ", a_in.sizes(),
                " and ", b_in.sizes());
    const int64_t E = b_in.size(0), M = a_in.size(0), K = a_in.size(1);
    const int64_t N = trans_b ? b_in.size(1) : b_in.size(2);
    TORCH_CHECK(E >= 1 && E <= limits::kMaxExperts, "moe_ops::grouped_gemm: b needs 1 <= E <= ", limits::kMaxExperts,
                " experts, got ", E);
    TORCH_CHECK((trans_b ? b_in.size(2) : b_in.size(1)) == K, "moe_ops::grouped_gemm: a has K=", K, " but b is ",
                b_in.sizes(), trans_b ? " (trans_b)" : "");
    gemm_args(a_in, b_in, offs_in, E, op, "b");
    typename B::Guard guard(a_in);
    const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), offs = offs_in.contiguous();
    at::Tensor c = at::empty({M, N}, a.options());
    at::Tensor ws = workspace(offs, E);
    launchers::grouped_gemm(a.data_ptr(), to_dtype(a, "a"), M, K, b.data_ptr(), static_cast<int>(E), N, trans_b,
                            offs.data_ptr<int>(), c.data_ptr(), ws.data_ptr(), B::stream(a));
    return c;
  }

  static at::Tensor grouped_gemm_wgrad(const at::Tensor& a_in, const at::Tensor& dc_in, const at::Tensor& offs_in,
                                       int64_t E) {
    const char* op = "grouped_gemm_wgrad";
    TORCH_CHECK(a_in.dim() == 2 && dc_in.dim() == 2 && a_in.size(0) == dc_in.size(0),
                "moe_ops::grouped_gemm_wgrad: need a[M,K], dc[M,N], got ", a_in.sizes(), " and ", dc_in.sizes());
    TORCH_CHECK(E >= 0 && E <= limits::kMaxExperts, "moe_ops::grouped_gemm_wgrad: num_experts must be in [0, ",
                limits::kMaxExperts, "], got ", E);
    gemm_args(a_in, dc_in, offs_in, E, op, "dc");
    const int64_t M = a_in.size(0), K = a_in.size(1), N = dc_in.size(1);
    typename B::Guard guard(a_in);
    const at::Tensor a = a_in.contiguous(), dc = dc_in.contiguous(), offs = offs_in.contiguous();
    at::Tensor db = at::empty({E, K, N}, a.options());
    at::Tensor ws = workspace(offs, E);
    launchers::grouped_gemm_wgrad(a.data_ptr(), dc.data_ptr(), to_dtype(a, "a"), M, K, N, offs.data_ptr<int>(),
                                  static_cast<int>(E), db.data_ptr(), ws.data_ptr(), B::stream(a));
    return db;
  }

  static at::Tensor fused_experts(const at::Tensor& x_in, const at::Tensor& ids_in,
                                  const std::optional<at::Tensor>& weights_in, const at::Tensor& wgu_in,
                                  const at::Tensor& wd_in, c10::string_view activation) {
    const char* op = "fused_experts";
    check_device(x_in, op, "x");
    const auto dtype = to_dtype(x_in, "x");
    TORCH_CHECK(x_in.dim() == 2, "moe_ops::fused_experts: x must be 2-D [T, H], got ", x_in.sizes());
    const at::Tensor ids = ids_arg(x_in, ids_in, op, "ids");
    const int64_t T = x_in.size(0), H = x_in.size(1), k = ids.size(1);
    TORCH_CHECK(ids.size(0) == T, "moe_ops::fused_experts: ids has ", ids.size(0), " rows but x has ", T);
    TORCH_CHECK(k >= 1 && k <= limits::kMaxK, "moe_ops::fused_experts: k must be in [1, ", limits::kMaxK, "], got ", k);
    TORCH_CHECK(T * k <= limits::kInt32Max, "moe_ops::fused_experts: T*k overflows int32");
    check_same_device(x_in, wgu_in, op, "w_gate_up");
    check_same_device(x_in, wd_in, op, "w_down");
    TORCH_CHECK(wgu_in.scalar_type() == x_in.scalar_type() && wd_in.scalar_type() == x_in.scalar_type(),
                "moe_ops::fused_experts: x, w_gate_up and w_down must share a dtype");
    TORCH_CHECK(wgu_in.dim() == 3 && wgu_in.size(1) % 2 == 0 && wgu_in.size(2) == H,
                "moe_ops::fused_experts: w_gate_up must be [E, 2I, H=", H, "], got ", wgu_in.sizes());
    const int64_t E = wgu_in.size(0), I = wgu_in.size(1) / 2;
    TORCH_CHECK(E >= 1 && E <= limits::kMaxExperts, "moe_ops::fused_experts: needs E >= 1 experts");
    TORCH_CHECK(wd_in.dim() == 3 && wd_in.size(0) == E && wd_in.size(1) == H && wd_in.size(2) == I,
                "moe_ops::fused_experts: w_down must be [E=", E, ", H=", H, ", I=", I, "], got ", wd_in.sizes());
    int act;
    if (activation == "swiglu") act = 1;
    else if (activation == "geglu") act = 2;
    else
      TORCH_CHECK(false, "moe_ops::fused_experts: activation must be 'swiglu' or 'geglu', got '",
                  std::string(activation), "'");
    const auto weights = weights_arg(x_in, weights_in, T, k, op);
    typename B::Guard guard(x_in);
    const at::Tensor x = x_in.contiguous(), wgu = wgu_in.contiguous(), wd = wd_in.contiguous();
    at::Tensor out = at::empty({T, H}, x.options());
    at::Tensor ws = at::empty({static_cast<int64_t>(launchers::fused_experts_workspace_bytes(
                                  T, static_cast<int>(k), static_cast<int>(E), H, I, dtype))},
                              x.options().dtype(at::kByte));
    launchers::fused_experts(x.data_ptr(), dtype, T, H, ids.data_ptr<int>(), static_cast<int>(k),
                             weights ? weights->data_ptr() : nullptr, wgu.data_ptr(), wd.data_ptr(),
                             static_cast<int>(E), I, act, out.data_ptr(), ws.data_ptr(), B::stream(x));
    return out;
  }
};

template <class B>
void register_ops(torch::Library& m) {
  m.impl("topk_gating", &Ops<B>::topk_gating);
  m.impl("permute", &Ops<B>::permute);
  m.impl("unpermute", &Ops<B>::unpermute);
  m.impl("capacity_dispatch", &Ops<B>::capacity_dispatch);
  m.impl("capacity_combine", &Ops<B>::capacity_combine);
  m.impl("grouped_gemm", &Ops<B>::grouped_gemm);
  m.impl("grouped_gemm_wgrad", &Ops<B>::grouped_gemm_wgrad);
  m.impl("fused_experts", &Ops<B>::fused_experts);
}

}  // namespace binding
}  // namespace moe_ops

// One line per backend: MOE_OPS_REGISTER_KERNELS(namespace, DispatchKey, BackendStruct).
#define MOE_OPS_REGISTER_KERNELS(NS, KEY, BACKEND) \
  TORCH_LIBRARY_IMPL(NS, KEY, m) { ::moe_ops::binding::register_ops<BACKEND>(m); }
