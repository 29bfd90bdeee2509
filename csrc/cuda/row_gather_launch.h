// Launch side of the row gather (csrc/kernels/row_gather.cuh), shared by the permute and
// capacity_dispatch launchers: picks the widest word (16/8/4/2/1 bytes) that divides the row
// length and both base pointers' alignment, so every row moves in the fewest transactions.
#pragma once

#include "launch_config.h"
#include "../kernels/row_gather.cuh"

namespace moe_ops {
namespace launchers {
namespace detail {

inline void gather_rows(const void* src, void* dst, long long nrows, long long row_bytes, const int* map, int div,
                        Stream stream) {
  using namespace kern;
  if (nrows <= 0 || row_bytes <= 0) return;
  const uintptr_t bits =
      reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(row_bytes);
  const dim3 grid(grid_for(nrows, kGatherWarpsPerBlock)), block(32 * kGatherWarpsPerBlock);
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  if ((bits & 15u) == 0) launch(gather_rows_kernel<uint4>, grid, block, 0, stream, s, d, nrows, row_bytes, map, div);
  else if ((bits & 7u) == 0)
    launch(gather_rows_kernel<uint2>, grid, block, 0, stream, s, d, nrows, row_bytes, map, div);
  else if ((bits & 3u) == 0)
    launch(gather_rows_kernel<unsigned int>, grid, block, 0, stream, s, d, nrows, row_bytes, map, div);
  else if ((bits & 1u) == 0)
    launch(gather_rows_kernel<unsigned short>, grid, block, 0, stream, s, d, nrows, row_bytes, map, div);
  else launch(gather_rows_kernel<unsigned char>, grid, block, 0, stream, s, d, nrows, row_bytes, map, div);
}

}  // namespace detail
}  // namespace launchers
}  // namespace moe_ops
