// Portable kernel prelude: the one include every csrc/kernels/*.cuh starts with.
//
// Under nvcc (__CUDACC__) it is plain CUDA: cuda_runtime.h, cuda_fp16.h, cuda_bf16.h.
// Under the host C++ compiler with MOE_OPS_SIM defined it pulls in the SIMT host emulator
// (csrc/sim/sim.h), which supplies the same vocabulary -- __global__/__device__/__shared__,
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads, the warp intrinsics, int atomics, the
// fast-math intrinsics and the half/bfloat16 types (from the toolkit's own host code) -- so one
// kernel source runs on a GPU and, thread by thread, on the CPU under ASan/TSan.
//
// Kernel-side contract (see docs/sim.md):
//   * dynamic shared memory is declared with MOE_DYNAMIC_SMEM(T, name): `name` is a `T*`
//     to the launch's dynamic shared buffer (16-byte aligned);
//   * `#ifdef MOE_OPS_SIM` is how a kernel skips what the emulator cannot do (keep it rare);
//   * launches go through moe_ops::launch (csrc/kernels/launch.cuh), never `<<<>>>`.
#pragma once

#if defined(__CUDACC__)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// A byte array (not `extern __shared__ T name[]`) so kernels with different T can share a
// translation unit without nvcc's "incompatible redeclaration" of the extern array.
#define MOE_DYNAMIC_SMEM(T, name)                                        \
  extern __shared__ __align__(16) unsigned char moe_dynamic_smem_raw_[]; \
  T* name = reinterpret_cast<T*>(moe_dynamic_smem_raw_)

#elif defined(MOE_OPS_SIM)

#include "../sim/sim.h"

#define MOE_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::moe_sim::dynamic_smem())

#else
#error "csrc/kernels/*.cuh compile with nvcc, or with the host compiler and -DMOE_OPS_SIM"
#endif
