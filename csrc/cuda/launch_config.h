// Launch configuration shared by the torch-free launchers (csrc/cuda/*.cu): stream conversion,
// dtype dispatch to the kernel element type, grid sizing, workspace alignment. Included only by
// .cu files and the *_launch.h helpers (it pulls in the kernel vocabulary through launch.cuh).
#pragma once

#include <stdexcept>
#include <string>

#include "../kernels/launch.cuh"
#include "../kernels/device_math.cuh"
#include "launcher_api.h"

namespace moe_ops {
namespace launchers {
namespace detail {

inline Stream to_stream(StreamHandle s) { return static_cast<Stream>(s); }

inline unsigned grid_for(long long items, long long per_block) {
  const long long g = (items + per_block - 1) / per_block;
  if (g > 0x7fffffffll) throw std::invalid_argument("moe_ops: grid too large");
  return static_cast<unsigned>(g);
}

// Grid-stride kernels: enough blocks to fill a GPU, never more than the work.
inline unsigned grid_stride_blocks(long long items, int threads) {
  const long long g = (items + threads - 1) / threads;
  return static_cast<unsigned>(g < 4096 ? g : 4096);
}

// Calls f(T{}) with T the kernel element type of `d`.
template <typename F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat64: f(double{}); break;
    default: throw std::invalid_argument("moe_ops: unsupported dtype");
  }
}

inline size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
