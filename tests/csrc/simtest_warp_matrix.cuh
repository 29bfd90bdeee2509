// Kernels that expose each warp matrix / async-copy primitive of csrc/kernels/mma.cuh on its own
// (tests/test_sim_emulator.py, op namespace moe_ops_simtest). They carry no fragment layout of
// their own: registers and addresses go in and out raw, and the test writes the PTX ISA's
// lane -> element maps in Python, so a layout error cannot hide in both the model and the test.
//
//   ldmatrix_kernel      one warp: 8*kNum rows placed at shuffled 48-byte slots of dynamic shared
//                        memory; lane l gives the slot of row l (lanes past 8*kNum give a
//                        misaligned address, which ldmatrix must ignore); dumps the registers
//   mma_kernel           one warp per block: registers in, mma_m16n8k16<T>, registers out
//   cp_async_kernel      cp.async zero-fill, commit/wait groups, uncommitted and abandoned copies;
//                        two snapshots of the block's dynamic shared memory
//   warp_matrix_misuse_kernel   misuses the emulator must raise on
#pragma once

#include "kernels/mma.cuh"  // csrc/ is on the include path (csrc/sim/CMakeLists.txt)

namespace moe_ops {
namespace simtest {

constexpr int kLdmatrixSlot = 24;  // halfs per row slot: 48 bytes, 16-byte aligned, not contiguous

template <int kNum, bool kTrans>
__global__ void ldmatrix_kernel(const uint16_t* __restrict__ src, const int* __restrict__ slot,
                                uint32_t* __restrict__ out) {
  MOE_DYNAMIC_SMEM(uint16_t, smem);
  constexpr int kRows = 8 * kNum;
  const int lane = threadIdx.x;
  for (int i = lane; i < kRows * 8; i += 32) smem[slot[i / 8] * kLdmatrixSlot + i % 8] = src[i];
  __syncthreads();
  const uint16_t* row = lane < kRows ? smem + slot[lane] * kLdmatrixSlot : smem + 1;
  uint32_t r[4] = {0, 0, 0, 0};
  if constexpr (kNum == 1) {
    if constexpr (kTrans) warp::ldmatrix_x1_trans(r[0], row);
    else warp::ldmatrix_x1(r[0], row);
  } else if constexpr (kNum == 2) {
    if constexpr (kTrans) warp::ldmatrix_x2_trans(r[0], r[1], row);
    else warp::ldmatrix_x2(r[0], r[1], row);
  } else {
    if constexpr (kTrans) warp::ldmatrix_x4_trans(r[0], r[1], r[2], r[3], row);
    else warp::ldmatrix_x4(r[0], r[1], r[2], r[3], row);
  }
  for (int j = 0; j < kNum; ++j) out[lane * kNum + j] = r[j];
}

// Block w, lane l: a[(w*32+l)*4 ..], b[(w*32+l)*2 ..], c and d [(w*32+l)*4 ..].
template <class T>
__global__ void mma_kernel(const uint32_t* __restrict__ a, const uint32_t* __restrict__ b, const float* __restrict__ c,
                           float* __restrict__ d) {
  const long long i = static_cast<long long>(blockIdx.x) * 32 + threadIdx.x;
  const uint32_t ra[4] = {a[i * 4], a[i * 4 + 1], a[i * 4 + 2], a[i * 4 + 3]};
  const uint32_t rb[2] = {b[i * 2], b[i * 2 + 1]};
  const float rc[4] = {c[i * 4], c[i * 4 + 1], c[i * 4 + 2], c[i * 4 + 3]};
  float rd[4];
  warp::mma_m16n8k16<T>(rd, ra, rb, rc);
  for (int j = 0; j < 4; ++j) d[i * 4 + j] = rd[j];
}

// Shared memory of a block: kCpRegions regions of 32 threads x 16 bytes; thread t copies region r's
// chunk t from src[block][r][t][16]. Region 0 with src-size sizes[t] (zero-filled past it), regions
// 0+1 in group 0, 2 in group 1, 3 in group 2; wait<1> -> snapshot 0 (region 3 still pending);
// region 4 issued uncommitted; wait<0> -> snapshot 1 (region 4 still pending); then region 4 is
// committed and the thread returns without waiting: the copy must be dropped, not land in the next
// block (whose first wait<0> would perform it). out: [block][snapshot][kCpRegions*32*16] bytes.
constexpr int kCpRegions = 5;
constexpr int kCpBlockBytes = kCpRegions * 32 * 16;

__global__ void cp_async_kernel(const unsigned char* __restrict__ src, const int* __restrict__ sizes,
                                unsigned char* __restrict__ out) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const int t = threadIdx.x;
  const long long b = blockIdx.x;
  auto dst = [&](int r) { return smem + (r * 32 + t) * 16; };
  auto from = [&](int r) { return src + b * kCpBlockBytes + (r * 32 + t) * 16; };
  auto snapshot = [&](int s) {
    for (int i = t; i < kCpBlockBytes; i += 32) out[(b * 2 + s) * kCpBlockBytes + i] = smem[i];
  };
  warp::cp_async_wait<0>();
  __syncthreads();
  warp::cp_async_16(dst(0), from(0), sizes[t]);
  warp::cp_async_16(dst(1), from(1));
  warp::cp_async_commit();
  warp::cp_async_16(dst(2), from(2));
  warp::cp_async_commit();
  warp::cp_async_16(dst(3), from(3));
  warp::cp_async_commit();
  warp::cp_async_wait<1>();
  __syncthreads();
  snapshot(0);
  __syncthreads();  // the next wait writes what other threads have just read
  warp::cp_async_16(dst(4), from(4));
  warp::cp_async_wait<0>();
  __syncthreads();
  snapshot(1);
  warp::cp_async_commit();
}

// The 8- and 4-byte forms: thread t copies src[t*8 .. +8) with src-size sizes8[t] to smem[t*8],
// and src[256 + t*4 .. +4) with src-size sizes4[t] to smem[256 + t*4], in one group; after
// wait<0> the 384 bytes of shared memory go to out.
__global__ void cp_async_small_kernel(const unsigned char* __restrict__ src, const int* __restrict__ sizes8,
                                      const int* __restrict__ sizes4, unsigned char* __restrict__ out) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const int t = threadIdx.x;
  warp::cp_async_8(smem + t * 8, src + t * 8, sizes8[t]);
  warp::cp_async_4(smem + 256 + t * 4, src + 256 + t * 4, sizes4[t]);
  warp::cp_async_commit();
  warp::cp_async_wait<0>();
  __syncthreads();
  for (int i = t; i < 384; i += 32) out[i] = smem[i];
}

