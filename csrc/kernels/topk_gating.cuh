// topk_gating: router scores + top-k selection, one fused pass per token row.
//
// Dataflow (one "team" per row: a warp for E <= 32*VPT, a whole block above that):
//   logits[row, :] --16-byte loads (scalar fallback)--> x[VPT] in registers (float32)
//   softmax: team max m, team sum s of exp(x - m)            (score = exp(x - m) / s)
//   sigmoid: score = 1 / (1 + exp(-x))
//   selection key = x (softmax without bias) or score + bias; ordered into uint32 (NaN lowest)
//   group-limited (n_group > 0): keys -> shared memory, group score = sum of top-min(2,G) keys,
//     a group is kept iff fewer than topk_group groups beat it; other experts' keys -> -inf
//   k rounds of team arg-max over packed (key, ~index) -- only the owner of the winner rescans
//   its VPT registers; lane j of warp 0 remembers round j's winner
//   lanes j < k reload logits[row, id_j], recompute the unbiased score, renormalise
//   (w / (sum + 1e-20)), scale, and write weights[row, j] (f32) / ids[row, j] (i32).
// Registers only hold x and the ordered keys; every register array is indexed with
// compile-time indices (unrolled loops) so nothing spills to local memory.
#pragma once

#include "device_math.cuh"

namespace moe_ops {
namespace kern {

enum GatingScoring : int { kScoreSoftmax = 0, kScoreSigmoid = 1 };

struct GatingParams {
  const void* logits;  // [T, E] of the kernel's element type
  const float* bias;   // [E] correction bias (selection only) or nullptr
  float* weights;      // [T, k]
  int* ids;            // [T, k]
  long long T;
  int E;
  int k;
  int scoring;
  int renormalize;
  int n_group;  // 0 = not group-limited
  int topk_group;
  float scaling;
};

// Shared memory one team needs for group-limited routing: keys[E] f32, gscore[n_group] f32,
// keep[n_group] u8 (rounded to 16 bytes so per-warp regions stay aligned).
__host__ __device__ inline size_t gating_group_smem_bytes(int E, int n_group) {
  if (n_group <= 0) return 0;
  const size_t b = static_cast<size_t>(E) * 4 + static_cast<size_t>(n_group) * 5;
  return (b + 15) & ~static_cast<size_t>(15);
}

constexpr int kGatingWarpsPerBlock = 4;

// A warp works on one row: synchronisation and reductions are warp-level.
struct WarpTeam {
  int tid;  // lane
  __device__ __forceinline__ int nthreads() const { return 32; }
  __device__ __forceinline__ void sync() const { __syncwarp(); }
  __device__ __forceinline__ unsigned long long max_u64(unsigned long long v) { return warp_max_u64(v); }
  __device__ __forceinline__ float max_f32(float v) { return warp_max_f32(v); }
  __device__ __forceinline__ float sum_f32(float v) { return warp_sum_f32(v); }
};

// A block works on one row: warp reductions, then the per-warp partials through shared memory,
// combined by every thread in the same fixed order (so all threads agree bitwise). Partials
// alternate between two buffers so a reduction never overwrites one still being read.
struct BlockTeam {
  int tid;
  int nthr;
  unsigned long long (*su)[32];
  float (*sf)[32];
  int phase;
  __device__ __forceinline__ int nthreads() const { return nthr; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ unsigned long long max_u64(unsigned long long v) {
    v = warp_max_u64(v);
    const int b = phase++ & 1;
    if ((tid & 31) == 0) su[b][tid >> 5] = v;
    __syncthreads();
    unsigned long long r = su[b][0];
    for (int w = 1; w < (nthr >> 5); ++w) r = su[b][w] > r ? su[b][w] : r;
    return r;
  }
  __device__ __forceinline__ float max_f32(float v) {
    v = warp_max_f32(v);
    const int b = phase++ & 1;
    if ((tid & 31) == 0) sf[b][tid >> 5] = v;
    __syncthreads();
    float r = sf[b][0];
    for (int w = 1; w < (nthr >> 5); ++w) r = fmaxf(r, sf[b][w]);
    return r;
  }
  __device__ __forceinline__ float sum_f32(float v) {
    v = warp_sum_f32(v);
    const int b = phase++ & 1;
    if ((tid & 31) == 0) sf[b][tid >> 5] = v;
    __syncthreads();
    float r = sf[b][0];
    for (int w = 1; w < (nthr >> 5); ++w) r += sf[b][w];
    return r;
  }
};

// The unbiased score of a logit: what the weights are made of.
__device__ __forceinline__ float gating_score(float x, int scoring, float m, float s) {
  if (scoring == kScoreSoftmax) return expf(x - m) / s;
  return 1.0f / (1.0f + expf(-x));
}

// Row worker. Element slot (c, v) of this thread holds expert index (c * nthreads + tid) * VEC + v.
template <typename T, int VPT, typename Team>
__device__ __forceinline__ void gating_row(const GatingParams& p, long long row, Team& team, float* grp) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  static_assert(VPT % VEC == 0, "VPT must be a multiple of the 16-byte vector width");
  constexpr int CH = VPT / VEC;
  const int E = p.E;
  const int tid = team.tid;
  const int nthr = team.nthreads();
  const T* rowp = static_cast<const T*>(p.logits) + row * static_cast<long long>(E);
  const bool vec_ok = is_aligned16(rowp);

