// Launchers for unpermute and capacity_combine (kernel: csrc/kernels/unpermute.cuh): warp per
// token; 16-byte vectors when H is a multiple of the vector width and y/out are 16-byte aligned.
#include "common_launch.h"
#include "../kernels/unpermute.cuh"

namespace moe_ops {
namespace launchers {

namespace detail {

void combine(const void* y, DType dtype, int64_t H, const kern::CombineSource& src, const void* weights,
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
    const auto* wp = static_cast<const typename CombineAcc<E>::type*>(weights);
    if (H % VEC == 0 && is_aligned16(yp) && is_aligned16(op))
      launch(combine_kernel<E, VEC>, grid, block, combine_smem_bytes(k), stream, yp, static_cast<long long>(H), src, wp,
             static_cast<long long>(T), k, op);
    else
      launch(combine_kernel<E, 1>, grid, block, combine_smem_bytes(k), stream, yp, static_cast<long long>(H), src, wp,
             static_cast<long long>(T), k, op);
  });
}

}  // namespace detail

void unpermute(const void* y, DType dtype, int64_t P, int64_t H, const int* slot_rows, const void* weights,
               int64_t T, int k, void* out, StreamHandle stream) {
  kern::CombineSource src{slot_rows, nullptr, nullptr, 0, 0, static_cast<long long>(P)};
  detail::combine(y, dtype, H, src, weights, T, k, out, detail::to_stream(stream));
}

void capacity_combine(const void* buf, DType dtype, int E, int C, int64_t H, const int* ids, const int* slot_pos,
                      const void* weights, int64_t T, int k, void* out, StreamHandle stream) {
  kern::CombineSource src{nullptr, ids, slot_pos, E, C, static_cast<long long>(E) * C};
  detail::combine(buf, dtype, H, src, weights, T, k, out, detail::to_stream(stream));
}

}  // namespace launchers
}  // namespace moe_ops
