// permute / unpermute: group the T*k token copies by expert (stable in slot order, block_m-padded
// segments), and sum them back per token.
//
// permute dataflow (five launches, all on one stream, no host sync):
//   ids[T,k] --rank_count_kernel--> counts[chunk][E], local_rank[s]         (expert_rank.cuh)
//            --rank_scan_kernel---> chunk bases, expert_count[E], offsets[E+1] (padded scan)
//   fill_i32_kernel: sorted_slots[:] = -1 (padding rows and the tail stay -1)
//   permute_place_kernel (thread per slot): row = offsets[e] + base[s/chunk][e] + local_rank[s];
//            slot_rows[s] = row, sorted_slots[row] = s; invalid ids -> slot_rows[s] = -1
//   gather_rows_kernel (warp per row, row_gather.cuh): x_sorted[row] = x[sorted_slots[row] / k]
//            or zeros.
// Each row has exactly one writer and every value is a function of ids alone: deterministic.
// unpermute is combine_kernel (row_combine.cuh) with rows slot_rows[t*k + j].
#pragma once

#include "expert_rank.cuh"
#include "row_combine.cuh"
#include "row_gather.cuh"

namespace moe_ops {
namespace kern {

static __global__ void permute_place_kernel(const int* ids, long long N, int E, int chunk, const int* bases,
                                            const int* local_rank, const int* offsets, int* slot_rows,
                                            int* sorted_slots) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long s = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; s < N; s += stride) {
    const int e = ids[s];
    if (e < 0 || e >= E) {
      slot_rows[s] = -1;
      continue;
    }
    const int row = offsets[e] + bases[(s / chunk) * E + e] + local_rank[s];
    slot_rows[s] = row;
    sorted_slots[row] = static_cast<int>(s);
  }
}

}  // namespace kern
}  // namespace moe_ops
