// topk_gating on CPU: logits[T,E] -> (weights[T,k], ids[T,k] int32).
//
// Dataflow per token row (rows in parallel): widen the logits to the accumulation type
// (float32; float64 stays float64), scores = softmax/sigmoid, selection keys (the logit itself
// for unbiased softmax, else score + bias) mapped to integers that order as the ranking rule
// (descending, NaN lowest, ties to the lower index), optional group limiting (keys outside the
// topk_group best groups -> -inf), then a stable insertion top-k, weights = unbiased scores of
// the winners, renormalised and scaled. Any E; O(E*k) worst case per row, O(E) typical.
// float32 scores use the AVX2 exp of router_rows.h (8-lane sums in a fixed order: deterministic,
// within an ulp or two of libm, +-inf and denormals as libm); rows with a NaN logit take the
// scalar path, which defines NaN propagation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "arg_checks.h"
#include "router_rows.h"

namespace moe_cpu {
namespace {

// The ranking rule as an unsigned integer order, so every comparison below is a plain `>` and
// nothing can assume NaN away: larger is better, every NaN maps to 0 (below -inf's image),
// -0.0 and +0.0 map to the same value. The CUDA kernel (order_key) and Triton (_order) rank
// through the same map. Softmax scores are NaN for a row holding +inf or only -inf logits
// (inf - inf), so NaN keys occur in rows without a NaN logit: they must rank below the -inf keys
// of masked groups, as in the reference.
// Branch-free, so the per-row loop over E vectorises: x + 0 turns -0.0 into +0.0; a negative
// pattern flips all bits, a positive one only the sign bit.
inline uint32_t order_key(float f) {
  const float z = f + 0.0f;
  uint32_t u;
  std::memcpy(&u, &z, sizeof u);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u;
  return f == f ? u ^ flip : 0u;  // -inf -> 0x007FFFFF > 0 = NaN
}
inline uint64_t order_key(double f) {
  const double z = f + 0.0;
  uint64_t u;
  std::memcpy(&u, &z, sizeof u);
  const uint64_t flip = static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (uint64_t(1) << 63);
  return f == f ? u ^ flip : 0u;
}
template <class T>
using OrderKey = decltype(order_key(T()));

// Top-n indices of ord[0..len) into out[0..n), best first; stable (ties -> lower index). The
// current n-th key stays in a register.
template <class U>
void top_n(const U* ord, int64_t len, int64_t n, int32_t* out) {
  int64_t size = 0;
  U thr = 0;
  for (int64_t e = 0; e < len; ++e) {
    const U v = ord[e];
    if (size == n && !(v > thr)) continue;
    int64_t p = size < n ? size++ : n - 1;
    while (p > 0 && v > ord[out[p - 1]]) {
      out[p] = out[p - 1];
      --p;
    }
    out[p] = static_cast<int32_t>(e);
    thr = ord[out[size - 1]];
  }
}

template <class T>
void gate_rows(const T* logits, int64_t T_, int64_t E, int64_t k, bool sigmoid, bool renorm, int64_t n_group,
               int64_t topk_group, const T* bias, T scale, T* w_out, int32_t* id_out) {
  using U = OrderKey<T>;
  const bool key_is_logit = !sigmoid && bias == nullptr;
  const int64_t G = n_group > 0 ? E / n_group : E;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(E, 1));
  at::parallel_for(0, T_, grain, [&](int64_t t0, int64_t t1) {
    std::vector<T> scores(E), keys(bias ? E : 0);
    std::vector<char> keep(std::max<int64_t>(n_group, 1));
    std::vector<U> ord(E), gord(std::max<int64_t>(n_group, 1));
    std::vector<int32_t> top(std::max<int64_t>({k, n_group, int64_t(2)}));
    for (int64_t t = t0; t < t1; ++t) {
      const T* x = logits + t * E;
      bool vectorised = false;  // float32 rows without NaN on AVX2; the rest: the scalar path
      if constexpr (std::is_same_v<T, float>)
        vectorised = sigmoid ? sigmoid_row_f32(x, scores.data(), E) : softmax_row_f32(x, scores.data(), E);
      if (!vectorised && sigmoid) {
        for (int64_t e = 0; e < E; ++e) scores[e] = T(1) / (T(1) + std::exp(-x[e]));
      } else if (!vectorised) {
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t e = 0; e < E; ++e) m = (std::isnan(x[e]) || x[e] > m) && !std::isnan(m) ? x[e] : m;
        T sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += (scores[e] = std::exp(x[e] - m));
        for (int64_t e = 0; e < E; ++e) scores[e] = scores[e] / sum;
      }
      // keys (group scores add the keys themselves), then their order
      const T* key = key_is_logit ? x : scores.data();
      if (bias) {
        for (int64_t e = 0; e < E; ++e) keys[e] = scores[e] + bias[e];
        key = keys.data();
      }
      for (int64_t e = 0; e < E; ++e) ord[e] = order_key(key[e]);
      if (n_group > 0) {
        const int64_t two = std::min<int64_t>(2, G);
        for (int64_t g = 0; g < n_group; ++g) {
          top_n(ord.data() + g * G, G, two, top.data());
          const T sc = two == 2 ? key[g * G + top[0]] + key[g * G + top[1]] : key[g * G + top[0]];
          gord[g] = order_key(sc);  // +inf + -inf is a NaN group score: it ranks last
        }
        top_n(gord.data(), n_group, topk_group, top.data());
        std::fill(keep.begin(), keep.end(), 0);
        for (int64_t i = 0; i < topk_group; ++i) keep[top[i]] = 1;
        const U masked = order_key(-std::numeric_limits<T>::infinity());
        for (int64_t g = 0; g < n_group; ++g)
          if (!keep[g])
            for (int64_t e = g * G; e < (g + 1) * G; ++e) ord[e] = masked;
      }
      int32_t* ids = id_out + t * k;
      T* w = w_out + t * k;
      top_n(ord.data(), E, k, ids);
      for (int64_t j = 0; j < k; ++j) w[j] = scores[ids[j]];
      if (renorm) {
        T s = 0;
        for (int64_t j = 0; j < k; ++j) s += w[j];
        const T d = s + T(1e-20);
        for (int64_t j = 0; j < k; ++j) w[j] = w[j] / d;
      }
      for (int64_t j = 0; j < k; ++j) w[j] = w[j] * scale;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_gating_cpu(const at::Tensor& logits, int64_t k, c10::string_view scoring,
                                                   bool renormalize, int64_t n_group, int64_t topk_group,
                                                   const c10::optional<at::Tensor>& correction_bias,
                                                   double scaling_factor) {
  const char* op = "topk_gating";
  check_cpu(logits, op, "logits");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.dim() == 2, "moe_ops::topk_gating (cpu): logits must be 2-D, got ", logits.sizes());
  const int64_t T_ = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && k >= 1 && k <= E && k <= moe_ops::limits::kMaxK,
              "moe_ops::topk_gating (cpu): need 1 <= k <= min(E, ", moe_ops::limits::kMaxK, "), got k=", k, " E=", E);
  const std::string sc(scoring.data(), scoring.size());
  TORCH_CHECK(sc == "softmax" || sc == "sigmoid", "moe_ops::topk_gating (cpu): unknown scoring ", sc);
  if (n_group > 0) {
    TORCH_CHECK(E % n_group == 0 && topk_group >= 1 && topk_group <= n_group,
                "moe_ops::topk_gating (cpu): bad group routing n_group=", n_group, " topk_group=", topk_group,
                " for E=", E, " k=", k);
  }
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = logits.to(acc).contiguous();
  at::Tensor bias;
  if (correction_bias.has_value()) {
    check_cpu(*correction_bias, op, "correction_bias");
    check_float(*correction_bias, op, "correction_bias");
    TORCH_CHECK(correction_bias->numel() == E, "moe_ops::topk_gating (cpu): correction_bias needs ", E, " entries");
    bias = correction_bias->to(acc).contiguous();
  }
  at::Tensor w = at::empty({T_, k}, x.options());
  at::Tensor ids = at::empty({T_, k}, x.options().dtype(at::kInt));
  AT_DISPATCH_SWITCH(acc, "topk_gating_cpu", AT_DISPATCH_CASE(at::kFloat, [&] {
                       gate_rows<float>(x.data_ptr<float>(), T_, E, k, sc == "sigmoid", renormalize, n_group,
                                        topk_group, bias.defined() ? bias.data_ptr<float>() : nullptr,
                                        static_cast<float>(scaling_factor), w.data_ptr<float>(),
                                        ids.data_ptr<int32_t>());
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       gate_rows<double>(x.data_ptr<double>(), T_, E, k, sc == "sigmoid", renormalize, n_group,
                                         topk_group, bias.defined() ? bias.data_ptr<double>() : nullptr, scaling_factor,
                                         w.data_ptr<double>(), ids.data_ptr<int32_t>());
                     }));
  return {w, ids};
}

}  // namespace
}  // namespace moe_cpu

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) { m.impl("topk_gating", &moe_cpu::topk_gating_cpu); }
