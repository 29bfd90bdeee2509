// The one kernel launch wrapper: the only place `<<<>>>` appears.
//
//   moe_ops::launch(kernel, grid, block, smem_bytes, stream, args...);
//
// nvcc: raises the kernel's dynamic shared memory limit when smem_bytes > 48 KiB, launches on
// `stream` and throws std::runtime_error if the launch failed (cudaGetLastError).
// MOE_OPS_SIM: runs the grid synchronously in the SIMT host emulator (csrc/sim); `stream` is
// ignored (a void*, pass nullptr). Kernel errors (a trap, a bad warp intrinsic, a deadlock)
// come back as std::runtime_error after every emulated thread has stopped.
// Both: a grid with no blocks returns at once (T = 0 is a valid input).
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "portable.cuh"

namespace moe_ops {

#if defined(__CUDACC__)

using Stream = cudaStream_t;

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream stream, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "moe_ops::launch: wrong number of kernel arguments");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (smem_bytes > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("moe_ops: cudaFuncSetAttribute(smem=") + std::to_string(smem_bytes) +
                               ") failed: " + cudaGetErrorString(e));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KArgs>(args)...);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("moe_ops: kernel launch failed: ") + cudaGetErrorString(e));
}

#else  // MOE_OPS_SIM

using Stream = void*;

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Stream /*stream*/, Args... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "moe_ops::launch: wrong number of kernel arguments");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  // Converted once, like CUDA's parameter buffer; every emulated thread then gets its own copy
  // of each parameter (std::apply copies into the by-value parameters), so a kernel may modify
  // its parameters as it can on a GPU.
  std::tuple<std::decay_t<KArgs>...> params(static_cast<KArgs>(args)...);
  struct Call {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...>* params;
  } call{kernel, &params};
  ::moe_sim::run_grid(
      grid, block, smem_bytes, reinterpret_cast<const void*>(kernel),
      [](void* p) {
        auto* c = static_cast<Call*>(p);
        std::apply(c->kernel, *c->params);
      },
      &call);
}

#endif

}  // namespace moe_ops
