// grouped_gemm_mma: the tensor-core grouped GEMM for bf16/fp16 (f32 accumulation), sm_80+.
// Same problem and schedule as the CUDA-core kernel (grouped_gemm.cuh, grouped_gemm_schedule.cuh);
// the launcher sends it the shapes whose rows are 16-byte aligned (K % 8 == 0, and N % 8 == 0
// when B is k-major), everything else to grouped_gemm_simt.cuh.
//
// Dataflow of one work item (persistent loop, 128 threads = 4 warps in 2 x 2, 64 x 64 outputs):
//   A rows (gathered: a_rows[r] / a_row_div) and the B tile (gate, + up half when gated) stream
//   global -> shared by cp.async, 16 bytes a thread a copy, zero-filled past the expert's rows,
//   past K and past N, in a kStages-deep ring (commit / wait_group kStages - 2 keeps
//   kStages - 1 k tiles in flight while one is multiplied);
//   shared -> registers by ldmatrix (A: x4 per 16 x 16; B: x4 per two n8 tiles, .trans when B
//   is k-major), 16-byte chunks XOR-swizzled by row so the 8 rows an ldmatrix reads sit in 8
//   different bank groups;
//   mma.sync m16n8k16 into f32 fragments (each warp 32 x 32: 2 m16 x 4 n8 tiles, twice when gated);
//   epilogue on the fragments: act(gate) * up, * row_scale[c row], cast, store to C row
//   c_rows[r] or r.
// Each output's k order is fixed by the kernel (k tiles in order, mma's internal order within 16),
// independent of grid size and block: bitwise deterministic.
// grouped_gemm_wgrad_mma_kernel: the same ring and warp step with a's rows as a k-major A
// (ldmatrix .trans), items (expert, 64 x 64 of db[e]), the reduction over the expert's rows.
#pragma once

#include "grouped_gemm.cuh"
#include "mma.cuh"

namespace moe_ops {
namespace kern {

constexpr int kMmaBM = 64, kMmaBN = 64, kMmaBK = 32, kMmaThreads = 128, kMmaStages = 3;
static_assert(kMmaBM == 64, "the tensor-core kernel walks the same 64-row schedule as the CUDA-core one");

// Shared bytes of one launch: kMmaStages x (A tile + NB B tiles), 2-byte elements.
// (The wgrad kernel's two 32 x 64 tiles take the same bytes as one ungated stage.)
__host__ __device__ constexpr size_t mma_smem_bytes(bool gated) {
  return static_cast<size_t>(kMmaStages) * (kMmaBM * kMmaBK + (gated ? 2 : 1) * kMmaBN * kMmaBK) * 2;
}

// Row-major tiles of 16-byte chunks. A and n-major B: rows of BK = 32 elements = 4 chunks, chunk
// c of row r at r * 4 + (c ^ ((r >> 1) & 3)) (rows r and r + 1 share a 128-byte line). k-major B:
// rows of `chunks` (8 per 64 columns), chunk c at r * chunks + (c ^ (r & 7)).
__device__ __forceinline__ int swz_k(int r, int c) { return r * 4 + (c ^ ((r >> 1) & 3)); }
__device__ __forceinline__ int swz_n(int r, int c, int chunks) { return r * chunks + (c ^ (r & 7)); }

// One BK = 32 step of a warp's 32 x 32 (x NB) outputs from the stage's shared tiles. A is stored
// m-major ([m][k], swz_k) or k-major ([k][m], 8 chunks a row: the wgrad's a^T); B n-major
// ([n][k], NB x 64 rows, swz_k) or k-major ([k][n], 8 * NB chunks a row).
template <typename T, int NB, bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void mma_warp_step(const uint4* sA, const uint4* sB, int warp_m, int warp_n, int lane,
                                              float (&acc)[NB][2][4][4]) {
  MOE_UNROLL
  for (int ks = 0; ks < kMmaBK / 16; ++ks) {
    uint32_t af[2][4];
    MOE_UNROLL
    for (int i = 0; i < 2; ++i) {
      if constexpr (A_KMAJOR) {  // matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
        const int r = ks * 16 + ((lane >> 4) << 3) + (lane & 7), c = (warp_m * 32 + i * 16) / 8 + ((lane >> 3) & 1);
        warp::ldmatrix_x4_trans(af[i][0], af[i][1], af[i][2], af[i][3], sA + swz_n(r, c, 8));
      } else {
        const int r = warp_m * 32 + i * 16 + (lane & 15);
        warp::ldmatrix_x4(af[i][0], af[i][1], af[i][2], af[i][3], sA + swz_k(r, ks * 2 + (lane >> 4)));
      }
    }
    MOE_UNROLL
    for (int g = 0; g < NB; ++g) {
      uint32_t bf[4][2];
      MOE_UNROLL
      for (int j = 0; j < 4; j += 2) {  // two n8 tiles per ldmatrix_x4
        const int nloc = warp_n * 32 + j * 8;
        if constexpr (B_KMAJOR) {
          const int r = ks * 16 + (lane & 15), c = g * 8 + nloc / 8 + (lane >> 4);
          warp::ldmatrix_x4_trans(bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1], sB + swz_n(r, c, 8 * NB));
        } else {
          const int r = g * kMmaBN + nloc + ((lane >> 4) << 3) + (lane & 7), c = ks * 2 + ((lane >> 3) & 1);
          warp::ldmatrix_x4(bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1], sB + swz_k(r, c));
        }
      }
      MOE_UNROLL
      for (int i = 0; i < 2; ++i) MOE_UNROLL
      for (int j = 0; j < 4; ++j) warp::mma_m16n8k16<T>(acc[g][i][j], af[i], bf[j], acc[g][i][j]);
    }
  }
}

