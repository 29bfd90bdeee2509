// Host helpers of the grouped GEMM launchers, shared by grouped_gemm.cu (the ops) and the fused
// layer's launcher: workspace layout of the tile schedule, its build, the persistent grid size,
// the zero fill of rows outside every expert, and the kernel choice for one problem.
#pragma once

#include "launch_config.h"
#include "../env.h"
#include "../kernels/grouped_gemm_mma.cuh"
#include "../kernels/grouped_gemm_simt.cuh"

namespace moe_ops {
namespace launchers {
namespace detail {

struct GemmSchedule {
  int* offs;         // [E+1] sanitised offsets
  long long* tiles;  // [E+1] first BM-row tile of each expert; tiles[E] = total
};

inline size_t gemm_schedule_bytes(int E) {
  return align_up(static_cast<size_t>(E + 1) * 4, 256) + align_up(static_cast<size_t>(E + 1) * 8, 256);
}

inline GemmSchedule build_gemm_schedule(const int* offsets, int E, long long M, void* ws, Stream stream) {
  auto* bytes = static_cast<unsigned char*>(ws);
  GemmSchedule s;
  s.offs = reinterpret_cast<int*>(bytes);
  s.tiles = reinterpret_cast<long long*>(bytes + align_up(static_cast<size_t>(E + 1) * 4, 256));
  launch(kern::gemm_schedule_kernel, dim3(1), dim3(kern::kSchedThreads), 0, stream, offsets, E, M, kern::kSimtBM,
         s.offs, s.tiles);
  return s;
}

// Blocks of a persistent kernel: a few per SM, never more than the work. The emulator runs
// blocks one after another, so there a small grid (each block then walks several items, which
// the tests want exercised) costs nothing.
inline unsigned persistent_blocks(long long items) {
#if defined(__CUDACC__)
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    sms = 108;
  const long long cap = 4ll * sms;
#else
  const long long cap = 3;
#endif
  return static_cast<unsigned>(items < cap ? (items > 0 ? items : 1) : cap);
}

inline void zero_outside_rows(DType dtype, const int* offs, int E, long long M, long long N, void* c, Stream stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(kern::zero_outside_rows_kernel<T>, dim3(grid_stride_blocks(M * N, 256)), dim3(256), 0, stream, offs, E, M, N,
           static_cast<T*>(c));
  });
}

// Whether the tensor-core kernel takes this problem: bf16/fp16 on an sm_80+ device, every row
// it copies 16-byte aligned (cp.async moves whole 16-byte chunks; zero-fill only at chunk
// granularity). MOE_OPS_CUDA_GEMM=simt sends everything to the CUDA-core kernel.
inline bool mma_allowed(DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  const char* choice = env::get("CUDA_GEMM");
  if (choice != nullptr && std::string(choice) == "simt") return false;
#if defined(__CUDACC__)
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 8)
    return false;
#endif
  return true;
}

// The wgrad reads rows of a[M, K] and dc[M, N] in 16-byte chunks.
inline bool use_mma_wgrad(DType dtype, const void* a, const void* dc, long long K, long long N) {
  return mma_allowed(dtype) && K % 8 == 0 && N % 8 == 0 && kern::is_aligned16(a) && kern::is_aligned16(dc);
}

inline bool use_mma(DType dtype, const kern::GroupedGemmParams& p) {
  if (!mma_allowed(dtype)) return false;
  const bool b_kmajor = p.b_sn == 1;
  if (b_kmajor && p.act != kern::kActNone) return false;  // no caller; not instantiated
  const long long b_row = b_kmajor ? p.b_sk : p.b_sn;
  return p.K % 8 == 0 && p.lda % 8 == 0 && b_row % 8 == 0 && p.b_expert % 8 == 0 && (!b_kmajor || p.N % 8 == 0) &&
         (b_kmajor || p.b_sk == 1) && kern::is_aligned16(p.a) && kern::is_aligned16(p.b);
}

// One grouped GEMM over a built schedule (p.offs, p.tiles set); gated when p.act != 0.
inline void run_grouped_gemm(DType dtype, const kern::GroupedGemmParams& p, Stream stream) {
  static_assert(kern::kMmaBM == kern::kSimtBM, "one schedule serves both kernels");
  const long long tiles_bound = (p.M + kern::kSimtBM - 1) / kern::kSimtBM + (p.E < p.M ? p.E : p.M);
  const bool gated = p.act != kern::kActNone;
  if (use_mma(dtype, p)) {
    const long long items = tiles_bound * ((p.N + kern::kMmaBN - 1) / kern::kMmaBN);
    const dim3 grid(persistent_blocks(items)), block(kern::kMmaThreads);
    const size_t smem = kern::mma_smem_bytes(gated);
    auto go = [&](auto tag) {
      using T = decltype(tag);
      if (p.b_sn == 1) {  // k-major B: the grouped_gemm op (trans_b=False), never gated
        launch(kern::grouped_gemm_mma_kernel<T, false, true>, grid, block, smem, stream, p);
      } else {
        if (gated) launch(kern::grouped_gemm_mma_kernel<T, true, false>, grid, block, smem, stream, p);
        else launch(kern::grouped_gemm_mma_kernel<T, false, false>, grid, block, smem, stream, p);
      }
    };
    if (dtype == DType::kBFloat16) go(__nv_bfloat16{});
    else go(__half{});
    return;
  }
  const long long items = tiles_bound * ((p.N + kern::kSimtBN - 1) / kern::kSimtBN);
  const dim3 grid(persistent_blocks(items)), block(kern::kSimtThreads);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.act != kern::kActNone) launch(kern::grouped_gemm_simt_kernel<T, true>, grid, block, 0, stream, p);
    else launch(kern::grouped_gemm_simt_kernel<T, false>, grid, block, 0, stream, p);
  });
}

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
