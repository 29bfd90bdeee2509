// Launchers of the grouped GEMMs (kernels: csrc/kernels/grouped_gemm_{schedule,simt}.cuh).
//
// grouped_gemm = 3 launches whatever E is: the one-block schedule (sanitised offsets, tile
// starts), the zero fill of rows outside every expert, and one persistent GEMM whose grid is
// bounded by the GPU's size and by an upper bound of the tile count known on the host
// (ceil(M / BM) + min(E, M): each non-empty expert adds at most one partial tile), so no host
// sync is needed to size it.
//
// fused_experts (the fused layer's expert stage) = slot index (3 launches, slot_index_launch.h)
// -> GEMM1 (schedule, x rows gathered on load, SwiGLU/GeGLU in the epilogue) -> GEMM2 (same
// schedule, * router weight, rows scattered to slot order) -> k-sum (combine_kernel over slot
// order, j = 0..k-1): 7 launches whatever E is, no float atomics, no host sync.
#include "grouped_gemm_launch.h"
#include "row_combine_launch.h"
#include "slot_index_launch.h"

namespace moe_ops {
namespace launchers {

size_t grouped_gemm_workspace_bytes(int E) { return detail::gemm_schedule_bytes(E); }

void grouped_gemm(const void* a, DType dtype, int64_t M, int64_t K, const void* b, int E, int64_t N, bool trans_b,
                  const int* offsets, void* c, void* workspace, StreamHandle stream_handle) {
  if (E < 1 || M < 0 || K < 0 || N < 0) throw std::invalid_argument("moe_ops: grouped_gemm needs E >= 1, M, K, N >= 0");
  const Stream stream = detail::to_stream(stream_handle);
  if (M == 0 || N == 0) return;
  const detail::GemmSchedule sched = detail::build_gemm_schedule(offsets, E, M, workspace, stream);
  detail::zero_outside_rows(dtype, sched.offs, E, M, N, c, stream);
  // a[M,K] rows as they are; B(e, k, n) = b[e][k][n], or b[e][n][k] when trans_b
  const kern::GroupedGemmParams p{
      a,          K,           nullptr, 1, b, K * N, trans_b ? 1 : N, trans_b ? K : 1, c, N, nullptr, nullptr,
      sched.offs, sched.tiles, E,       M, N, K,     kern::kActNone};
  detail::run_grouped_gemm(dtype, p, stream);
}

void grouped_gemm_wgrad(const void* a, const void* dc, DType dtype, int64_t M, int64_t K, int64_t N, const int* offsets,
                        int E, void* db, void* workspace, StreamHandle stream_handle) {
  if (E < 0 || M < 0 || K < 0 || N < 0) throw std::invalid_argument("moe_ops: grouped_gemm_wgrad needs sizes >= 0");
  const Stream stream = detail::to_stream(stream_handle);
  if (E == 0 || K == 0 || N == 0) return;
  const detail::GemmSchedule sched = detail::build_gemm_schedule(offsets, E, M, workspace, stream);
  if (detail::use_mma_wgrad(dtype, a, dc, K, N)) {
    const dim3 grid(detail::persistent_blocks(kern::wgrad_items(E, K, N, kern::kMmaBM, kern::kMmaBN))),
        block(kern::kMmaThreads);
    auto go = [&](auto tag) {
      using T = decltype(tag);
      launch(kern::grouped_gemm_wgrad_mma_kernel<T>, grid, block, kern::mma_smem_bytes(false), stream,
             static_cast<const T*>(a), static_cast<const T*>(dc), static_cast<const int*>(sched.offs), E,
             static_cast<long long>(K), static_cast<long long>(N), static_cast<T*>(db));
    };
    if (dtype == DType::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
    return;
  }
  const dim3 grid(detail::persistent_blocks(kern::wgrad_items(E, K, N, kern::kSimtBM, kern::kSimtBN))),
      block(kern::kSimtThreads);
  detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(kern::grouped_gemm_wgrad_kernel<T>, grid, block, 0, stream, static_cast<const T*>(a),
           static_cast<const T*>(dc), static_cast<const int*>(sched.offs), E, static_cast<long long>(K),
           static_cast<long long>(N), static_cast<T*>(db));
  });
}

namespace {

// The fused stage's scratch, carved in this order from one byte workspace.
struct FusedLayout {
  size_t rank, offsets, sorted_slots, slot_rows, sched, h, y, total;
  FusedLayout(int64_t T, int k, int E, int64_t H, int64_t I, DType dtype) {
    const size_t N = static_cast<size_t>(T) * k, es = dtype_size(dtype);
    rank = 0;
    offsets = rank + detail::align_up(detail::rank_workspace_bytes(static_cast<long long>(N), E), 256);
    sorted_slots = offsets + detail::align_up(static_cast<size_t>(E + 1) * 4, 256);
    slot_rows = sorted_slots + detail::align_up(N * 4, 256);
    sched = slot_rows + detail::align_up(N * 4, 256);
    h = sched + detail::align_up(detail::gemm_schedule_bytes(E), 256);
    y = h + detail::align_up(N * static_cast<size_t>(I) * es, 256);
    total = y + detail::align_up(N * static_cast<size_t>(H) * es, 256);
  }
};

}  // namespace

size_t fused_experts_workspace_bytes(int64_t T, int k, int E, int64_t H, int64_t I, DType dtype) {
  return FusedLayout(T, k, E, H, I, dtype).total;
}

void fused_experts(const void* x, DType dtype, int64_t T, int64_t H, const int* ids, int k, const void* weights,
                   const void* w_gate_up, const void* w_down, int E, int64_t I, int act, void* out, void* workspace,
                   StreamHandle stream_handle) {
  if (E < 1 || k < 1 || T < 0 || H < 0 || I < 0 || (act != kern::kActSwiGLU && act != kern::kActGeGLU))
    throw std::invalid_argument("moe_ops: fused_experts needs E, k >= 1, sizes >= 0, act SwiGLU or GeGLU");
  const Stream stream = detail::to_stream(stream_handle);
  if (T == 0 || H == 0) return;
  const FusedLayout L(T, k, E, H, I, dtype);
  auto* ws = static_cast<unsigned char*>(workspace);
  int* offsets = reinterpret_cast<int*>(ws + L.offsets);
  int* sorted_slots = reinterpret_cast<int*>(ws + L.sorted_slots);
  int* slot_rows = reinterpret_cast<int*>(ws + L.slot_rows);
  void* h = ws + L.h;
  void* y = ws + L.y;
  const long long N = T * static_cast<long long>(k);
  detail::build_slot_index(ids, T, k, E, 1, ws + L.rank, offsets, sorted_slots, slot_rows, stream);
  const detail::GemmSchedule sched = detail::build_gemm_schedule(offsets, E, N, ws + L.sched, stream);
  // GEMM1: x rows gathered by slot (row sorted_slots[r] / k), B(e, k, n) = w_gate_up[e][n][k] with the
  // up half N = I rows further, gated -> h[r] (sorted order)
  const kern::GroupedGemmParams g1{x,       H,       sorted_slots, k,           w_gate_up, 2 * I * H, 1, H, h,  I,
                                   nullptr, nullptr, sched.offs,   sched.tiles, E,         N,         I, H, act};
  detail::run_grouped_gemm(dtype, g1, stream);
  // GEMM2: h rows, B(e, k, n) = w_down[e][n][k], * weights[slot] -> y[sorted_slots[r]] (slot order)
  const kern::GroupedGemmParams g2{h, I, nullptr,       1,       w_down,     H * I,       1, I,
                                   y, H, sorted_slots,  weights, sched.offs, sched.tiles, E, N,
                                   H, I, kern::kActNone};
  detail::run_grouped_gemm(dtype, g2, stream);
  kern::CombineSource src{slot_rows, nullptr, nullptr, 0, 0, N, true};
  detail::combine(y, dtype, H, src, nullptr, T, k, out, stream);
}

}  // namespace launchers
}  // namespace moe_ops
