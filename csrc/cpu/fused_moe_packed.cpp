// Packed expert weights on CPU: pack_experts (once, at load time) and fused_experts_packed (every
// forward).
//
//   pack_experts:  w_gate_up[E,2I,H] -> [E, P1=ceil(I/16), 2, H, 16]   (panel p: gate | up)
//                  w_down[E,H,I]     -> [E, P2=ceil(H/16), I, 16]
//   'vnni' (bf16): w_gate_up -> [E, P1, ceil(H/2), 2, 16, 2]  (row kk of block p: gate | up pairs)
//                  w_down    -> [E, ceil(H/32), ceil(I/2), 32, 2]
//   i.e. blocks of 32 columns with the reduction as (k even, k odd) pairs: oneDNN brgemm's B
//   layout (onednn_brgemm.h) and, read as two interleaved 16-column panels, gemm_panels_vnni's.
//   fused_experts_packed: x[T,H], ids[T,k], weights[T,k]?, packed weights -> out[T,H]
//
// Why: the layer's weights are [out, in] with the reduction contiguous, which forces the NT
// ("dot product") GEMM: every FMA reads its A operand from memory, so the kernel cannot keep the
// FMA units busy. Repacked once into 16-column panels (K rows of 16 contiguous values, the
// weights' own dtype, so the same bytes), each k step is one panel-row load + one broadcast per
// row + 2 FMAs per row (gemm_panels.h): half the loads per FMA (measured: docs/cpu.md, "Design
// notes and measured history"). A panel is also one contiguous stream (H*16 or I*16 values), which the hardware
// prefetcher follows across pages. This is what CPU inference stacks do at model load (oneDNN /
// IPEX weight prepacking); it costs one pass over the weights, and the packed copy replaces the
// original if the caller drops it.
//
// Dataflow of fused_experts_packed (steps 1 and 5 are fused_moe_frame.h's fused_experts_frame): stable
// placement of the T*k slots by expert (as permute, block_m=1) -> steps 2-4: the 'vnni' layout
// goes through vnni_experts.h (shared with fused_experts on bf16 weights as stored, the same
// bits); panel16 gathers the routed rows into plain float32 rows (A1) -> GEMM1 tiles = (expert,
// panel p, row chunk): gate and up panels of p in one call, gated activation in the epilogue,
// written into A2 (plain float32 rows of I) -> GEMM2 tiles = (expert, panels of H, row chunk) ->
// y rows (float32, rounded through the model dtype) -> weighted combine per token in j order.
// Intermediates are rounded where the unfused pipeline stores them, as in fused_experts; the
// panel16 GEMMs reduce each output in one FMA chain (k ascending) where fused_experts' AVX2 NT
// kernel sums 8 lanes + a horizontal sum, so there the two ops agree to rounding, not bitwise.
// Thread-count independent.
#include <cstring>
#include <string>

#include <torch/library.h>

#include "activations.h"
#include "avx512_bf16.h"
#include "cpu_features.h"
#include "fused_moe_frame.h"
#include "gemm_panels.h"
#include "host_alloc.h"
#include "row_io.h"
#include "tile_schedule.h"
#include "vnni_experts.h"