  float x[VPT];
  MOE_UNROLL
  for (int c = 0; c < CH; ++c) {
    const int base = (c * nthr + tid) * VEC;
    if (vec_ok && base + VEC <= E) {
      T e[VEC];
      load16(rowp + base, e);
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) x[c * VEC + v] = to_f32(e[v]);
    } else {
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) x[c * VEC + v] = base + v < E ? to_f32(rowp[base + v]) : -INFINITY;
    }
  }

  // Softmax statistics over the whole row (padding slots hold -inf and are skipped in the sum).
  float m = 0.0f, s = 1.0f;
  if (p.scoring == kScoreSoftmax) {
    float lm = -INFINITY;
    MOE_UNROLL
    for (int i = 0; i < VPT; ++i) lm = fmaxf(lm, x[i]);
    m = team.max_f32(lm);
    float ls = 0.0f;
    MOE_UNROLL
    for (int c = 0; c < CH; ++c) {
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v)
        if ((c * nthr + tid) * VEC + v < E) ls += expf(x[c * VEC + v] - m);
    }
    s = team.sum_f32(ls);
  }

  // Selection keys.
  const bool key_is_logit = p.scoring == kScoreSoftmax && p.bias == nullptr;
  uint32_t ord[VPT];
  MOE_UNROLL
  for (int c = 0; c < CH; ++c) {
    MOE_UNROLL
    for (int v = 0; v < VEC; ++v) {
      const int i = (c * nthr + tid) * VEC + v;
      float key = x[c * VEC + v];
      if (!key_is_logit && i < E) {
        key = gating_score(key, p.scoring, m, s);
        if (p.bias != nullptr) key += p.bias[i];
      }
      ord[c * VEC + v] = i < E ? order_key(key) : kKeyTaken;
      if (grp != nullptr && i < E) grp[i] = key;
    }
  }

  // DeepSeek group-limited routing: rank groups by the sum of their top-2 keys.
  if (p.n_group > 0) {
    const int ng = p.n_group;
    const int G = E / ng;
    float* gscore = grp + E;
    unsigned char* keep = reinterpret_cast<unsigned char*>(gscore + ng);
    team.sync();
    for (int g = tid; g < ng; g += nthr) {
      unsigned long long b1 = 0, b2 = 0;
      for (int i = g * G; i < (g + 1) * G; ++i) {
        const unsigned long long pk = pack_key(order_key(grp[i]), static_cast<uint32_t>(i));
        if (pk > b1) {
          b2 = b1;
          b1 = pk;
        } else if (pk > b2) {
          b2 = pk;
        }
      }
      float sc = grp[packed_index(b1)];
      if (G >= 2) sc += grp[packed_index(b2)];
      gscore[g] = sc;
    }
    team.sync();
    for (int g = tid; g < ng; g += nthr) {
      const unsigned long long mine = pack_key(order_key(gscore[g]), static_cast<uint32_t>(g));
      int better = 0;
      for (int h = 0; h < ng; ++h) better += pack_key(order_key(gscore[h]), static_cast<uint32_t>(h)) > mine ? 1 : 0;
      keep[g] = better < p.topk_group ? 1 : 0;
    }
    team.sync();
    const uint32_t masked = order_key(-INFINITY);
    MOE_UNROLL
    for (int c = 0; c < CH; ++c) {
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) {
        const int i = (c * nthr + tid) * VEC + v;
        if (i < E && !keep[i / G]) ord[c * VEC + v] = masked;
      }
    }
  }

  // k rounds of arg-max. Packed keys are unique, so exactly one thread owns each winner.
  auto rescan = [&]() {
    unsigned long long b = 0;
    MOE_UNROLL
    for (int c = 0; c < CH; ++c) {
      MOE_UNROLL
      for (int v = 0; v < VEC; ++v) {
        const unsigned long long pk = pack_key(ord[c * VEC + v], static_cast<uint32_t>((c * nthr + tid) * VEC + v));
        b = pk > b ? pk : b;
      }
    }
    return b;
  };
  unsigned long long best = rescan();
  unsigned long long chosen = 0;
  for (int j = 0; j < p.k; ++j) {
    const unsigned long long win = team.max_u64(best);
    if (tid == j) chosen = win;
    if (best == win) {
      const uint32_t idx = packed_index(win);
      MOE_UNROLL
      for (int c = 0; c < CH; ++c) {
        MOE_UNROLL
        for (int v = 0; v < VEC; ++v)
          if (static_cast<uint32_t>((c * nthr + tid) * VEC + v) == idx) ord[c * VEC + v] = kKeyTaken;
      }
      best = rescan();
    }
  }

  // Lanes 0..k-1 of warp 0 turn their winner into a weight.
  if (tid < 32) {
    float w = 0.0f;
    int id = 0;
    if (tid < p.k) {
      id = static_cast<int>(packed_index(chosen));
      w = gating_score(to_f32(rowp[id]), p.scoring, m, s);
    }
    if (p.renormalize) {
      const float tot = warp_sum_f32(w);
      w = w / (tot + 1e-20f);
    }
    w *= p.scaling;
    if (tid < p.k) {
      const long long o = row * p.k + tid;
      p.weights[o] = w;
      p.ids[o] = id;
    }
  }
}

