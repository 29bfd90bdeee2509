// Launchers of the capacity family: capacity_dispatch (kernels: csrc/kernels/capacity.cuh,
// expert_rank.cuh, row_gather.cuh) and capacity_combine (row_combine.cuh, the combine unpermute
// shares, reading rows ids*C + slot_pos).
#include "expert_rank_launch.h"
#include "row_combine_launch.h"
#include "row_gather_launch.h"
#include "../kernels/capacity.cuh"

namespace moe_ops {
namespace launchers {

size_t capacity_workspace_bytes(int64_t T, int k, int E, int C) {
  return detail::rank_workspace_bytes(T * static_cast<int64_t>(k), E) +
         detail::align_up(static_cast<size_t>(E) * static_cast<size_t>(C) * 4, 256);
}

void capacity_dispatch(const void* x, size_t elem_bytes, int64_t T, int64_t H, const int* ids, int k, int E, int C,
                       bool kmajor, void* buf, int* slot_pos, int* demand, int* kept, void* workspace,
                       StreamHandle stream_handle) {
  using namespace kern;
  if (E < 1 || C < 0 || k < 0 || T < 0 || H < 0)
    throw std::invalid_argument("moe_ops: capacity_dispatch needs E >= 1, C >= 0, k >= 0");
  const Stream stream = detail::to_stream(stream_handle);
  const long long N = T * static_cast<long long>(k);
  const RankPlan plan = make_rank_plan(N, E);
  const detail::RankWorkspace ws = detail::carve_rank_workspace(workspace, N, E);
  int* src_slot = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) + detail::rank_workspace_bytes(N, E));
  const long long rows = static_cast<long long>(E) * C;
  const RankSeq seq{ids, T, k, kmajor ? 1 : 0};
  detail::rank_experts(seq, N, E, 1, plan, ws.counts, ws.local_rank, demand, kept, C, nullptr, stream);
  detail::fill_i32(src_slot, rows, -1, stream);
  launch(capacity_place_kernel, dim3(detail::grid_stride_blocks(N, 256)), dim3(256), 0, stream, seq, N, E, C,
         plan.chunk, static_cast<const int*>(ws.counts), static_cast<const int*>(ws.local_rank), slot_pos, src_slot);
  detail::gather_rows(x, buf, rows, H * static_cast<long long>(elem_bytes), src_slot, k > 0 ? k : 1, stream);
}

void capacity_combine(const void* buf, DType dtype, int E, int C, int64_t H, const int* ids, const int* slot_pos,
                      const void* weights, int64_t T, int k, void* out, StreamHandle stream) {
  kern::CombineSource src{nullptr, ids, slot_pos, E, C, static_cast<long long>(E) * C};
  detail::combine(buf, dtype, H, src, weights, T, k, out, detail::to_stream(stream));
}

}  // namespace launchers
}  // namespace moe_ops
