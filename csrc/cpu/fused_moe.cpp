// fused_experts on CPU: the dropless expert half of an MoE layer in one op.
//
//   x[T,H], ids[T,k], weights[T,k]?, w_gate_up[E,2I,H], w_down[E,H,I] -> out[T,H]
//
// Dataflow (steps 1 and 5 are fused_moe_frame.h's fused_experts_frame): stable placement of the T*k
// slots by expert (as permute, block_m=1) -> gather the routed token rows straight into the
// packed float32 A operand (no x_sorted tensor) -> GEMM1 tiles (expert, I-column block, row
// chunk) compute the gate and up columns of the same block together and apply the gated
// activation in the epilogue, writing the packed A operand of GEMM2 -> GEMM2 tiles write each
// slot's expert output -> weighted combine per token in j order. Intermediates are rounded
// through the model dtype exactly where the unfused pipeline stores them (h, act, y), so the
// result matches permute -> grouped_gemm -> act -> grouped_gemm -> unpermute up to the
// activation's libm rounding. Thread-count independent (see gemm_nt.h).
//
// bf16 on AVX512-BF16 CPUs: steps 2-4 are vnni_experts.h's, each weight block repacked per tile
// into a cache-resident buffer -- the packed op's kernels and bits, with no packed copy kept.
//
// The schema lives in csrc/schemas.h (kNativeOnlySchemas: a CPU-only op, not part of the
// cross-backend contract); a Meta kernel gives its shape for torch.compile.
#include <cstring>
#include <string>

#include <torch/library.h>

#include "activations.h"
#include "cpu_features.h"
#include "fused_moe_frame.h"
#include "gemm_nt.h"
#include "host_alloc.h"
#include "row_io.h"
#include "tile_schedule.h"
#include "vnni_experts.h"

