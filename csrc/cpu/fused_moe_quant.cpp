// fused_experts_quantized on CPU: fused_experts with weight-only quantized experts as checkpoints
// store them (moe_ops/quant.py: fp8_e4m3 block-scaled, GPT-OSS mxfp4, int8 per row).
//
//   x[T,H] bf16, ids[T,k], weights[T,k]?, w_gate_up + scale, w_down + scale, format -> out[T,H]
//
// Dataflow: fused_moe_frame.h's placement and combine around vnni_experts.h's stages, which read
// the quantized weights as stored (1 byte a weight, half a byte for mxfp4: the bytes a cold decode
// is bound by) and dequantize them exactly in registers:
//   AVX512-BF16 kernels (native, or SIMDe-emulated under MOE_OPS_CPU_EMULATE_AVX512): tiles of
//     many rows repack their block to bf16 VNNI panels, the non-power-of-two scales applied to the
//     float32 GEMM results; decode tiles (<= MOE_OPS_CPU_GEMV_ROWS rows) run the GEMV on the rows;
//   else AVX2: every tile runs the AVX2 float32 GEMV (quant_gemv.h).
// build_info()["cpu"]["quantized_experts"] says which.
#include <string>

#include <torch/library.h>

#include "cpu_features.h"
#include "fused_moe_frame.h"
#include "vnni_experts.h"