// Warp per row, kGatingWarpsPerBlock rows per block. Dynamic smem: one group region per warp.
template <typename T, int VPT>
__global__ void topk_gating_warp_kernel(GatingParams p) {
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const long long row = static_cast<long long>(blockIdx.x) * kGatingWarpsPerBlock + warp;
  if (row >= p.T) return;  // whole warp leaves together
  float* grp =
      p.n_group > 0 ? reinterpret_cast<float*>(smem + warp * gating_group_smem_bytes(p.E, p.n_group)) : nullptr;
  WarpTeam team{static_cast<int>(threadIdx.x) & 31};
  gating_row<T, VPT>(p, row, team, grp);
}

// Block per row (blockDim.x a multiple of 32, >= 32, <= 1024). Dynamic smem: one group region.
// The launch bound keeps ptxas at <= 64 registers so a 1024-thread block (E > 14336) fits the
// 64K-register file of an SM.
template <typename T, int VPT>
__global__ void __launch_bounds__(1024) topk_gating_block_kernel(GatingParams p) {
  __shared__ unsigned long long s_u[2][32];
  __shared__ float s_f[2][32];
  MOE_DYNAMIC_SMEM(unsigned char, smem);
  BlockTeam team{static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), s_u, s_f, 0};
  gating_row<T, VPT>(p, static_cast<long long>(blockIdx.x), team,
                     p.n_group > 0 ? reinterpret_cast<float*>(smem) : nullptr);
}

}  // namespace kern
}  // namespace moe_ops
