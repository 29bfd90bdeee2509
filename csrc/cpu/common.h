// Torch-side helpers shared by the CPU ops: argument checks, dtype mapping, the deterministic
// stable-placement scan (permute / capacity dispatch / fused experts) and the tile scheduler.
//
// Scheduling: work is cut into tiles that write disjoint outputs; tiles are split into one
// contiguous, cost-balanced range per thread and run with at::parallel_for. Because every
// output element's arithmetic is fixed by the kernels (kernels.h), the result does not depend on
// the split, i.e. not on the thread count.
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kernels.h"

namespace moe_cpu {

inline bool is_kernel_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

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
  TORCH_CHECK(t.device().is_cpu(), "moe_ops::", op, " (cpu): ", name, " must be a CPU tensor, got ",
              t.device());
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "moe_ops::", op, " (cpu): ", name, " must be float16/bfloat16/float32/float64, got ", st);
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "moe_ops::", op, " (cpu): ", name,
              " must be int32, got ", t.scalar_type());
}

// ------------------------------------------------------------------- stable placement scan
// Given the expert of each slot in priority order (`expert_at(i)`, i < n; values outside
// [0, E) are dropped), computes for every slot its rank among earlier slots of the same expert
// (-1 for dropped) and the per-expert counts. Chunked counts + an exclusive scan over chunks,
// then per-chunk placement: the same answer for any thread count, no atomics.
template <class ExpertAt>
void stable_ranks(int64_t n, int64_t E, ExpertAt expert_at, int32_t* rank, int64_t* counts) {
  constexpr int64_t kChunk = 8192;
  const int64_t nch = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  std::vector<int64_t> cnt(static_cast<size_t>(nch * E), 0);
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cc = cnt.data() + c * E;
      for (int64_t i = c * kChunk, end = std::min(n, (c + 1) * kChunk); i < end; ++i) {
        const int64_t e = expert_at(i);
        if (e >= 0 && e < E) ++cc[e];
      }
    }
  });
  for (int64_t e = 0; e < E; ++e) {  // exclusive scan over chunks
    int64_t run = 0;
    for (int64_t c = 0; c < nch; ++c) {
      const int64_t v = cnt[c * E + e];
      cnt[c * E + e] = run;
      run += v;
    }
    counts[e] = run;
  }
  at::parallel_for(0, nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* base = cnt.data() + c * E;
      for (int64_t i = c * kChunk, end = std::min(n, (c + 1) * kChunk); i < end; ++i) {
        const int64_t e = expert_at(i);
        rank[i] = (e >= 0 && e < E) ? static_cast<int32_t>(base[e]++) : -1;
      }
    }
  });
}

// Slot placement of a dropless layer (fused_experts, fused_experts_packed): slot s = t*k + j
// routed to expert id[s] gets the row slot_rows[s] of the expert-grouped operand (slots ascending
// within an expert; -1 when the id is outside [0, E)); offs[E+1] are the experts' row ranges and
// row_slot[r] the slot of row r.
struct Placement {
  std::vector<int32_t> slot_rows;
  std::vector<int64_t> offs, row_slot;
  int64_t rows() const { return offs.back(); }
};

inline Placement place_slots(const int32_t* id, int64_t S, int64_t E) {
  Placement p;
  p.slot_rows.resize(static_cast<size_t>(S));
  std::vector<int64_t> counts(static_cast<size_t>(E));
  p.offs.assign(static_cast<size_t>(E + 1), 0);
  stable_ranks(S, E, [&](int64_t s) { return static_cast<int64_t>(id[s]); }, p.slot_rows.data(), counts.data());
  for (int64_t e = 0; e < E; ++e) p.offs[e + 1] = p.offs[e] + counts[e];
  p.row_slot.resize(static_cast<size_t>(p.rows()));
  for (int64_t s = 0; s < S; ++s)
    if (p.slot_rows[s] >= 0) {
      p.slot_rows[s] = static_cast<int32_t>(p.offs[id[s]] + p.slot_rows[s]);
      p.row_slot[p.slot_rows[s]] = s;
    }
  return p;
}

