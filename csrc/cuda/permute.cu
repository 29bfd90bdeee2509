// Launchers of the permute family: permute (kernels: csrc/kernels/permute.cuh, expert_rank.cuh,
// row_gather.cuh) and its inverse unpermute (row_combine.cuh, the combine capacity_combine
// shares).
#include "row_combine_launch.h"
#include "row_gather_launch.h"
#include "slot_index_launch.h"

namespace moe_ops {
namespace launchers {

size_t permute_workspace_bytes(int64_t T, int k, int E) {
  return detail::rank_workspace_bytes(T * static_cast<int64_t>(k), E);
}

void permute(const void* x, size_t elem_bytes, int64_t T, int64_t H, const int* ids, int k, int E, int block_m,
             void* x_sorted, int* sorted_slots, int* expert_offsets, int* slot_rows, void* workspace,
             StreamHandle stream_handle) {
  if (E < 1 || block_m < 1 || k < 0 || T < 0 || H < 0)
    throw std::invalid_argument("moe_ops: permute needs E >= 1, block_m >= 1, k >= 0");
  const Stream stream = detail::to_stream(stream_handle);
  const long long P = T * static_cast<long long>(k) + static_cast<long long>(E) * (block_m - 1);
  detail::build_slot_index(ids, T, k, E, block_m, workspace, expert_offsets, sorted_slots, slot_rows, stream);
  detail::gather_rows(x, x_sorted, P, H * static_cast<long long>(elem_bytes), sorted_slots, k > 0 ? k : 1, stream);
}

void unpermute(const void* y, DType dtype, int64_t P, int64_t H, const int* slot_rows, const void* weights, int64_t T,
               int k, void* out, StreamHandle stream) {
  kern::CombineSource src{slot_rows, nullptr, nullptr, 0, 0, static_cast<long long>(P)};
  detail::combine(y, dtype, H, src, weights, T, k, out, detail::to_stream(stream));
}

}  // namespace launchers
}  // namespace moe_ops
