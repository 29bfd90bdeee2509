// grouped_gemm_simt: the CUDA-core grouped GEMM -- every dtype, any shape and alignment. The
// float32 path of the op contract (IEEE FMA in float32, no TF32), float64, and the fallback of
// the tensor-core kernel (grouped_gemm_mma.cuh) for bf16/fp16 shapes it does not take.
//
// Dataflow of grouped_gemm_simt_kernel (persistent, over the schedule of grouped_gemm_schedule.cuh):
//   work item w -> (m tile of expert e, n tile); rows [row0, min(row0 + 64, offs[e+1])) of A
//   (gathered: row a_rows[r] / a_row_div), columns [n0, n0 + 64) of B[e] (and the same columns
//   + N, the "up" half, when gated)
//   -> per 16-deep k step: A and B tiles in shared memory as the accumulator type (loads
//      coalesced along whichever of the operand's dims is contiguous), 256 threads x 4x4 outputs
//      (rows ty + 16i, columns tx + 16j: conflict-free shared reads, coalesced stores)
//   -> epilogue: act(gate) * up (gated), * row_scale[c row] (weighted), cast, store to row
//      c_rows[r] (scatter) or r.
// Every output is one chain of FMAs over k = 0..K-1 in order: bitwise deterministic, and
// independent of the grid size and of which block ran the tile.
// grouped_gemm_wgrad_kernel: db[e] = A[rows e]^T @ dC[rows e], items (e, k tile, n tile), the
// reduction over the expert's rows in row order; experts with no rows get zeros.
#pragma once

#include "grouped_gemm.cuh"

namespace moe_ops {
namespace kern {

constexpr int kSimtBM = 64, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

// The 4x4 (per operand half) register tile of thread (tx, ty) over one BK step.
template <typename Acc, int NB>
__device__ __forceinline__ void simt_step(const Acc (*sA)[kSimtBM], const Acc (*sB)[kSimtBK][kSimtBN], int tx, int ty,
                                          Acc (&acc)[NB][4][4]) {
  MOE_UNROLL
  for (int kk = 0; kk < kSimtBK; ++kk) {
    Acc av[4];
    MOE_UNROLL
    for (int i = 0; i < 4; ++i) av[i] = sA[kk][ty + 16 * i];
    MOE_UNROLL
    for (int g = 0; g < NB; ++g) {
      MOE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const Acc bv = sB[g][kk][tx + 16 * j];
        MOE_UNROLL
        for (int i = 0; i < 4; ++i) acc[g][i][j] = fma_acc(av[i], bv, acc[g][i][j]);
      }
    }
  }
}

// Fills a BK x 64 shared tile s[kk][x] = value(kk, x) (0 outside), 4 elements per thread; with
// x_contig the 64 threads of a row run along x (coalesced when x is the contiguous dim), else 16
// threads run along kk.
template <typename Acc, typename F>
__device__ __forceinline__ void fill_tile(Acc (*s)[kSimtBN], bool x_contig, F value) {
  const int tid = static_cast<int>(threadIdx.x);
  MOE_UNROLL
  for (int j = 0; j < 4; ++j) {
    const int idx = tid + kSimtThreads * j;
    const int kk = x_contig ? idx / kSimtBN : idx % kSimtBK;
    const int x = x_contig ? idx % kSimtBN : idx / kSimtBK;
    s[kk][x] = value(kk, x);
  }
}

template <typename T, bool GATED>
__global__ void grouped_gemm_simt_kernel(GroupedGemmParams p) {
  using Acc = typename AccType<T>::type;
  constexpr int NB = GATED ? 2 : 1;
  __shared__ Acc sA[kSimtBK][kSimtBM];
  __shared__ Acc sB[NB][kSimtBK][kSimtBN];
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const long long total = p.tiles[p.E] * ((p.N + kSimtBN - 1) / kSimtBN);
  const bool b_k_contig = p.b_sk == 1 && p.b_sn != 1;
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const GemmItem it = gemm_item(p, w, kSimtBM, kSimtBN);
    const long long row0 = it.row0, row_end = it.row_end, n0 = it.n0;
    const long long b_e = static_cast<long long>(it.e) * p.b_expert;
    Acc acc[NB][4][4];
    MOE_UNROLL
    for (int g = 0; g < NB; ++g) MOE_UNROLL
    for (int i = 0; i < 4; ++i) MOE_UNROLL
    for (int j = 0; j < 4; ++j) acc[g][i][j] = Acc(0);
    for (long long k0 = 0; k0 < p.K; k0 += kSimtBK) {
      fill_tile<Acc>(sA, false, [&](int kk, int m) {
        const long long r = row0 + m, k = k0 + kk;
        if (r >= row_end || k >= p.K) return Acc(0);
        const long long ar = p.a_rows != nullptr ? p.a_rows[r] / p.a_row_div : r;
        return load_acc<T>(p.a, ar * p.lda + k);
      });
      MOE_UNROLL
      for (int g = 0; g < NB; ++g)
        fill_tile<Acc>(sB[g], !b_k_contig, [&](int kk, int n) {
          const long long col = n0 + n, k = k0 + kk;
          if (col >= p.N || k >= p.K) return Acc(0);
          return load_acc<T>(p.b, b_e + k * p.b_sk + (col + g * p.N) * p.b_sn);
        });
      __syncthreads();
      simt_step<Acc, NB>(sA, sB, tx, ty, acc);
      __syncthreads();  // the next step overwrites the tiles
    }
    MOE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const long long r = row0 + ty + 16 * i;
      if (r >= row_end) continue;
      const OutRow<T> o = out_row<T>(p, r);
      MOE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const long long col = n0 + tx + 16 * j;
        if (col < p.N) store_out<T, GATED>(p, o, col, acc[0][i][j], acc[NB - 1][i][j]);
      }
    }
  }
}