namespace moe_cpu {
namespace {

void check_weights_3d(const at::Tensor& wgu, const at::Tensor& wd, const char* op) {
  check_cpu(wgu, op, "w_gate_up");
  check_cpu(wd, op, "w_down");
  TORCH_CHECK(is_kernel_dtype(wgu.scalar_type()) && wd.scalar_type() == wgu.scalar_type(), "moe_ops::", op,
              " (cpu): w_gate_up and w_down must share a dtype in float16/bfloat16/float32, got ", wgu.scalar_type(),
              " and ", wd.scalar_type());
  TORCH_CHECK(wgu.dim() == 3 && wgu.size(1) % 2 == 0, "moe_ops::", op, " (cpu): w_gate_up must be [E, 2I, H], got ",
              wgu.sizes());
  TORCH_CHECK(wd.dim() == 3 && wd.size(0) == wgu.size(0) && wd.size(1) == wgu.size(2) && wd.size(2) == wgu.size(1) / 2,
              "moe_ops::", op, " (cpu): w_down must be [E, H, I] for w_gate_up ", wgu.sizes(), ", got ", wd.sizes());
}

// "auto" -> the layout this CPU runs fastest: vnni for bf16 with AVX512-BF16, else panel16.
bool use_vnni(const std::string& layout, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(layout == "auto" || layout == "panel16" || layout == "vnni", "moe_ops::", op,
              " (cpu): layout must be 'auto', 'panel16' or 'vnni', got '", layout, "'");
  if (layout == "auto") return dtype == at::kBFloat16 && have_avx512_bf16();
  if (layout == "panel16") return false;
  TORCH_CHECK(dtype == at::kBFloat16, "moe_ops::", op, " (cpu): layout 'vnni' is for bfloat16 weights, got ", dtype);
  return true;
}

std::tuple<std::vector<int64_t>, std::vector<int64_t>> packed_shapes(int64_t E, int64_t I, int64_t H, bool vnni) {
  if (vnni)
    return {{E, num_panels(I), vnni_pairs(H), 2, kPanel, 2},
            {E, (H + kVnniBlock - 1) / kVnniBlock, vnni_pairs(I), kVnniBlock, 2}};
  return {{E, num_panels(I), 2, H, kPanel}, {E, num_panels(H), I, kPanel}};
}

std::tuple<at::Tensor, at::Tensor> pack_experts_cpu(const at::Tensor& wgu_in, const at::Tensor& wd_in,
                                                    c10::string_view layout) {
  check_weights_3d(wgu_in, wd_in, "pack_experts");
  const bool vnni = use_vnni(std::string(layout), wgu_in.scalar_type(), "pack_experts");
  const at::Tensor wgu = wgu_in.contiguous(), wd = wd_in.contiguous();
  const int64_t E = wgu.size(0), I = wgu.size(1) / 2, H = wgu.size(2);
  const int64_t P1 = num_panels(I), P2 = num_panels(H);
  const auto [s1, s2] = packed_shapes(E, I, H, vnni);
  at::Tensor pgu = at::empty(s1, wgu.options());
  // vnni: a last w_down block with <= 16 columns has a panel that no task writes
  at::Tensor pd = vnni ? at::zeros(s2, wd.options()) : at::empty(s2, wd.options());
  const DType dt = to_dtype(wgu.scalar_type());
  const int64_t es = dtype_size(dt);
  // K rows of one panel: K (panel16) or 2*ceil(K/2) (vnni pairs)
  const int64_t K1 = vnni ? 2 * vnni_pairs(H) : H, K2 = vnni ? 2 * vnni_pairs(I) : I;
  const char* src1 = static_cast<const char*>(wgu.const_data_ptr());
  const char* src2 = static_cast<const char*>(wd.const_data_ptr());
  char* dst1 = static_cast<char*>(pgu.data_ptr());
  char* dst2 = static_cast<char*>(pd.data_ptr());
  const auto pack = [&](const char* src, int64_t cols, int64_t K, char* dst) { pack_panels(src, dt, cols, K, K, dst); };
  // One panel per task: gate/up panels of GEMM1 ((e, p, g): rows g*I + 16p.. of w_gate_up[e],
  // clipped at the gate/up boundary), then the panels (vnni: 32-column blocks) of GEMM2.
  const int64_t PB2 = vnni ? (H + kVnniBlock - 1) / kVnniBlock : P2;
  const int64_t n1 = E * P1 * 2, n2 = E * PB2;
  at::parallel_for(0, n1 + n2, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i < n1) {
        const int64_t e = i / (2 * P1), p = (i / 2) % P1, g = i % 2;
        const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
        const char* src = src1 + ((e * 2 * I) + g * I + p * kPanel) * H * es;
        if (vnni)  // gate and up panels interleaved row by row: one 32-column block
          pack_panels_vnni(reinterpret_cast<const uint16_t*>(src), cols, H, H,
                           reinterpret_cast<uint16_t*>(dst1) + (i - g) * K1 * kPanel + g * 2 * kPanel, 0,
                           2 * kVnniBlock);
        else pack(src, cols, H, dst1 + i * K1 * kPanel * es);
      } else {
        const int64_t j = i - n1, e = j / PB2, p = j % PB2;
        if (vnni) {
          const int64_t cols = std::min<int64_t>(kVnniBlock, H - p * kVnniBlock);
          pack_panels_vnni(reinterpret_cast<const uint16_t*>(src2) + (e * H + p * kVnniBlock) * I, cols, I, I,
                           reinterpret_cast<uint16_t*>(dst2) + j * K2 * kVnniBlock, 2 * kPanel, 2 * kVnniBlock);
          continue;
        }
        const int64_t cols = std::min<int64_t>(kPanel, H - p * kPanel);
        pack(src2 + (e * H + p * kPanel) * I * es, cols, I, dst2 + j * K2 * kPanel * es);
      }
    }
  });
  return {pgu, pd};
}

