// Kernels that exercise the SIMT emulator itself (tests/test_sim_emulator.py, op namespace
// moe_ops_simtest). Plain CUDA over raw pointers: they compile with nvcc too.
//
//   block_sum        shared-memory tree reduction, one partial sum per block (__syncthreads)
//   warp_ops         every warp intrinsic, one output row of results per thread
//   early_exit       threads with a negative input return at once; the rest keep meeting in
//                    __syncthreads / __syncthreads_count / warp intrinsics over __activemask()
//   histogram        int atomics on a __shared__ histogram, then on the global one
//   block_reverse    reverses each block's slice through dynamic shared memory
//   thread_coords    writes (threadIdx, blockIdx, blockDim, gridDim) of each thread of a 3-D grid
//   block_ticket     the order in which the blocks of a grid ran (MOE_OPS_SIM_BLOCK_ORDER)
#pragma once

#include "kernels/portable.cuh"  // csrc/ is on the include path (csrc/sim/CMakeLists.txt)

namespace moe_ops {
namespace simtest {

template <int kThreads>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, long long n) {
  __shared__ float partial[kThreads];
  const int t = threadIdx.x;
  float v = 0.0f;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + t; i < n;
       i += static_cast<long long>(kThreads) * gridDim.x)
    v += x[i];
  partial[t] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (t < w) partial[t] += partial[t + w];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

// Per thread (row of kWarpOpsCols ints): xor-butterfly sum, inclusive shfl_up scan, shfl_down by
// 3 (own value at the top), broadcast from lane x%32, ballot of odd x, any(x<0), all(x>=0),
// __reduce_add_sync, __reduce_max_sync, __match_any_sync of x%4, 64-bit shfl of (x<<32|lane),
// width-8 segmented xor sum.
constexpr int kWarpOpsCols = 12;

__global__ void warp_ops_kernel(const int* __restrict__ x, int* __restrict__ out) {
  const int tid = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const unsigned full = 0xffffffffu;
  const int v = x[tid];
  int* o = out + static_cast<long long>(tid) * kWarpOpsCols;

  int s = v;
  for (int m = 16; m > 0; m >>= 1) s += __shfl_xor_sync(full, s, m);
  o[0] = s;

  int scan = v;
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(full, scan, d);
    if (lane >= d) scan += u;
  }
  o[1] = scan;

  o[2] = __shfl_down_sync(full, v, 3);
  o[3] = __shfl_sync(full, v, ((v % 32) + 32) % 32);
  o[4] = static_cast<int>(__ballot_sync(full, v & 1));
  o[5] = __any_sync(full, v < 0);
  o[6] = __all_sync(full, v >= 0);
  o[7] = __reduce_add_sync(full, v);
  o[8] = __reduce_max_sync(full, v);
  o[9] = static_cast<int>(__match_any_sync(full, ((v % 4) + 4) % 4));
  const unsigned long long wide = (static_cast<unsigned long long>(static_cast<unsigned>(v)) << 32) | lane;
  const unsigned long long got = __shfl_sync(full, wide, 31 - lane);
  o[10] = static_cast<int>(got >> 32) + static_cast<int>(got & 0xffffffffu);
  float seg = static_cast<float>(v);
  for (int m = 4; m > 0; m >>= 1) seg += __shfl_xor_sync(full, seg, m, 8);
  o[11] = static_cast<int>(seg);
}

// Threads whose x is negative return after the first barrier. The survivors: (a) count
// themselves with __syncthreads_count, (b) sum their x through shared memory over several
// __syncthreads, (c) take a warp sum over __activemask(). Results: out[2*block + {0,1}] (written
// by thread 0 if it survives) and out_lane[tid] = warp sum * 64 + surviving lanes.
template <int kThreads>
__global__ void early_exit_kernel(const int* __restrict__ x, int* __restrict__ out, int* __restrict__ out_lane) {
  __shared__ int vals[kThreads];
  const int t = threadIdx.x;
  const int tid = blockIdx.x * kThreads + t;
  const int v = x[tid];
  vals[t] = 0;
  __syncthreads();
  if (v < 0) return;
  const int alive = __syncthreads_count(1);
  vals[t] = v;
  __syncthreads();
  if (t == 0) {
    int s = 0;
    for (int i = 0; i < kThreads; ++i) s += vals[i];
    out[2 * blockIdx.x] = alive;
    out[2 * blockIdx.x + 1] = s;
  }
  // Sum over the lanes still running, by a shuffle from each (the mask leaves out the returned ones).
  const unsigned active = __activemask();
  int total = 0;
  for (int l = 0; l < 32; ++l)
    if (active >> l & 1u) total += __shfl_sync(active, v, l);
  out_lane[tid] = total * 64 + __popc(active);
}

// Block-local histogram in shared memory with atomics, merged into the global one with atomics.
// ids outside [0, nbins) are dropped, as every moe_ops kernel drops invalid ids.
__global__ void histogram_kernel(const int* __restrict__ ids, long long n, int* __restrict__ hist, int nbins) {
  MOE_DYNAMIC_SMEM(int, local);
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const int e = ids[i];
    if (e >= 0 && e < nbins) atomicAdd(&local[e], 1);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
    const int c = local[b];
    if (c) atomicAdd(&hist[b], c);
  }
}

// out[block*n_per + i] = x[block*n_per + n_per-1-i], through dynamic shared memory.
__global__ void block_reverse_kernel(const float* __restrict__ x, float* __restrict__ out, int n_per) {
  MOE_DYNAMIC_SMEM(float, buf);
  const long long base = static_cast<long long>(blockIdx.x) * n_per;
  for (int i = threadIdx.x; i < n_per; i += blockDim.x) buf[i] = x[base + i];
  __syncthreads();
  for (int i = threadIdx.x; i < n_per; i += blockDim.x) out[base + i] = buf[n_per - 1 - i];
}

// Each thread writes its 12 coordinates at its global linear index.
__global__ void thread_coords_kernel(int* __restrict__ out) {
  const long long block = (static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  int* o = out + (block * nthreads + t) * 12;
  const unsigned coords[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                               blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = static_cast<int>(coords[i]);
}

// out[block] = how many blocks ran before it: a ticket taken from a global counter. Depends on
// the block order on purpose (the emulator runs blocks one at a time, so tickets are exact).
__global__ void block_ticket_kernel(int* __restrict__ counter, int* __restrict__ out) {
  if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(counter, 1);
}

// A kernel that misuses a warp intrinsic (reads a lane that returned): the emulator must raise.
__global__ void bad_shuffle_kernel(int* __restrict__ out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 5);
}

// A kernel that deadlocks on a GPU: thread 0 waits in __syncwarp for lane 1, which waits in
// __syncthreads for thread 0. The emulator must detect it and raise instead of hanging.
__global__ void deadlock_kernel(int* __restrict__ out) {
  if (threadIdx.x == 0) __syncwarp(0x3u);
  else __syncthreads();
  out[threadIdx.x] = 1;
}

// A kernel that throws through __trap().
__global__ void trap_kernel(int* __restrict__ out, int bad_thread) {
  if (static_cast<int>(threadIdx.x) == bad_thread) __trap();
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace simtest
}  // namespace moe_ops