namespace moe_cpu {
namespace {

QuantFmt parse_format(const std::string& f) {
  if (f == "int8") return QuantFmt::kInt8;
  if (f == "fp8_e4m3") return QuantFmt::kFp8;
  if (f == "mxfp4") return QuantFmt::kMxfp4;
  TORCH_CHECK(false, "moe_ops::fused_experts_quantized (cpu): format must be fp8_e4m3, mxfp4 or int8, got '", f, "'");
  return QuantFmt::kNone;
}

// Checks one quantized weight (logical [E, N, K]) and its scale; returns the scale in the dtype
// the kernel reads (float32, or the e8m0 bytes), contiguous.
at::Tensor check_weight(const char* name, const at::Tensor& w, const at::Tensor& s, QuantFmt fmt, int64_t E, int64_t N,
                        int64_t K, int64_t bn, int64_t bk) {
  const char* op = "fused_experts_quantized";
  check_cpu(w, op, name);
  check_cpu(s, op, name);
  if (fmt == QuantFmt::kMxfp4) {
    TORCH_CHECK(K % 32 == 0, "moe_ops::", op, " (cpu): mxfp4 needs K divisible by 32, ", name, " has K=", K);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.sizes() == at::IntArrayRef({E, N, K / 32, 16}), "moe_ops::", op,
                " (cpu): mxfp4 ", name, " must be uint8 [", E, ", ", N, ", ", K / 32, ", 16], got ", w.scalar_type(),
                " ", w.sizes());
    TORCH_CHECK(s.scalar_type() == at::kByte && s.sizes() == at::IntArrayRef({E, N, K / 32}), "moe_ops::", op,
                " (cpu): mxfp4 ", name, " scales must be uint8 [", E, ", ", N, ", ", K / 32, "], got ", s.scalar_type(),
                " ", s.sizes());
    return s.contiguous();
  }
  const auto qt = fmt == QuantFmt::kInt8 ? at::kChar : at::kFloat8_e4m3fn;
  TORCH_CHECK(w.scalar_type() == qt && w.sizes() == at::IntArrayRef({E, N, K}), "moe_ops::", op, " (cpu): ", name,
              " must be ", qt, " [", E, ", ", N, ", ", K, "], got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(s.is_floating_point(), "moe_ops::", op, " (cpu): ", name, " scale must be float, got ", s.scalar_type());
  if (fmt == QuantFmt::kInt8) {
    TORCH_CHECK(s.numel() == E * N && (s.dim() == 2 || (s.dim() == 3 && s.size(2) == 1)), "moe_ops::", op,
                " (cpu): ", name, " scale must be [", E, ", ", N, "], got ", s.sizes());
  } else {
    TORCH_CHECK(bn >= 1 && bk >= 2 && bk % 2 == 0, "moe_ops::", op,
                " (cpu): fp8 block must be >= 1 rows and an even number of columns, got (", bn, ", ", bk, ")");
    const int64_t nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
    TORCH_CHECK(s.sizes() == at::IntArrayRef({E, nb, kb}), "moe_ops::", op, " (cpu): ", name, " scale_inv must be [", E,
                ", ", nb, ", ", kb, "], got ", s.sizes());
  }
  return s.to(at::kFloat).contiguous();
}

at::Tensor fused_experts_quantized_cpu(const at::Tensor& x_in, const at::Tensor& ids_in,
                                       const c10::optional<at::Tensor>& weights, const at::Tensor& wgu_in,
                                       const at::Tensor& sgu_in, const at::Tensor& wd_in, const at::Tensor& sd_in,
                                       c10::string_view format, int64_t block_n, int64_t block_k,
                                       c10::string_view activation) {
  const char* op = "fused_experts_quantized";
  const std::string act(activation.data(), activation.size());
  check_fused_inputs(op, x_in, ids_in, weights, act);
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16, "moe_ops::", op, " (cpu): x must be bfloat16, got ",
              x_in.scalar_type());
  const QuantFmt fmt = parse_format(std::string(format.data(), format.size()));
  const int64_t H = x_in.size(1);
  TORCH_CHECK(wgu_in.dim() >= 3 && wd_in.dim() >= 3, "moe_ops::", op, " (cpu): weights must be [E, ...]");
  const int64_t E = wgu_in.size(0), two_i = wgu_in.size(1);
  TORCH_CHECK(two_i % 2 == 0, "moe_ops::", op, " (cpu): w_gate_up needs 2I rows, got ", two_i);
  const int64_t I = two_i / 2;
  const at::Tensor sgu = check_weight("w_gate_up", wgu_in, sgu_in, fmt, E, 2 * I, H, block_n, block_k);
  const at::Tensor sd = check_weight("w_down", wd_in, sd_in, fmt, E, H, I, block_n, block_k);
  const at::Tensor x = x_in.contiguous(), ids = ids_in.contiguous();
  const at::Tensor wgu = wgu_in.contiguous(), wd = wd_in.contiguous();
  VnniWeights w{nullptr, nullptr, /*packed=*/false};
  w.q.fmt = fmt;
  w.q.gate_up = static_cast<const uint8_t*>(wgu.const_data_ptr());
  w.q.down = static_cast<const uint8_t*>(wd.const_data_ptr());
  w.q.gate_up_scale = sgu.const_data_ptr();
  w.q.down_scale = sd.const_data_ptr();
  w.q.bn = block_n, w.q.bk = block_k;
  w.q.avx2 = !use_avx512_bf16();
  TORCH_CHECK(!w.q.avx2 || have_avx2(), "moe_ops::", op,
              " (cpu): needs the AVX512-BF16 kernels or AVX2 (moe_ops.moe_forward dequantizes instead)");
  TORCH_CHECK(!w.q.avx2 || gemv_takes(w.q), "moe_ops::", op,
              " (cpu): without the AVX512-BF16 kernels, fp8 needs k blocks of a multiple of 32 columns, got ", block_k,
              " (moe_ops.moe_forward dequantizes instead)");
  const bool swiglu = act == "swiglu";
  return fused_experts_frame(x, ids, weights, E, I, [&](const Placement& pl, at::Tensor& ybuf) {
    vnni_experts(x, pl, ids.size(1), I, w, swiglu, ybuf);
  });
}

at::Tensor fused_experts_quantized_meta(const at::Tensor& x, const at::Tensor&, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        c10::string_view, int64_t, int64_t, c10::string_view) {
  return at::empty(x.sizes(), x.options());
}

}  // namespace
}  // namespace moe_cpu

// Schema: csrc/schemas.h (kNativeOnlySchemas).
TORCH_LIBRARY_IMPL(moe_ops, CPU, m) { m.impl("fused_experts_quantized", &moe_cpu::fused_experts_quantized_cpu); }
TORCH_LIBRARY_IMPL(moe_ops, Meta, m) { m.impl("fused_experts_quantized", &moe_cpu::fused_experts_quantized_meta); }