std::tuple<at::Tensor, at::Tensor> pack_experts_meta(const at::Tensor& wgu, const at::Tensor& wd,
                                                     c10::string_view layout) {
  const int64_t E = wgu.size(0), I = wgu.size(1) / 2, H = wgu.size(2);
  const auto [s1, s2] = packed_shapes(E, I, H, use_vnni(std::string(layout), wgu.scalar_type(), "pack_experts"));
  return {at::empty(s1, wgu.options()), at::empty(s2, wd.options())};
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
  const int64_t H = x_in.size(1), k = ids_in.size(1);
  // The layout is in the rank: panel16 [E,P1,2,H,16] / [E,P2,I,16]; vnni one more (pair) dim,
  // [E,P1,ceil(H/2),2,16,2] / [E,ceil(H/32),ceil(I/2),32,2].
  const bool vnni = pgu_in.dim() == 6;
  const int64_t ucols = vnni ? kVnniBlock : kPanel;  // columns of a GEMM2 weight unit
  const int64_t U2 = (H + ucols - 1) / ucols;
  TORCH_CHECK(
      pd_in.dim() == (vnni ? 5 : 4) && pd_in.size(1) == U2 && pd_in.size(3) == ucols && (!vnni || pd_in.size(4) == 2),
      "moe_ops::fused_experts_packed (cpu): w_down_packed must be ", vnni ? "[E, ceil(H/32)=" : "[E, ceil(H/16)=", U2,
      vnni ? ", ceil(I/2), 32, 2]" : ", I, 16]", " (from moe_ops::pack_experts), got ", pd_in.sizes());
  const int64_t E = pd_in.size(0), K2d = pd_in.size(2);  // rows of a GEMM2 unit: I, or ceil(I/2) pairs
  TORCH_CHECK(pgu_in.dim() == (vnni ? 6 : 5) && pgu_in.size(0) == E &&
                  (vnni ? pgu_in.size(2) == vnni_pairs(H) && pgu_in.size(3) == 2 && pgu_in.size(4) == kPanel &&
                              pgu_in.size(5) == 2
                        : pgu_in.size(2) == 2 && pgu_in.size(3) == H && pgu_in.size(4) == kPanel),
              "moe_ops::fused_experts_packed (cpu): w_gate_up_packed must be [E=", E,
              vnni ? ", ceil(I/16), ceil(H/2)=" : ", ceil(I/16), 2, H=", vnni ? vnni_pairs(H) : H,
              vnni ? ", 2, 16, 2]" : ", 16]", " (from moe_ops::pack_experts), got ", pgu_in.sizes());
  const int64_t P1 = pgu_in.size(1);
  // A vnni packing stores I as ceil(I/2) pairs: an odd I runs as I+1, whose extra gate/up
  // column and down row the packer zero-filled (h = act(0) * 0 = 0 meets a zero weight row).
  const int64_t I = vnni ? 2 * K2d : K2d;
  TORCH_CHECK(P1 == num_panels(I), "moe_ops::fused_experts_packed (cpu): w_gate_up_packed has ", P1,
              " panels, w_down_packed implies I=", I, " (", num_panels(I), " panels)");
  if (vnni) {
    TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "moe_ops::fused_experts_packed (cpu): vnni packing is bf16");
    TORCH_CHECK(vnni_available(),
                "moe_ops::fused_experts_packed (cpu): the 'vnni' packed layout needs a CPU with "
                "AVX512-BF16 or a build with SIMDe (pip install simde-py); pack with layout='panel16'");
  }
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const at::Tensor pgu = pgu_in.contiguous(), pd = pd_in.contiguous();
  const DType dt = to_dtype(x.scalar_type());
  const int64_t es = dtype_size(dt);
  const bool swiglu = act == "swiglu";
  if (vnni) {
    const VnniWeights w{static_cast<const uint16_t*>(pgu.const_data_ptr()),
                        static_cast<const uint16_t*>(pd.const_data_ptr()), /*packed=*/true};
    return fused_experts_frame(x, ids, weights, E, I, [&](const Placement& pl, at::Tensor& ybuf) {
      vnni_experts(x, pl, k, I, w, swiglu, ybuf);
    });
  }
  // panel16: float32 A rows, the panel kernel (gemm_panels.h).
  return fused_experts_frame(x, ids, weights, E, I, [&](const Placement& pl, at::Tensor& ybuf) {
    const std::vector<int64_t>& offs = pl.offs;
    const int64_t Sv = pl.rows();
    // 2. gather the routed rows as GEMM1's A operand, plain float32 rows. Scratch and output
    // come from the host cache (host_alloc.h): no page faults at steady state.
    at::Tensor a1 = empty_cached({Sv, H}, x.options().dtype(at::kFloat));
    at::Tensor a2 = empty_cached({Sv, I}, x.options().dtype(at::kFloat));
    float* A1 = a1.data_ptr<float>();
    float* A2 = a2.data_ptr<float>();
    const char* xp = static_cast<const char*>(x.const_data_ptr());
    at::parallel_for(0, Sv, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_to_f32(xp + (pl.row_slot[r] / k) * H * es, dt, A1 + r * H, H);
    });

    // 3. GEMM1 + gated activation: tile = (expert, panel p, rows); the gate and up panels of p
    // are adjacent, so one call computes both ([rows, 32] scratch: 16 gate | 16 up columns).
    const char* wgu = static_cast<const char*>(pgu.const_data_ptr());
    const int64_t pair = 2 * H * kPanel * es;  // bytes of one (gate, up) panel pair
    run_tiles(make_tiles(offs, P1, 2 * H * kPanel, 1, 256, 2.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> c;
      const int64_t rows = t.m1 - t.m0, p = t.n0;
      c.resize(static_cast<size_t>(rows * 2 * kPanel));
      const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      gemm_panels(A1 + t.m0 * H, H, wgu + (t.e * P1 + p) * pair, dt, H * kPanel, H, 2, c.data(), 2 * kPanel, rows,
                  pf ? wgu + (nx->e * P1 + nx->n0) * pair : nullptr);
      gated_act_block(c.data(), c.data() + kPanel, 2 * kPanel, A2 + t.m0 * I + p * kPanel, I, rows, cols, dt, swiglu);
    });

    // 4. GEMM2 over 16-column panels: each slot's expert output, rounded through the model
    // dtype, kept as float32.
    const char* wd = static_cast<const char*>(pd.const_data_ptr());
    float* Y = ybuf.data_ptr<float>();
    const int64_t unit = I * kPanel * es;                           // bytes of one panel
    const int64_t nu2 = nt_col_block(offs, U2, I * kPanel, es, 1);  // panels per tile
    run_tiles(make_tiles(offs, U2, I * kPanel, nu2, 256, 1.0 * es), [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> c;
      const int64_t rows = t.m1 - t.m0, nu = t.n1 - t.n0, ldc = nu * kPanel;
      c.resize(static_cast<size_t>(rows * ldc));
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);
      gemm_panels(A2 + t.m0 * I, I, wd + (t.e * U2 + t.n0) * unit, dt, I * kPanel, I, nu, c.data(), ldc, rows,
                  pf ? wd + (nx->e * U2 + nx->n0) * unit : nullptr);
      const int64_t c0 = t.n0 * kPanel, cols = std::min<int64_t>(ldc, H - c0);
      for (int64_t i = 0; i < rows; ++i) round_rows(c.data() + i * ldc, Y + (t.m0 + i) * H + c0, cols, dt);
    });
  });
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
