// Launch side of the weighted row combine (csrc/kernels/row_combine.cuh), shared by the
// unpermute (permute.cu) and capacity_combine (capacity.cu) launchers: warp per token; 16-byte
// vectors when H is a multiple of the vector width and y/out are 16-byte aligned, else scalar
// columns.
#pragma once

#include "launch_config.h"
#include "../kernels/row_combine.cuh"

namespace moe_ops {
namespace launchers {
namespace detail {

inline void combine(const void* y, DType dtype, int64_t H, const kern::CombineSource& src, const void* weights,
                    int64_t T, int k, void* out, Stream stream) {
  using namespace kern;
  if (k < 1) throw std::invalid_argument("moe_ops: combine needs k >= 1");
  if (T <= 0 || H <= 0) return;
  const dim3 grid(grid_for(T, kCombineWarpsPerBlock)), block(32 * kCombineWarpsPerBlock);
  dispatch_dtype(dtype, [&](auto tag) {
    using E = decltype(tag);
    constexpr int VEC = 16 / static_cast<int>(sizeof(E));
    const E* yp = static_cast<const E*>(y);
    E* op = static_cast<E*>(out);
    const auto* wp = static_cast<const typename AccType<E>::type*>(weights);
    if (H % VEC == 0 && is_aligned16(yp) && is_aligned16(op))
      launch(combine_kernel<E, VEC>, grid, block, combine_smem_bytes(k), stream, yp, static_cast<long long>(H), src, wp,
             static_cast<long long>(T), k, op);
    else
      launch(combine_kernel<E, 1>, grid, block, combine_smem_bytes(k), stream, yp, static_cast<long long>(H), src, wp,
             static_cast<long long>(T), k, op);
  });
}

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