namespace moe_cpu {
namespace {

at::Tensor fused_experts_cpu(const at::Tensor& x_in, const at::Tensor& ids_in, const c10::optional<at::Tensor>& weights,
                             const at::Tensor& wgu_in, const at::Tensor& wd_in, c10::string_view activation) {
  const char* op = "fused_experts";
  const std::string act(activation.data(), activation.size());
  check_fused_inputs(op, x_in, ids_in, weights, act);
  check_cpu(wgu_in, op, "w_gate_up");
  check_cpu(wd_in, op, "w_down");
  TORCH_CHECK(wgu_in.scalar_type() == x_in.scalar_type() && wd_in.scalar_type() == x_in.scalar_type(),
              "moe_ops::fused_experts (cpu): x, w_gate_up and w_down must share a dtype");
  const int64_t H = x_in.size(1), k = ids_in.size(1);
  TORCH_CHECK(wgu_in.dim() == 3 && wgu_in.size(1) % 2 == 0 && wgu_in.size(2) == H,
              "moe_ops::fused_experts (cpu): w_gate_up must be [E, 2I, H=", H, "], got ", wgu_in.sizes());
  const int64_t E = wgu_in.size(0), I = wgu_in.size(1) / 2;
  TORCH_CHECK(wd_in.dim() == 3 && wd_in.size(0) == E && wd_in.size(1) == H && wd_in.size(2) == I,
              "moe_ops::fused_experts (cpu): w_down must be [E=", E, ", H=", H, ", I=", I, "], got ", wd_in.sizes());
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const at::Tensor wgu = wgu_in.contiguous(), wd = wd_in.contiguous();
  const DType dt = to_dtype(x.scalar_type());
  const int64_t es = dtype_size(dt);
  const bool swiglu = act == "swiglu";
  return fused_experts_frame(x, ids, weights, E, I, [&](const Placement& pl, at::Tensor& ybuf) {
    if (dt == DType::BF16 && use_avx512_bf16()) {  // vnni_experts.h: each block repacked per tile
      const VnniWeights w{static_cast<const uint16_t*>(wgu.const_data_ptr()),
                          static_cast<const uint16_t*>(wd.const_data_ptr()), /*packed=*/false};
      return vnni_experts(x, pl, k, I, w, swiglu, ybuf);
    }
    const std::vector<int64_t>& offs = pl.offs;
    const int64_t Sv = pl.rows();
    // 2. gather + pack the routed rows (GEMM1's A operand).
    const int64_t Hp = padded_k(H), Ip = padded_k(I);
    // Scratch from the host cache (no page faults at steady state); a2's padded columns must be 0.
    at::Tensor a1 = empty_cached({Sv, Hp}, x.options().dtype(at::kFloat));
    at::Tensor a2 = empty_cached({Sv, Ip}, x.options().dtype(at::kFloat)).zero_();
    float* A1 = a1.data_ptr<float>();
    float* A2 = a2.data_ptr<float>();
    const char* xp = static_cast<const char*>(x.const_data_ptr());
    at::parallel_for(0, Sv, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) pack_row_nt(xp + (pl.row_slot[r] / k) * H * es, dt, H, dt, A1 + r * Hp);
    });

    // 3. GEMM1 + gated activation: gate and up columns of one block in the same tile.
    const char* wgup = static_cast<const char*>(wgu.const_data_ptr());
    const int64_t nb1 = nt_col_block(offs, I, H, 2 * es);
    run_tiles(make_tiles(offs, I, H, nb1, 256, 8.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> g, u;
      const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
      g.resize(static_cast<size_t>(rows * cols));
      u.resize(static_cast<size_t>(rows * cols));
      const char* we = wgup + t.e * 2 * I * H * es;
      // Each call prefetches the weights that run after it: the up block after the gate block,
      // then the next tile's gate block (if it uses other weights).
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      const char* up = we + (I + t.n0) * H * es;
      gemm_nt_block(A1 + t.m0 * Hp, Hp, we + t.n0 * H * es, dt, H, H, g.data(), cols, rows, cols, up);
      gemm_nt_block(A1 + t.m0 * Hp, Hp, up, dt, H, H, u.data(), cols, rows, cols,
                    pf ? wgup + (nx->e * 2 * I + nx->n0) * H * es : nullptr);
      gated_act_rows(g.data(), u.data(), g.data(), rows * cols, dt, swiglu);
      for (int64_t i = 0; i < rows; ++i) {
        float* dst = A2 + (t.m0 + i) * Ip;
        if (dt != DType::BF16) std::memcpy(dst + t.n0, g.data() + i * cols, cols * sizeof(float));
        else
          for (int64_t j = 0; j < cols; ++j) dst[pack_index(t.n0 + j, dt)] = g[i * cols + j];
      }
    });

    // 4. GEMM2: each slot's expert output, rounded through the model dtype, kept as float32.
    const char* wdp = static_cast<const char*>(wd.const_data_ptr());
    float* Y = ybuf.data_ptr<float>();
    const int64_t nb2 = nt_col_block(offs, H, I, es);
    run_tiles(make_tiles(offs, H, I, nb2, 256, 4.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> c;
      const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
      c.resize(static_cast<size_t>(rows * cols));
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      gemm_nt_block(A2 + t.m0 * Ip, Ip, wdp + (t.e * H + t.n0) * I * es, dt, I, I, c.data(), cols, rows, cols,
                    pf ? wdp + (nx->e * H + nx->n0) * I * es : nullptr);
      for (int64_t i = 0; i < rows; ++i) round_rows(c.data() + i * cols, Y + (t.m0 + i) * H + t.n0, cols, dt);
    });
  });
}

}  // namespace
}  // namespace moe_cpu

// Schema: csrc/schemas.h (kNativeOnlySchemas).
TORCH_LIBRARY_IMPL(moe_ops, CPU, m) { m.impl("fused_experts", &moe_cpu::fused_experts_cpu); }
TORCH_LIBRARY_IMPL(moe_ops, Meta, m) { m.impl("fused_experts", &moe_cpu::fused_experts_meta); }
