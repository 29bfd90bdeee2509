// expert_rank: deterministic "how many earlier slots went to my expert" -- the index math shared
// by permute (slot order s = t*k + j) and capacity_dispatch (kmajor (j, t) or token_major order).
//
// Dataflow (no CUB, no atomics, so every result is a pure function of the ids):
//   sequence q = 0..N-1 of expert ids (RankSeq maps q to a slot), cut into chunks of `chunk`
//   1. rank_count_kernel  (one warp per chunk, walking it 32 slots at a time in order):
//        peers = lanes with the same expert (a ballot per id bit), rank in tile = popc(lower
//        peers); the warp's private row counts[c][:] carries the running count per expert, so
//        local_rank[q] = count of earlier same-expert slots inside the chunk.
//   2. rank_scan_kernel   (one block): per expert, exclusive scan of counts[:, e] over chunks
//        (in place: counts[c][e] becomes chunk c's base), totals -> expert_count[e]; optional
//        kept[e] = min(count, C); optional block_m-padded exclusive scan -> offsets[E+1].
//   3. the op's placement kernel: rank(q) = counts[q / chunk][e] + local_rank[q].
// Invalid ids (outside [0, E)) are skipped everywhere.
#pragma once

#include "device_math.cuh"

namespace moe_ops {
namespace kern {

// The order in which slots are ranked. kmajor: q = j*T + t; otherwise q = s = t*k + j.
struct RankSeq {
  const int* ids;  // [T, k]
  long long T;
  int k;
  int kmajor;
  __device__ __forceinline__ long long slot(long long q) const {
    if (!kmajor) return q;
    const long long j = q / T;
    return (q - j * T) * k + j;
  }
};

constexpr int kRankWarpsPerBlock = 4;
constexpr int kRankScanThreads = 256;

// counts: [nchunks, E] (written fully here; no zero-init needed), local_rank: [N].
static __global__ void rank_count_kernel(RankSeq seq, long long N, int E, int ebits, int chunk, int nchunks,
                                         int* counts, int* local_rank) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int c = static_cast<int>(blockIdx.x) * kRankWarpsPerBlock + (static_cast<int>(threadIdx.x) >> 5);
  if (c >= nchunks) return;  // whole warp
  int* crow = counts + static_cast<long long>(c) * E;
  for (int e = lane; e < E; e += 32) crow[e] = 0;
  __syncwarp();
  const long long beg = static_cast<long long>(c) * chunk;
  const long long end = beg + chunk < N ? beg + chunk : N;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (long long base = beg; base < end; base += 32) {
    const long long q = base + lane;
    int e = -1;
    if (q < end) {
      const int v = seq.ids[seq.slot(q)];
      if (v >= 0 && v < E) e = v;
    }
    unsigned peers = __ballot_sync(kFullMask, e >= 0);
    for (int b = 0; b < ebits; ++b) {
      const int bit = (e >> b) & 1;
      const unsigned bal = __ballot_sync(kFullMask, bit);
      peers &= bit ? bal : ~bal;
    }
    const int running = e >= 0 ? crow[e] : 0;
    __syncwarp();  // every lane has read the running count before the leader moves it on
    if (e >= 0) {
      const unsigned lower = peers & lower_lanes;
      local_rank[q] = running + __popc(lower);
      if (lower == 0) crow[e] = running + __popc(peers);
    }
    __syncwarp();
  }
}

// One block of kRankScanThreads. Thread i owns experts [i*per, (i+1)*per).
static __global__ void rank_scan_kernel(int* counts, int nchunks, int E, int block_m, int* expert_count, int* kept,
                                        int capacity, int* offsets) {
  __shared__ int s_warp[kRankScanThreads / 32];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int per = (E + kRankScanThreads - 1) / kRankScanThreads;
  const int e0 = tid * per < E ? tid * per : E;
  const int e1 = e0 + per < E ? e0 + per : E;
  int local = 0;
  for (int e = e0; e < e1; ++e) {
    int run = 0;
    for (int c = 0; c < nchunks; ++c) {
      const long long idx = static_cast<long long>(c) * E + e;
      const int v = counts[idx];
      counts[idx] = run;
      run += v;
    }
    expert_count[e] = run;
    if (kept != nullptr) kept[e] = run < capacity ? run : capacity;
    local += (run + block_m - 1) / block_m * block_m;
  }
  if (offsets == nullptr) return;  // uniform across the block
  const int incl = warp_inclusive_scan(local, lane);
  if (lane == 31) s_warp[warp] = incl;
  __syncthreads();
  int base = incl - local;
  for (int w = 0; w < warp; ++w) base += s_warp[w];
  for (int e = e0; e < e1; ++e) {
    offsets[e] = base;
    base += (expert_count[e] + block_m - 1) / block_m * block_m;
  }
  if (tid == kRankScanThreads - 1) offsets[E] = base;
}

static __global__ void fill_i32_kernel(int* p, long long n, int value) {
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = value;
}

// Host-side plan shared by the launchers and their workspace size functions: chunks of at least
// 256 slots, and few enough that counts[nchunks, E] stays <= 1M ints (the scan is one block).
struct RankPlan {
  int chunk;
  int nchunks;
  int ebits;
};

inline RankPlan make_rank_plan(long long N, int E) {
  const long long max_cells = 1ll << 20;
  long long max_chunks = max_cells / (E > 0 ? E : 1);
  if (max_chunks < 1) max_chunks = 1;
  long long chunk = 256;
  if ((N + chunk - 1) / chunk > max_chunks) chunk = ((N + max_chunks - 1) / max_chunks + 31) / 32 * 32;
  RankPlan p;
  p.chunk = static_cast<int>(chunk);
  p.nchunks = static_cast<int>((N + chunk - 1) / chunk);
  int bits = 0;
  while (bits < 31 && (1ll << bits) < E) ++bits;
  p.ebits = bits;
  return p;
}

}  // namespace kern
}  // namespace moe_ops
