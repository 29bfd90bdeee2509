// Launch side of the expert ranking (csrc/kernels/expert_rank.cuh), shared by the permute and
// capacity_dispatch launchers: the workspace layout counts[nchunks*E] | local_rank[N] |
// expert_count[E] (sized and carved here, allocated by the torch binding), the two ranking
// launches, and the -1 fill of the row maps the placement kernels scatter into.
#pragma once

#include "launch_config.h"
#include "../kernels/expert_rank.cuh"

namespace moe_ops {
namespace launchers {
namespace detail {

struct RankWorkspace {
  int* counts;
  int* local_rank;
  int* expert_count;
};

inline size_t rank_workspace_bytes(long long N, int E) {
  const kern::RankPlan plan = kern::make_rank_plan(N, E);
  return align_up(static_cast<size_t>(plan.nchunks) * E * 4, 256) + align_up(static_cast<size_t>(N) * 4, 256) +
         align_up(static_cast<size_t>(E) * 4, 256);
}

inline RankWorkspace carve_rank_workspace(void* ws, long long N, int E) {
  const kern::RankPlan plan = kern::make_rank_plan(N, E);
  auto* b = static_cast<unsigned char*>(ws);
  RankWorkspace w;
  w.counts = reinterpret_cast<int*>(b);
  b += align_up(static_cast<size_t>(plan.nchunks) * E * 4, 256);
  w.local_rank = reinterpret_cast<int*>(b);
  b += align_up(static_cast<size_t>(N) * 4, 256);
  w.expert_count = reinterpret_cast<int*>(b);
  return w;
}

// Counts + ranks + the per-expert scan. expert_count may be an output (capacity's demand).
inline void rank_experts(const kern::RankSeq& seq, long long N, int E, int block_m, const kern::RankPlan& plan,
                         int* counts, int* local_rank, int* expert_count, int* kept, int capacity, int* offsets,
                         Stream stream) {
  using namespace kern;
  launch(rank_count_kernel, dim3(grid_for(plan.nchunks, kRankWarpsPerBlock)), dim3(32 * kRankWarpsPerBlock), 0, stream,
         seq, N, E, plan.ebits, plan.chunk, plan.nchunks, counts, local_rank);
  launch(rank_scan_kernel, dim3(1), dim3(kRankScanThreads), 0, stream, counts, plan.nchunks, E, block_m, expert_count,
         kept, capacity, offsets);
}

inline void fill_i32(int* p, long long n, int value, Stream stream) {
  launch(kern::fill_i32_kernel, dim3(grid_stride_blocks(n, 256)), dim3(256), 0, stream, p, n, value);
}

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