// Checks shared by the fused expert ops: x[T,H] in a kernel dtype, ids[T,k] int32, weights
// [T,k] or None, activation swiglu|geglu; all CPU tensors.
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
  TORCH_CHECK(x.size(0) * ids.size(1) <= std::numeric_limits<int32_t>::max(), "moe_ops::", op,
              " (cpu): T*k = ", x.size(0) * ids.size(1), " overflows int32 row indexing");
  if (weights.has_value()) {
    check_cpu(*weights, op, "weights");
    check_float(*weights, op, "weights");
    TORCH_CHECK(weights->sizes() == ids.sizes(), "moe_ops::", op, " (cpu): weights must be ", ids.sizes(),
                ", got ", weights->sizes());
  }
}

// Meta kernel of both fused expert ops (same argument list): out has x's shape and dtype.
inline at::Tensor fused_experts_meta(const at::Tensor& x, const at::Tensor&, const c10::optional<at::Tensor>&,
                                     const at::Tensor&, const at::Tensor&, c10::string_view) {
  return at::empty(x.sizes(), x.options());
}

// ------------------------------------------------------------------------- tile scheduler
struct Tile {
  int64_t e;       // expert
  int64_t m0, m1;  // rows [m0, m1) (absolute rows of the packed operand)
  int64_t n0, n1;  // output columns [n0, n1)
  double cost;
};

// Runs fn(tile, next) for every tile (next: the tile this thread runs after it, or nullptr -- for
// prefetching its weights); each thread gets one contiguous range of roughly equal cost, so
// consecutive tiles (same expert, same weight block) stay on one core's caches.
template <class Fn>
void run_tiles(const std::vector<Tile>& tiles, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(tiles.size());
  if (n == 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(tiles[i], i + 1 < n ? &tiles[i + 1] : nullptr);
    return;
  }
  double total = 0;
  for (const Tile& t : tiles) total += t.cost;
  std::vector<int64_t> split(static_cast<size_t>(nt + 1), n);
  split[0] = 0;
  double run = 0;
  int64_t part = 1;
  for (int64_t i = 0; i < n && part < nt; ++i) {
    run += tiles[i].cost;
    while (part < nt && run >= total * part / nt) split[part++] = i + 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = split[p]; i < split[p + 1]; ++i)
        fn(tiles[i], i + 1 < split[p + 1] ? &tiles[i + 1] : nullptr);
  });
}

// Column block so that one block of weights (ncols x K in its dtype) stays in L2 (~96 KiB),
// a multiple of the micro-kernel column groups.
inline int64_t weight_col_block(int64_t K, int64_t elem_size, int64_t N, int64_t mult = 4) {
  int64_t nb = (96 * 1024) / std::max<int64_t>(1, K * elem_size);
  nb = std::max<int64_t>(mult, nb / mult * mult);
  return std::min<int64_t>(nb, std::max<int64_t>(N, 1));
}

// Expert row ranges from offsets, clamped to [0, M] and made monotone so bad values can never
// index out of bounds (the Python layer rejects them before we get here).
inline std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t E, int64_t M) {
  std::vector<int64_t> o(static_cast<size_t>(E + 1));
  const int32_t* p = offsets.const_data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t e = 0; e <= E; ++e) {
    int64_t v = std::min<int64_t>(std::max<int64_t>(p[e], 0), M);
    if (e > 0) v = std::max(v, prev);
    o[e] = prev = v;
  }
  return o;
}

// Defined in grouped_gemm.cpp: (expert, column-block, row-chunk) tiles in that order, and the
// column block (weight block in L2, >= 4 tiles per thread when possible; the packed path counts
// in 16-column panels of K*16 values with mult = 1).
std::vector<Tile> make_tiles(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t nb,
                             int64_t mt, double wcost);
int64_t nt_col_block(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t es, int64_t mult = 4);

}  // namespace moe_cpu
