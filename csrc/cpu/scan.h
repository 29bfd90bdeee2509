// The deterministic stable-placement scan of permute, capacity_dispatch and the fused expert ops:
// for every slot, its rank among the earlier slots routed to the same expert, and the per-expert
// counts. Chunked counts (chunks in parallel) -> an exclusive scan over chunks -> per-chunk
// placement: the same answer for any thread count, no atomics.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe_cpu {

// Given the expert of each slot in priority order (`expert_at(i)`, i < n; values outside
// [0, E) are dropped), computes for every slot its rank among earlier slots of the same expert
// (-1 for dropped) and the per-expert counts.
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

}  // namespace moe_cpu
