// The token combine of unpermute, capacity_combine and the fused expert ops:
// out[t] = sum_j w[t,j] * src[row(t,j)] with a float32 (float64 for float64) accumulator,
// j ascending, multiply-then-add like the reference, one rounded store per token.
//
// Dataflow per token: gather the valid source rows (row(t,j) in [0, R), j ascending) and their
// weights -> combine_row (combine_row.h): register-resident accumulators per 64-column chunk,
// each source row read once, the output row written once (no float32 scratch row in memory).
// Tokens run in parallel; each output row is written by exactly one task, and the per-element
// arithmetic does not depend on the split, so results are bitwise thread-count independent.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "arg_checks.h"
#include "combine_row.h"

namespace moe_cpu {

// Grain (rows per task) so a task moves ~64 KiB.
inline int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(row_bytes, 1));
}

// out[t] = sum_j w[t,j] * src[row(t,j)] over rows in [0, R); shared by unpermute,
// capacity_combine and fused_experts. `row_of(t, j)` returns the source row or -1. `src` may be
// float32 while `out` is bf16/fp16/fp32 (fused path); float64 needs both float64.
template <class RowOf>
void combine_rows(const at::Tensor& src, int64_t R, int64_t T_, int64_t k, const c10::optional<at::Tensor>& weights,
                  RowOf row_of, at::Tensor& out) {
  const int64_t H = src.size(-1);
  if (src.scalar_type() == at::kDouble) {  // the gradcheck dtype: scalar, not a fast path
    at::Tensor w = weights.has_value() ? weights->to(at::kDouble).contiguous() : at::Tensor();
    const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
    const double* s = src.const_data_ptr<double>();
    double* o = out.data_ptr<double>();
    at::parallel_for(0, T_, row_grain(H * 8), [&](int64_t t0, int64_t t1) {
      std::vector<double> acc(H);
      for (int64_t t = t0; t < t1; ++t) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t r = row_of(t, j);
          if (r < 0 || r >= R) continue;
          const double* y = s + r * H;
          if (wp) {
            const double wj = wp[t * k + j];
            for (int64_t h = 0; h < H; ++h) acc[h] = acc[h] + wj * y[h];
          } else
            for (int64_t h = 0; h < H; ++h) acc[h] = acc[h] + y[h];
        }
        std::memcpy(o + t * H, acc.data(), H * sizeof(double));
      }
    });
    return;
  }
  const DType dt = to_dtype(src.scalar_type());
  const DType odt = to_dtype(out.scalar_type());  // may differ (fused path: f32 rows -> x dtype)
  const int64_t es = dtype_size(dt), oes = dtype_size(odt);
  at::Tensor w = weights.has_value() ? weights->to(at::kFloat).contiguous() : at::Tensor();
  const float* wp = w.defined() ? w.const_data_ptr<float>() : nullptr;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  // Valid source rows of token t (j ascending) and their weights; returns their count.
  auto gather = [&](int64_t t, const void** rows, float* ws) {
    int n = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = row_of(t, j);
      if (r < 0 || r >= R) continue;
      rows[n] = s + r * H * es;
      if (wp) ws[n] = wp[t * k + j];
      ++n;
    }
    return n;
  };
  // Prefetch the next token's rows while combining this one only for k <= 4: with few scattered
  // rows in flight the hardware prefetcher leaves memory latency exposed; with 8 rows the
  // prefetches only add load-port pressure (measured: docs/cpu.md, "Design notes and measured
  // history"). A hint: results do not depend on it.
  const bool prefetch = k <= 4;
  at::parallel_for(0, T_, row_grain(H * oes), [&](int64_t t0, int64_t t1) {
    std::vector<const void*> rows(static_cast<size_t>(2 * k));
    std::vector<float> ws(static_cast<size_t>(2 * k));
    const void** cur = rows.data();
    const void** nxt = rows.data() + k;
    float* wcur = ws.data();
    float* wnxt = ws.data() + k;
    int n = t0 < t1 ? gather(t0, cur, wcur) : 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int n_next = t + 1 < t1 ? gather(t + 1, nxt, wnxt) : 0;
      combine_row(cur, wp ? wcur : nullptr, n, dt, o + t * H * oes, odt, H, nxt, prefetch ? n_next : 0);
      std::swap(cur, nxt);
      std::swap(wcur, wnxt);
      n = n_next;
    }
  });
}

}  // namespace moe_cpu