// db[E, K, N]; a[M, K], dc[M, N] row-major, rows of expert e = [offs[e], offs[e+1]).
template <typename T>
__global__ void grouped_gemm_wgrad_kernel(const T* a, const T* dc, const int* offs, int E, long long K, long long N,
                                          T* db) {
  using Acc = typename AccType<T>::type;
  __shared__ Acc sA[kSimtBK][kSimtBM];
  __shared__ Acc sB[1][kSimtBK][kSimtBN];
  const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
  const long long total = wgrad_items(E, K, N, kSimtBM, kSimtBN);
  for (long long w = blockIdx.x; w < total; w += gridDim.x) {
    const WgradItem it = wgrad_item(w, K, N, kSimtBM, kSimtBN);
    const int e = it.e;
    const long long kd0 = it.kd0, n0 = it.n0, r_begin = offs[e], r_end = offs[e + 1];
    Acc acc[1][4][4];
    MOE_UNROLL
    for (int i = 0; i < 4; ++i) MOE_UNROLL
    for (int j = 0; j < 4; ++j) acc[0][i][j] = Acc(0);
    for (long long r0 = r_begin; r0 < r_end; r0 += kSimtBK) {
      fill_tile<Acc>(sA, true, [&](int kk, int m) {
        const long long r = r0 + kk, kd = kd0 + m;
        return r < r_end && kd < K ? to_acc<Acc>(a[r * K + kd]) : Acc(0);
      });
      fill_tile<Acc>(sB[0], true, [&](int kk, int n) {
        const long long r = r0 + kk, col = n0 + n;
        return r < r_end && col < N ? to_acc<Acc>(dc[r * N + col]) : Acc(0);
      });
      __syncthreads();
      simt_step<Acc, 1>(sA, sB, tx, ty, acc);
      __syncthreads();
    }
    T* out = db + static_cast<long long>(e) * K * N;
    MOE_UNROLL
    for (int i = 0; i < 4; ++i) {
      const long long kd = kd0 + ty + 16 * i;
      if (kd >= K) continue;
      MOE_UNROLL
      for (int j = 0; j < 4; ++j) {
        const long long col = n0 + tx + 16 * j;
        if (col < N) out[kd * N + col] = from_acc<T>(acc[0][i][j]);
      }
    }
  }
}

}  // namespace kern
}  // namespace moe_ops
