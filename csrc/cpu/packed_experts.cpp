// Packed expert weights on CPU: pack_experts (once, at load time) and fused_experts_packed (every
// forward).
//
//   pack_experts:  w_gate_up[E,2I,H] -> [E, P1=ceil(I/16), 2, H, 16]   (panel p: gate | up)
//                  w_down[E,H,I]     -> [E, P2=ceil(H/16), I, 16]
//   fused_experts_packed: x[T,H], ids[T,k], weights[T,k]?, packed weights -> out[T,H]
//
// Why: the layer's weights are [out, in] with the reduction contiguous, which forces the NT
// ("dot product") GEMM: every FMA reads its A operand from memory and the kernel tops out near
// 75-80% of the FMA peak. Repacked once into 16-column panels (K rows of 16 contiguous values, the
// weights' own dtype, so the same bytes), each k step is one panel-row load + one broadcast per
// row + 2 FMAs per row (kernels.h gemm_panels): ~100% of peak in cache, ~90% streaming weights
// from DRAM. A panel is also one contiguous stream (H*16 or I*16 values), which the hardware
// prefetcher follows across pages. This is what CPU inference stacks do at model load (oneDNN /
// IPEX weight prepacking); it costs one pass over the weights, and the packed copy replaces the
// original if the caller drops it.
//
// Dataflow of fused_experts_packed: stable placement of the T*k slots by expert (as permute,
// block_m=1) -> gather the routed rows into plain float32 rows (A1) -> GEMM1 tiles = (expert,
// panel p, row chunk): gate and up panels of p in one call, gated activation in the epilogue,
// written into A2 (plain float32 rows of I) -> GEMM2 tiles = (expert, panels of H, row chunk) ->
// y rows (float32, rounded through the model dtype) -> weighted combine per token in j order.
// Intermediates are rounded where the unfused pipeline stores them, as in fused_experts; the
// GEMMs reduce each output in one FMA chain (k ascending) instead of 8 lanes + a horizontal sum,
// so the two fused ops agree to rounding, not bitwise. Thread-count independent.
#include <string>

#include "combine.h"
#include "host_alloc.h"

namespace moe_cpu {
namespace {

void check_weights_3d(const at::Tensor& wgu, const at::Tensor& wd, const char* op) {
  check_cpu(wgu, op, "w_gate_up");
  check_cpu(wd, op, "w_down");
  TORCH_CHECK(is_kernel_dtype(wgu.scalar_type()) && wd.scalar_type() == wgu.scalar_type(), "moe_ops::", op,
              " (cpu): w_gate_up and w_down must share a dtype in float16/bfloat16/float32, got ",
              wgu.scalar_type(), " and ", wd.scalar_type());
  TORCH_CHECK(wgu.dim() == 3 && wgu.size(1) % 2 == 0, "moe_ops::", op, " (cpu): w_gate_up must be [E, 2I, H], got ",
              wgu.sizes());
  TORCH_CHECK(wd.dim() == 3 && wd.size(0) == wgu.size(0) && wd.size(1) == wgu.size(2) && wd.size(2) == wgu.size(1) / 2,
              "moe_ops::", op, " (cpu): w_down must be [E, H, I] for w_gate_up ", wgu.sizes(), ", got ", wd.sizes());
}

std::tuple<at::Tensor, at::Tensor> pack_experts_cpu(const at::Tensor& wgu_in, const at::Tensor& wd_in) {
  check_weights_3d(wgu_in, wd_in, "pack_experts");
  const at::Tensor wgu = wgu_in.contiguous(), wd = wd_in.contiguous();
  const int64_t E = wgu.size(0), I = wgu.size(1) / 2, H = wgu.size(2);
  const int64_t P1 = num_panels(I), P2 = num_panels(H);
  at::Tensor pgu = at::empty({E, P1, 2, H, kPanel}, wgu.options());
  at::Tensor pd = at::empty({E, P2, I, kPanel}, wd.options());
  const DType dt = to_dtype(wgu.scalar_type());
  const int64_t es = dtype_size(dt);
  const char* src1 = static_cast<const char*>(wgu.data_ptr());
  const char* src2 = static_cast<const char*>(wd.data_ptr());
  char* dst1 = static_cast<char*>(pgu.data_ptr());
  char* dst2 = static_cast<char*>(pd.data_ptr());
  // One panel per task: gate/up panels of GEMM1 ((e, p, g): rows g*I + 16p.. of w_gate_up[e],
  // clipped at the gate/up boundary), then the panels of GEMM2.
  const int64_t n1 = E * P1 * 2, n2 = E * P2;
  at::parallel_for(0, n1 + n2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i < n1) {
        const int64_t e = i / (2 * P1), p = (i / 2) % P1, g = i % 2;
        const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
        pack_panels(src1 + ((e * 2 * I) + g * I + p * kPanel) * H * es, dt, cols, H, H, dst1 + i * H * kPanel * es);
      } else {
        const int64_t j = i - n1, e = j / P2, p = j % P2;
        const int64_t cols = std::min<int64_t>(kPanel, H - p * kPanel);
        pack_panels(src2 + (e * H + p * kPanel) * I * es, dt, cols, I, I, dst2 + j * I * kPanel * es);
      }
    }
  });
  return {pgu, pd};
}

