// grouped_gemm: the problem every CUDA grouped GEMM kernel solves, and the epilogue math they
// share, so the CUDA-core kernel (grouped_gemm_simt.cuh) and the tensor-core kernel
// (grouped_gemm_mma.cuh) cannot drift apart in what they compute.
//
// Dataflow of one problem: rows r of expert e (offs/tiles: grouped_gemm_schedule.cuh) ->
// A row a_rows[r] / a_row_div (gather-on-load, the fused layer's x rows) or r -> sum over k of
// A[., k] * B(e, k, n) in the accumulator type -> epilogue: act(gate) * up when gated (B has 2N
// columns: gate n, up N + n), times row_scale[C row] (the router weight, GEMM2 of the fused
// layer), cast to T -> C row c_rows[r] (the scatter to slot order) or r.
#pragma once

#include "device_math.cuh"
#include "grouped_gemm_schedule.cuh"

namespace moe_ops {
namespace kern {

enum GemmAct : int { kActNone = 0, kActSwiGLU = 1, kActGeGLU = 2 };

// One grouped GEMM problem: C[c_row(r), n] = epilogue(sum_k A[a_row(r), k] * B(e, k, n)) for
// the rows r of expert e (offs, tiles from gemm_schedule_kernel). With a gated activation B has
// 2N columns (gate n, up N + n) and C has N.
struct GroupedGemmParams {
  const void* a;
  long long lda;
  const int* a_rows;  // gather: nullptr, or A row = a_rows[r] / a_row_div
  int a_row_div;
  const void* b;
  long long b_expert, b_sk, b_sn;  // element strides: B(e, k, n) = b[e*b_expert + k*b_sk + n*b_sn]
  void* c;
  long long ldc;
  const int* c_rows;      // scatter: nullptr, or C row = c_rows[r]
  const void* row_scale;  // nullptr, or AccType<T>* indexed by the C row
  const int* offs;
  const long long* tiles;
  int E;
  long long M;
  long long N;
  long long K;
  int act;
};

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

__device__ __forceinline__ float gate_act(float g, int act) {
  return act == kActSwiGLU ? g / (1.0f + expf(-g)) : 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
}
__device__ __forceinline__ double gate_act(double g, int act) {
  return act == kActSwiGLU ? g / (1.0 + exp(-g)) : 0.5 * g * (1.0 + erf(g * 0.70710678118654752));
}

template <typename T>
__device__ __forceinline__ typename AccType<T>::type load_acc(const void* base, long long i) {
  return to_acc<typename AccType<T>::type>(static_cast<const T*>(base)[i]);
}

// Where row r's results go: C row c_rows[r] (or r), scaled by row_scale[C row] (or 1).
template <typename T>
struct OutRow {
  T* dst;
  typename AccType<T>::type scale;
};
template <typename T>
__device__ __forceinline__ OutRow<T> out_row(const GroupedGemmParams& p, long long r) {
  using Acc = typename AccType<T>::type;
  const long long cr = p.c_rows != nullptr ? p.c_rows[r] : r;
  return {static_cast<T*>(p.c) + cr * p.ldc,
          p.row_scale != nullptr ? static_cast<const Acc*>(p.row_scale)[cr] : Acc(1)};
}

// One output element of the row: act(gate) * up when gated, times the row's scale, cast, stored.
template <typename T, bool GATED>
__device__ __forceinline__ void store_out(const GroupedGemmParams& p, const OutRow<T>& o, long long col,
                                          typename AccType<T>::type gate, typename AccType<T>::type up) {
  typename AccType<T>::type v = gate;
  if constexpr (GATED) v = gate_act(v, p.act) * up;
  o.dst[col] = from_acc<T>(v * o.scale);
}

// The wgrad's work items: (expert e, a BM-row tile of db[e]'s K rows from kd0, a BN-column tile
// from n0), e slowest; wgrad_items(...) of them for E experts.
struct WgradItem {
  int e;
  long long kd0, n0;
};
__host__ __device__ inline long long wgrad_items(int E, long long K, long long N, int bm, int bn) {
  return static_cast<long long>(E) * ((K + bm - 1) / bm) * ((N + bn - 1) / bn);
}
__device__ __forceinline__ WgradItem wgrad_item(long long w, long long K, long long N, int bm, int bn) {
  const long long n_tiles = (N + bn - 1) / bn, per_e = (K + bm - 1) / bm * n_tiles;
  const long long rest = w % per_e;
  return {static_cast<int>(w / per_e), rest / n_tiles * bm, rest % n_tiles * bn};
}

// A forward work item w (of tiles[E] x n_tiles, BN-column tiles fastest so consecutive blocks
// share the A rows): expert e, its rows [row0, row_end) (at most BM of them) and columns from n0.
struct GemmItem {
  int e;
  long long row0, row_end, n0;
};
__device__ __forceinline__ GemmItem gemm_item(const GroupedGemmParams& p, long long w, int bm, int bn) {
  const long long n_tiles = (p.N + bn - 1) / bn, mt = w / n_tiles;
  const int e = find_tile_expert(p.tiles, p.E, mt);
  const long long row0 = p.offs[e] + (mt - p.tiles[e]) * bm;
  return {e, row0, p.offs[e + 1], (w - mt * n_tiles) * bn};
}

}  // namespace kern
}  // namespace moe_ops
