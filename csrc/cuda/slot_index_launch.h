// The slot index of a dropless dispatch, shared by permute (which then gathers x rows) and the
// fused expert stage (whose GEMM1 gathers them itself): ranks the T*k slots by expert (stable,
// atomics-free: expert_rank_launch.h), then places them -- offsets[E+1] (block_m-padded),
// sorted_slots[P] (-1 = padding / tail) and slot_rows[T*k] (-1 = dropped id).
#pragma once

#include "expert_rank_launch.h"
#include "../kernels/permute.cuh"

namespace moe_ops {
namespace launchers {
namespace detail {

inline void build_slot_index(const int* ids, int64_t T, int k, int E, int block_m, void* rank_ws, int* offsets,
                             int* sorted_slots, int* slot_rows, Stream stream) {
  using namespace kern;
  const long long N = T * static_cast<long long>(k);
  const long long P = N + static_cast<long long>(E) * (block_m - 1);
  const RankPlan plan = make_rank_plan(N, E);
  const RankWorkspace ws = carve_rank_workspace(rank_ws, N, E);
  const RankSeq seq{ids, T, k, 0};
  rank_experts(seq, N, E, block_m, plan, ws.counts, ws.local_rank, ws.expert_count, nullptr, 0, offsets, stream);
  fill_i32(sorted_slots, P, -1, stream);
  launch(permute_place_kernel, dim3(grid_stride_blocks(N, 256)), dim3(256), 0, stream, ids, N, E, plan.chunk,
         static_cast<const int*>(ws.counts), static_cast<const int*>(ws.local_rank), static_cast<const int*>(offsets),
         slot_rows, sorted_slots);
}

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