enum class WarpMatrixMisuse : int {
  kLdmatrixLaneReturned = 0,
  kLdmatrixMisaligned,
  kLdmatrixDivergent,
  kMmaLaneReturned,
  kCpAsyncBadSize,
  kCpAsyncMisaligned,
  kLdmatrixPlain,  // correct; raises only when launched with a partial warp
};

// One block of `blockDim.x` threads (48 makes a partial second warp for the full-warp check).
__global__ void warp_matrix_misuse_kernel(int what, int* __restrict__ out) {
  __shared__ __align__(16) uint16_t tile[32 * 8];
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < 32 * 8; i += blockDim.x) tile[i] = static_cast<uint16_t>(i + 1);
  __syncthreads();
  uint32_t r[4] = {0, 0, 0, 0};
  const uint16_t* row = tile + 8 * lane;
  switch (static_cast<WarpMatrixMisuse>(what)) {
    case WarpMatrixMisuse::kLdmatrixLaneReturned:
      if (lane == 5) return;
      warp::ldmatrix_x4(r[0], r[1], r[2], r[3], row);
      break;
    case WarpMatrixMisuse::kLdmatrixMisaligned:
      warp::ldmatrix_x4(r[0], r[1], r[2], r[3], lane == 3 ? row + 2 : row);
      break;
    case WarpMatrixMisuse::kLdmatrixDivergent:
      if (lane < 16) warp::ldmatrix_x4(r[0], r[1], r[2], r[3], row);
      else warp::ldmatrix_x2(r[0], r[1], row);
      break;
    case WarpMatrixMisuse::kMmaLaneReturned: {
      if (lane == 31) return;
      const uint32_t a[4] = {1, 2, 3, 4}, b[2] = {5, 6};
      const float c[4] = {1, 2, 3, 4};
      float d[4];
      warp::mma_m16n8k16<__nv_bfloat16>(d, a, b, c);
      r[0] = static_cast<uint32_t>(d[0]);
      break;
    }
    case WarpMatrixMisuse::kCpAsyncBadSize: warp::cp_async_16(tile, out, 17); break;
    case WarpMatrixMisuse::kCpAsyncMisaligned: warp::cp_async_16(tile + 4, out, 16); break;
    case WarpMatrixMisuse::kLdmatrixPlain: warp::ldmatrix_x4(r[0], r[1], r[2], r[3], row); break;
  }
  out[threadIdx.x] = static_cast<int>(r[0]);
}

}  // namespace simtest
}  // namespace moe_ops