// The cp.async ring over `tiles` k tiles: load(stage, tile) issues one tile's copies, compute(stage)
// multiplies one. Every iteration commits one group (empty past the last tile), so
// wait_group kMmaStages - 2 always means "tile kt has landed". Ends with the ring drained and
// the block synchronised, so the caller may reuse the shared memory.
template <typename Load, typename Compute>
__device__ __forceinline__ void mma_pipeline(long long tiles, Load load, Compute compute) {
  MOE_UNROLL
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < tiles) load(s, static_cast<long long>(s));
    warp::cp_async_commit();
  }
  for (long long kt = 0; kt < tiles; ++kt) {
    warp::cp_async_wait<kMmaStages - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1's stage
    const long long next = kt + kMmaStages - 1;
    if (next < tiles) load(static_cast<int>(next % kMmaStages), next);
    warp::cp_async_commit();
    compute(static_cast<int>(kt % kMmaStages));
  }
  warp::cp_async_wait<0>();
  __syncthreads();
}

template <int NB>
__device__ __forceinline__ void zero_acc(float (&acc)[NB][2][4][4]) {
  MOE_UNROLL
  for (int g = 0; g < NB; ++g) MOE_UNROLL
  for (int i = 0; i < 2; ++i) MOE_UNROLL
  for (int j = 0; j < 4; ++j) MOE_UNROLL
  for (int v = 0; v < 4; ++v) acc[g][i][j][v] = 0.0f;
}

template <typename T, bool GATED, bool B_KMAJOR>
__global__ void grouped_gemm_mma_kernel(GroupedGemmParams p) {
  constexpr int NB = GATED ? 2 : 1;
  constexpr int kAChunks = kMmaBM * kMmaBK / 8;       // 256 16-byte chunks per A stage
  constexpr int kBChunks = NB * kMmaBN * kMmaBK / 8;  // 256 per B half
  constexpr int kStageChunks = kAChunks + kBChunks;
  MOE_DYNAMIC_SMEM(uint4, smem);  // kMmaStages x [A chunks | B chunks]
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const long long total = p.tiles[p.E] * ((p.N + kMmaBN - 1) / kMmaBN);
  const long long k_tiles = (p.K + kMmaBK - 1) / kMmaBK;
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const GemmItem it = gemm_item(p, w, kMmaBM, kMmaBN);
    const int e = it.e;
    const long long row0 = it.row0, row_end = it.row_end, n0 = it.n0;
    const T* b_e = b + static_cast<long long>(e) * p.b_expert;

    // This thread's copies per stage: A chunks tid + 128 i (row q / 4, k chunk q % 4); the
    // row's source is fixed for the whole work item, so the gather index is read once.
    const T* a_src[kAChunks / kMmaThreads];
    MOE_UNROLL
    for (int i = 0; i < kAChunks / kMmaThreads; ++i) {
      const long long r = row0 + (tid + kMmaThreads * i) / 4;
      const long long ar = r < row_end ? (p.a_rows != nullptr ? p.a_rows[r] / p.a_row_div : r) : -1;
      a_src[i] = ar >= 0 ? a + ar * p.lda : nullptr;
    }
    auto load_stage = [&](int stage, long long kt) {
      uint4* sA = smem + stage * kStageChunks;
      uint4* sB = sA + kAChunks;
      const long long k0 = kt * kMmaBK;
      MOE_UNROLL
      for (int i = 0; i < kAChunks / kMmaThreads; ++i) {
        const int q = tid + kMmaThreads * i, r = q / 4, c = q % 4;
        const long long k = k0 + c * 8;
        const bool ok = a_src[i] != nullptr && k < p.K;
        warp::cp_async_16(sA + swz_k(r, c), ok ? a_src[i] + k : a, ok ? 16 : 0);
      }
      MOE_UNROLL
      for (int i = 0; i < kBChunks / kMmaThreads; ++i) {
        const int q = tid + kMmaThreads * i;
        const T* src = b;
        bool ok;
        if constexpr (B_KMAJOR) {  // rows k, NB * 8 chunks of 8 columns: gate 0..7, up 8..15
          const int r = q / (8 * NB), c = q % (8 * NB);
          const long long col = n0 + (c % 8) * 8, k = k0 + r;
          ok = col < p.N && k < p.K;
          if (ok) src = b_e + k * p.b_sk + (col + (c / 8) * p.N) * p.b_sn;
          warp::cp_async_16(sB + swz_n(r, c, 8 * NB), src, ok ? 16 : 0);
        } else {  // rows n (gate 0..63, up 64..127), 4 chunks of 8 k
          const int r = q / 4, c = q % 4;
          const long long col = n0 + r % kMmaBN, k = k0 + c * 8;
          ok = col < p.N && k < p.K;
          if (ok) src = b_e + (col + (r / kMmaBN) * p.N) * p.b_sn + k * p.b_sk;
          warp::cp_async_16(sB + swz_k(r, c), src, ok ? 16 : 0);
        }
      }
    };

    float acc[NB][2][4][4];
    zero_acc<NB>(acc);
    mma_pipeline(k_tiles, load_stage, [&](int stage) {
      const uint4* sA = smem + stage * kStageChunks;
      mma_warp_step<T, NB, false, B_KMAJOR>(sA, sA + kAChunks, warp_m, warp_n, lane, acc);
    });

    // Fragment (i, j): rows lane / 4 and + 8 of m16 tile i, columns 2 * (lane % 4) + {0, 1} of n8 tile j.
    MOE_UNROLL
    for (int i = 0; i < 2; ++i) {
      MOE_UNROLL
      for (int h = 0; h < 2; ++h) {
        const long long r = row0 + warp_m * 32 + i * 16 + (lane >> 2) + h * 8;
        if (r >= row_end) continue;
        const OutRow<T> o = out_row<T>(p, r);
        MOE_UNROLL
        for (int j = 0; j < 4; ++j) {
          MOE_UNROLL
          for (int v = 0; v < 2; ++v) {
            const long long col = n0 + warp_n * 32 + j * 8 + 2 * (lane & 3) + v;
            if (col < p.N) store_out<T, GATED>(p, o, col, acc[0][i][j][h * 2 + v], acc[NB - 1][i][j][h * 2 + v]);
          }
        }
      }
    }
  }
}

