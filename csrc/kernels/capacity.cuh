// capacity_dispatch / capacity_combine: GShard-style fixed-capacity expert buffers.
//
// Dataflow of capacity_dispatch (no host sync, no atomics):
//   ids[T,k] in priority order (kmajor: q = j*T + t; token_major: q = t*k + j)
//     --rank_count_kernel / rank_scan_kernel (expert_rank.cuh)--> position of every slot among
//       the earlier same-expert slots, demand[e] (= count), kept[e] = min(count, C)
//   fill_i32_kernel: src_slot[E*C] = -1
//   capacity_place_kernel (thread per q): pos < C -> slot_pos[t,j] = pos, src_slot[e*C+pos] = s;
//       else / invalid id -> slot_pos = -1
//   gather_rows_kernel (row_gather.cuh): buf[e, p] = x[src_slot / k] or zeros.
// capacity_combine is combine_kernel (row_combine.cuh) with rows ids[t,j]*C + slot_pos[t,j].
#pragma once

#include "expert_rank.cuh"
#include "row_combine.cuh"
#include "row_gather.cuh"

namespace moe_ops {
namespace kern {

static __global__ void capacity_place_kernel(RankSeq seq, long long N, int E, int C, int chunk, const int* bases,
                                             const int* local_rank, int* slot_pos, int* src_slot) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long q = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; q < N; q += stride) {
    const long long s = seq.slot(q);
    const int e = seq.ids[s];
    int pos = -1;
    if (e >= 0 && e < E) {
      pos = bases[(q / chunk) * E + e] + local_rank[q];
      if (pos < C) src_slot[static_cast<long long>(e) * C + pos] = static_cast<int>(s);
      else pos = -1;
    }
    slot_pos[s] = pos;
  }
}

}  // namespace kern
}  // namespace moe_ops
