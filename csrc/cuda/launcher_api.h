// Torch-free host entry points of the moe_ops CUDA kernels: the API between the torch binding
// (ops_binding.h) and the launchers (csrc/cuda/<op family>.cu implement them).
//
// Plain pointers, sizes, a dtype enum and an opaque stream (a cudaStream_t under nvcc; nullptr
// in the SIMT emulator build, which compiles the very same .cu files as host C++ with
// -DMOE_OPS_SIM). Each function picks grid/block, launches through moe_ops::launch on `stream`
// and returns without synchronising. Arguments are assumed already validated (ops_binding.h);
// what would make a kernel misbehave is still rejected with std::invalid_argument.
// This header deliberately includes no CUDA or emulator header, so torch translation units can
// include it without the kernel vocabulary leaking into them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe_ops {
namespace launchers {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

using StreamHandle = void*;

// Largest E topk_gating handles (block path: 1024 threads x 16 values per thread).
constexpr int kGatingMaxExperts = 16384;
// Largest shared memory the group-limited path may ask for per block.
constexpr size_t kGatingMaxGroupSmem = 48 * 1024;
// Whether (E, n_group) fits the group-limited path's shared memory.
bool topk_gating_supported(int E, int n_group);

// logits[T,E] (float32/float16/bfloat16; computed in float32), bias[E] float32 or nullptr
// -> weights[T,k] f32, ids[T,k] i32.
// scoring: 0 = softmax, 1 = sigmoid. n_group = 0: not group-limited.
void topk_gating(const void* logits, DType dtype, const float* bias, int64_t T, int E, int k, int scoring,
                 bool renormalize, int n_group, int topk_group, float scaling_factor, float* weights, int* ids,
                 StreamHandle stream);

// Scratch (bytes) permute needs; the caller allocates it (uninitialised is fine).
size_t permute_workspace_bytes(int64_t T, int k, int E);
// x[T,H] (elem_bytes per element) and ids[T,k] -> x_sorted[P,H], sorted_slots[P], offsets[E+1],
// slot_rows[T*k]; P = T*k + E*(block_m-1).
void permute(const void* x, size_t elem_bytes, int64_t T, int64_t H, const int* ids, int k, int E, int block_m,
             void* x_sorted, int* sorted_slots, int* expert_offsets, int* slot_rows, void* workspace,
             StreamHandle stream);

// Largest k the row combine (unpermute, capacity_combine) takes: each block stages 4 warps x k
// (row, weight) pairs of 16 bytes in shared memory, 64 KiB at this k. unpermute's k is bounded
// further by limits::kMaxK (its slot_rows come from permute of top-k ids); capacity_combine's
// only by this.
constexpr int kCombineMaxK = 1024;

// y[P,H] (dtype), slot_rows[T*k], weights[T,k] or nullptr -> out[T,H] (dtype). weights (and the
// accumulator) are float32, float64 when dtype is float64.
void unpermute(const void* y, DType dtype, int64_t P, int64_t H, const int* slot_rows, const void* weights, int64_t T,
               int k, void* out, StreamHandle stream);

size_t capacity_workspace_bytes(int64_t T, int k, int E, int C);
// x[T,H], ids[T,k] -> buf[E,C,H], slot_pos[T,k], demand[E], kept[E]. kmajor: priority (j, t).
void capacity_dispatch(const void* x, size_t elem_bytes, int64_t T, int64_t H, const int* ids, int k, int E, int C,
                       bool kmajor, void* buf, int* slot_pos, int* demand, int* kept, void* workspace,
                       StreamHandle stream);

// buf[E,C,H] (dtype), ids[T,k], slot_pos[T,k], weights[T,k] or nullptr (as unpermute) -> out[T,H].
void capacity_combine(const void* buf, DType dtype, int E, int C, int64_t H, const int* ids, const int* slot_pos,
                      const void* weights, int64_t T, int k, void* out, StreamHandle stream);

// Scratch (bytes) the grouped GEMMs need for their device-built tile schedule (E + 1 sanitised
// offsets and E + 1 tile starts).
size_t grouped_gemm_workspace_bytes(int E);

// a[M,K], b[E,K,N] (or [E,N,K] when trans_b), offsets[E+1] -> c[M,N]; rows outside
// [offsets[0], offsets[E]) are 0. Offsets are read on the device, clamped to [0, M] and made
// non-decreasing (the CPU backend's reading), so no value can index out of bounds.
void grouped_gemm(const void* a, DType dtype, int64_t M, int64_t K, const void* b, int E, int64_t N, bool trans_b,
                  const int* offsets, void* c, void* workspace, StreamHandle stream);

// a[M,K], dc[M,N], offsets[E+1] -> db[E,K,N] = a[rows e]^T @ dc[rows e] (zeros for empty experts).
void grouped_gemm_wgrad(const void* a, const void* dc, DType dtype, int64_t M, int64_t K, int64_t N, const int* offsets,
                        int E, void* db, void* workspace, StreamHandle stream);

// The fused dropless expert stage (what moe_forward's `cuda` fused layer runs after the router):
// slot index -> GEMM1 gathering x rows + gated activation -> GEMM2 * router weight, scattered to
// slot order -> fixed-order k-sum. x[T,H], ids[T,k], weights[T,k] (accumulator type) or nullptr,
// w_gate_up[E,2I,H], w_down[E,H,I] (x's dtype) -> out[T,H]. act: 1 = SwiGLU, 2 = GeGLU.
size_t fused_experts_workspace_bytes(int64_t T, int k, int E, int64_t H, int64_t I, DType dtype);
void fused_experts(const void* x, DType dtype, int64_t T, int64_t H, const int* ids, int k, const void* weights,
                   const void* w_gate_up, const void* w_down, int E, int64_t I, int act, void* out, void* workspace,
                   StreamHandle stream);

}  // namespace launchers
}  // namespace moe_ops