// db[e] = a[rows e]^T @ dc[rows e] on tensor cores: items (e, 64 rows of K, 64 columns of N),
// reduced over the expert's rows 32 at a time in row order; a's rows are the k-major A
// ([r][kd], ldmatrix .trans), dc's the k-major B. Experts with no rows write zeros.
template <typename T>
__global__ void grouped_gemm_wgrad_mma_kernel(const T* a, const T* dc, const int* offs, int E, long long K, long long N,
                                              T* db) {
  constexpr int kAChunks = kMmaBK * kMmaBM / 8, kBChunks = kMmaBK * kMmaBN / 8;
  constexpr int kStageChunks = kAChunks + kBChunks;
  MOE_DYNAMIC_SMEM(uint4, smem);
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const long long total = wgrad_items(E, K, N, kMmaBM, kMmaBN);
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const WgradItem it = wgrad_item(w, K, N, kMmaBM, kMmaBN);
    const int e = it.e;
    const long long kd0 = it.kd0, n0 = it.n0, r_begin = offs[e], r_end = offs[e + 1];
    auto load_stage = [&](int stage, long long rt) {
      uint4* sA = smem + stage * kStageChunks;
      uint4* sB = sA + kAChunks;
      MOE_UNROLL
      for (int i = 0; i < kAChunks / kMmaThreads; ++i) {  // both tiles: 32 rows x 8 chunks
        const int q = tid + kMmaThreads * i, row = q / 8, c = q % 8;
        const long long r = r_begin + rt * kMmaBK + row, kd = kd0 + c * 8, n = n0 + c * 8;
        const bool ok_a = r < r_end && kd < K, ok_b = r < r_end && n < N;
        warp::cp_async_16(sA + swz_n(row, c, 8), ok_a ? a + r * K + kd : a, ok_a ? 16 : 0);
        warp::cp_async_16(sB + swz_n(row, c, 8), ok_b ? dc + r * N + n : dc, ok_b ? 16 : 0);
      }
    };
    float acc[1][2][4][4];
    zero_acc<1>(acc);
    mma_pipeline((r_end - r_begin + kMmaBK - 1) / kMmaBK, load_stage, [&](int stage) {
      const uint4* sA = smem + stage * kStageChunks;
      mma_warp_step<T, 1, true, true>(sA, sA + kAChunks, warp_m, warp_n, lane, acc);
    });
    T* out = db + static_cast<long long>(e) * K * N;
    MOE_UNROLL
    for (int i = 0; i < 2; ++i) MOE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const long long kd = kd0 + warp_m * 32 + i * 16 + (lane >> 2) + h * 8;
      if (kd >= K) continue;
      MOE_UNROLL
      for (int j = 0; j < 4; ++j) MOE_UNROLL
      for (int v = 0; v < 2; ++v) {
        const long long n = n0 + warp_n * 32 + j * 8 + 2 * (lane & 3) + v;
        if (n < N) out[kd * N + n] = from_f32<T>(acc[0][i][j][h * 2 + v]);
      }
    }
  }
}

}  // namespace kern
}  // namespace moe_ops
