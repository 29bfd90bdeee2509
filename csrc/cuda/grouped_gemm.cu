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
  kern::GroupedGemmParams p{};
  p.a = a;
  p.lda = K;
  p.a_row_div = 1;
  p.b = b;
  p.b_expert = K * N;
  p.b_sk = trans_b ? 1 : N;
  p.b_sn = trans_b ? K : 1;
  p.c = c;
  p.ldc = N;
  p.offs = sched.offs;
  p.tiles = sched.tiles;
  p.E = E;
  p.M = M;
  p.N = N;
  p.K = K;
  p.act = kern::kActNone;
  detail::run_grouped_gemm(dtype, p, stream);
}

void grouped_gemm_wgrad(const void* a, const void* dc, DType dtype, int64_t M, int64_t K, int64_t N, const int* offsets,
                        int E, void* db, void* workspace, StreamHandle stream_handle) {
  if (E < 0 || M < 0 || K < 0 || N < 0) throw std::invalid_argument("moe_ops: grouped_gemm_wgrad needs sizes >= 0");
  const Stream stream = detail::to_stream(stream_handle);
  if (E == 0 || K == 0 || N == 0) return;
  const detail::GemmSchedule sched = detail::build_gemm_schedule(offsets, E, M, workspace, stream);
  const long long items =
      static_cast<long long>(E) * ((K + kern::kSimtBM - 1) / kern::kSimtBM) * ((N + kern::kSimtBN - 1) / kern::kSimtBN);
  if (detail::use_mma_wgrad(dtype, a, dc, K, N)) {
    const long long mma_items =
        static_cast<long long>(E) * ((K + kern::kMmaBM - 1) / kern::kMmaBM) * ((N + kern::kMmaBN - 1) / kern::kMmaBN);
    const dim3 grid(detail::persistent_blocks(mma_items)), block(kern::kMmaThreads);
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
  const dim3 grid(detail::persistent_blocks(items)), block(kern::kSimtThreads);
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
  kern::GroupedGemmParams g1{};
  g1.a = x;
  g1.lda = H;
  g1.a_rows = sorted_slots;
  g1.a_row_div = k;
  g1.b = w_gate_up;
  g1.b_expert = 2 * I * H;
  g1.b_sk = 1;
  g1.b_sn = H;
  g1.c = h;
  g1.ldc = I;
  g1.offs = sched.offs;
  g1.tiles = sched.tiles;
  g1.E = E;
  g1.M = N;
  g1.N = I;
  g1.K = H;
  g1.act = act;
  detail::run_grouped_gemm(dtype, g1, stream);
  kern::GroupedGemmParams g2 = g1;
  g2.a = h;
  g2.lda = I;
  g2.a_rows = nullptr;
  g2.a_row_div = 1;
  g2.b = w_down;
  g2.b_expert = H * I;
  g2.b_sn = I;
  g2.c = y;
  g2.ldc = H;
  g2.c_rows = sorted_slots;
  g2.row_scale = weights;
  g2.N = H;
  g2.K = I;
  g2.act = kern::kActNone;
  detail::run_grouped_gemm(dtype, g2, stream);
  kern::CombineSource src{slot_rows, nullptr, nullptr, 0, 0, N, true};
  detail::combine(y, dtype, H, src, nullptr, T, k, out, stream);
}

}  // namespace launchers
}  // namespace moe_ops