std::tuple<at::Tensor, at::Tensor> pack_experts_meta(const at::Tensor& wgu, const at::Tensor& wd) {
  const int64_t E = wgu.size(0), I = wgu.size(1) / 2, H = wgu.size(2);
  return {at::empty({E, num_panels(I), 2, H, kPanel}, wgu.options()),
          at::empty({E, num_panels(H), I, kPanel}, wd.options())};
}

at::Tensor fused_experts_packed_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                    const c10::optional<at::Tensor>& weights, const at::Tensor& pgu_in,
                                    const at::Tensor& pd_in, c10::string_view activation) {
  const char* op = "fused_experts_packed";
  const std::string act(activation.data(), activation.size());
  check_fused_inputs(op, x_in, ids_in, weights, act);
  check_cpu(pgu_in, op, "w_gate_up_packed");
  check_cpu(pd_in, op, "w_down_packed");
  TORCH_CHECK(pgu_in.scalar_type() == x_in.scalar_type() && pd_in.scalar_type() == x_in.scalar_type(),
              "moe_ops::fused_experts_packed (cpu): x and the packed weights must share a dtype, got ",
              x_in.scalar_type(), ", ", pgu_in.scalar_type(), " and ", pd_in.scalar_type());
  const int64_t T_ = x_in.size(0), H = x_in.size(1), k = ids_in.size(1), S = T_ * k;
  TORCH_CHECK(pd_in.dim() == 4 && pd_in.size(1) == num_panels(H) && pd_in.size(3) == kPanel,
              "moe_ops::fused_experts_packed (cpu): w_down_packed must be [E, ceil(H/16)=", num_panels(H),
              ", I, 16] (from moe_ops::pack_experts), got ", pd_in.sizes());
  const int64_t E = pd_in.size(0), I = pd_in.size(2), P1 = num_panels(I), P2 = num_panels(H);
  TORCH_CHECK(pgu_in.dim() == 5 && pgu_in.size(0) == E && pgu_in.size(1) == P1 && pgu_in.size(2) == 2 &&
                  pgu_in.size(3) == H && pgu_in.size(4) == kPanel,
              "moe_ops::fused_experts_packed (cpu): w_gate_up_packed must be [E=", E, ", ceil(I/16)=", P1,
              ", 2, H=", H, ", 16] (from moe_ops::pack_experts), got ", pgu_in.sizes());
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const at::Tensor pgu = pgu_in.contiguous(), pd = pd_in.contiguous();
  at::Tensor out = empty_cached({T_, H}, x.options());
  if (T_ == 0 || H == 0) return out;

  const DType dt = to_dtype(x.scalar_type());
  const int64_t es = dtype_size(dt);
  const bool swiglu = act == "swiglu";

  // 1. placement.
  const Placement pl = place_slots(ids.data_ptr<int32_t>(), S, E);
  const std::vector<int64_t>& offs = pl.offs;
  const int64_t Sv = pl.rows();

  at::Tensor ybuf = empty_cached({std::max<int64_t>(Sv, 1), H}, x.options().dtype(at::kFloat));
  if (Sv > 0 && I > 0) {
    // 2. gather the routed rows as plain float32 (GEMM1's A operand). Scratch and output come
    // from the host cache (host_alloc.h): no page faults at steady state.
    at::Tensor a1 = empty_cached({Sv, H}, x.options().dtype(at::kFloat));
    at::Tensor a2 = empty_cached({Sv, I}, x.options().dtype(at::kFloat));
    float* A1 = a1.data_ptr<float>();
    float* A2 = a2.data_ptr<float>();
    const char* xp = static_cast<const char*>(x.data_ptr());
    at::parallel_for(0, Sv, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_to_f32(xp + (pl.row_slot[r] / k) * H * es, dt, A1 + r * H, H);
    });

    // 3. GEMM1 + gated activation: tile = (expert, panel p, rows); the gate and up panels of p
    // are adjacent, so one call computes both ([rows, 32] scratch: 16 gate | 16 up columns).
    const char* wgu = static_cast<const char*>(pgu.data_ptr());
    const int64_t pair = 2 * H * kPanel * es;  // bytes of one (gate, up) panel pair
    run_tiles(make_tiles(offs, P1, 2 * H * kPanel, 1, 256, 2.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> c;
      const int64_t rows = t.m1 - t.m0, p = t.n0;
      c.resize(static_cast<size_t>(rows * 2 * kPanel));
      const char* w = wgu + (t.e * P1 + p) * pair;
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      gemm_panels(A1 + t.m0 * H, H, w, dt, H * kPanel, H, 2, c.data(), 2 * kPanel, rows,
                  pf ? wgu + (nx->e * P1 + nx->n0) * pair : nullptr);
      const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
      gated_act_block(c.data(), c.data() + kPanel, 2 * kPanel, A2 + t.m0 * I + p * kPanel, I, rows, cols, dt, swiglu);
    });

    // 4. GEMM2: each slot's expert output, rounded through the model dtype, kept as float32.
    const char* wd = static_cast<const char*>(pd.data_ptr());
    float* Y = ybuf.data_ptr<float>();
    const int64_t panel = I * kPanel * es;  // bytes of one GEMM2 panel
    const int64_t np2 = nt_col_block(offs, P2, I * kPanel, es, 1);  // panels per tile
    run_tiles(make_tiles(offs, P2, I * kPanel, np2, 256, 1.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> c;
      const int64_t rows = t.m1 - t.m0, np = t.n1 - t.n0;
      c.resize(static_cast<size_t>(rows * np * kPanel));
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      gemm_panels(A2 + t.m0 * I, I, wd + (t.e * P2 + t.n0) * panel, dt, I * kPanel, I, np, c.data(), np * kPanel,
                  rows, pf ? wd + (nx->e * P2 + nx->n0) * panel : nullptr);
      const int64_t c0 = t.n0 * kPanel, cols = std::min<int64_t>(np * kPanel, H - c0);
      for (int64_t i = 0; i < rows; ++i) round_rows(c.data() + i * np * kPanel, Y + (t.m0 + i) * H + c0, cols, dt);
    });
  } else if (Sv > 0) {
    ybuf.zero_();  // I == 0: every expert outputs zeros
  }

  // 5. weighted combine in j order.
  combine_slots(ybuf, pl, T_, k, weights, out);
  return out;
}

}  // namespace
}  // namespace moe_cpu

// Schemas: csrc/schemas.h (kNativeOnlySchemas).
TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("pack_experts", &moe_cpu::pack_experts_cpu);
  m.impl("fused_experts_packed", &moe_cpu::fused_experts_packed_cpu);
}
TORCH_LIBRARY_IMPL(moe_ops, Meta, m) {
  m.impl("pack_experts", &moe_cpu::pack_experts_meta);
  m.impl("fused_experts_packed", &moe_cpu::fused_experts_meta);
}
