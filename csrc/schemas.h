// The one definition of the moe_ops operator schemas.
//
// bindings.cpp defines them in the `moe_ops` namespace (CPU and CUDA kernels register
// implementations against them); the SIMT host emulator defines the same list in
// `moe_ops_sim`, and the Triton backend reads it through `moe_ops._C.op_schemas()` to define
// `moe_ops_triton`. Change a schema here and every backend sees the change.
//
// Conventions (see DESIGN.md for the semantics of each op):
//   * every op is functional (allocates its outputs); shapes depend only on input shapes and
//     the int/str arguments, never on tensor values (CUDA-graph / fullgraph friendly);
//   * optional group-limited routing is off when n_group == 0;
//   * ids are int32; expert ids outside [0, num_experts) are *dropped* by every kernel
//     (never an out-of-bounds access) -- the Python layer raises on them unless asked not to.
#pragma once

namespace moe_ops {

inline constexpr const char* kOpSchemas[] = {
    // logits[T,E] -> weights[T,k] f32, ids[T,k] i32
    "topk_gating(Tensor logits, int k, str scoring, bool renormalize, int n_group, "
    "int topk_group, Tensor? correction_bias, float scaling_factor) -> (Tensor, Tensor)",
    // x[T,H], ids[T,k] -> x_sorted[P,H], sorted_slots[P] i32, expert_offsets[E+1] i32,
    // slot_rows[T*k] i32 ; P = T*k + E*(block_m-1)
    "permute(Tensor x, Tensor ids, int num_experts, int block_m) -> (Tensor, Tensor, Tensor, Tensor)",
    // y_sorted[P,H], slot_rows[T*k], weights[T,k]? -> out[T,H] (dtype of y_sorted)
    "unpermute(Tensor y_sorted, Tensor slot_rows, Tensor? weights, int k) -> Tensor",
    // x[T,H], ids[T,k] -> buf[E,C,H], slot_pos[T,k] i32, demand[E] i32, kept[E] i32
    "capacity_dispatch(Tensor x, Tensor ids, int num_experts, int capacity, str priority) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    // buf_out[E,C,H], ids[T,k], slot_pos[T,k], weights[T,k]? -> out[T,H]
    "capacity_combine(Tensor buf_out, Tensor ids, Tensor slot_pos, Tensor? weights) -> Tensor",
    // a[M,K], b[E,K,N] (or [E,N,K] when trans_b), expert_offsets[E+1] -> c[M,N]
    "grouped_gemm(Tensor a, Tensor b, Tensor expert_offsets, bool trans_b) -> Tensor",
    // a[M,K], dc[M,N], expert_offsets[E+1] -> db[E,K,N]: db[e] = a[rows e]^T @ dc[rows e]
    "grouped_gemm_wgrad(Tensor a, Tensor dc, Tensor expert_offsets, int num_experts) -> Tensor",
};

// The whole dropless expert stage: gather -> GEMM1 + gated activation -> GEMM2 -> weighted
// combine. x[T,H], ids[T,k], weights[T,k]? -> out[T,H]. The CPU backend's fused op
// (csrc/cpu/fused_moe.cpp) and the CUDA one (csrc/cuda/grouped_gemm.cu), which the emulator
// namespace defines too so the SIMT emulator runs it.
inline constexpr const char* kFusedExpertsSchema =
    "fused_experts(Tensor x, Tensor ids, Tensor? weights, Tensor w_gate_up, Tensor w_down, str activation) -> Tensor";

// Ops only the native (moe_ops) namespace defines: fused paths of one backend, not part of the
// cross-backend contract (the emulator and Triton do not define them).
inline constexpr const char* kNativeOnlySchemas[] = {
    kFusedExpertsSchema,
    // The CPU backend's expert weights repacked once into 16-column panels
    // (csrc/cpu/fused_moe_packed.cpp). layout "panel16": w_gate_up[E,2I,H] -> [E, ceil(I/16),
    // 2 (gate|up), H, 16], w_down[E,H,I] -> [E, ceil(H/16), I, 16]; "vnni" (bf16, for AVX512-BF16):
    // the same with K rows as ceil(K/2) (k even, k odd) pairs: [E, ceil(I/16), 2, ceil(H/2), 16, 2],
    // [E, ceil(H/16), ceil(I/2), 16, 2]; "auto": vnni for bf16 where the CPU has AVX512-BF16,
    // else panel16. Same dtype, zero padding.
    "pack_experts(Tensor w_gate_up, Tensor w_down, str layout=\"panel16\") -> (Tensor, Tensor)",
    // fused_experts with weight-only quantized experts as checkpoints store them (moe_ops/quant.py;
    // csrc/cpu/fused_moe_quant.cpp): format fp8_e4m3 (scale_inv [E, ceil(N/block_n),
    // ceil(K/block_k)]), mxfp4 (uint8 blocks [E, N, K/32, 16] + e8m0 scales [E, N, K/32]) or int8
    // (scale [E, N]); x bf16.
    "fused_experts_quantized(Tensor x, Tensor ids, Tensor? weights, Tensor w_gate_up, Tensor w_gate_up_scale, "
    "Tensor w_down, Tensor w_down_scale, str format, int block_n, int block_k, str activation) -> Tensor",
    // fused_experts on packed weights (the broadcast-form GEMM that reaches the FMA peak).
    "fused_experts_packed(Tensor x, Tensor ids, Tensor? weights, Tensor w_gate_up_packed, "
    "Tensor w_down_packed, str activation) -> Tensor",
};

inline constexpr const char* kOpNames[] = {
    "topk_gating",      "permute",      "unpermute",          "capacity_dispatch",
    "capacity_combine", "grouped_gemm", "grouped_gemm_wgrad",
};

}  // namespace moe_ops
