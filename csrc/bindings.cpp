// The one bindings file: op schemas (TORCH_LIBRARY) and the Python module `moe_ops._C`.
//
// Kernels register themselves in their own translation units with TORCH_LIBRARY_IMPL
// (csrc/cpu for CPU, csrc/cuda for CUDA), so this file never changes when a kernel lands.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "cpu/cpu_features.h"
#include "cpu/onednn_brgemm.h"
#include "arg_limits.h"
#include "schemas.h"

#ifndef MOE_OPS_VERSION
#define MOE_OPS_VERSION "0.0.0"
#endif
#ifndef MOE_OPS_TORCH_VERSION
#define MOE_OPS_TORCH_VERSION "unknown"
#endif
#ifndef MOE_OPS_CUDA_ARCHS
#define MOE_OPS_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(moe_ops, m) {
  for (const char* schema : moe_ops::kOpSchemas) m.def(schema);
  for (const char* schema : moe_ops::kNativeOnlySchemas) m.def(schema);
}

namespace {

bool has_kernel(const std::string& op, const char* key) {
  auto handle = c10::Dispatcher::singleton().findOp({"moe_ops::" + op, ""});
  if (!handle) return false;
  return handle->hasKernelForDispatchKey(c10::parseDispatchKey(key));
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MOE_OPS_VERSION;
  info["torch"] = MOE_OPS_TORCH_VERSION;
#ifdef MOE_OPS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = MOE_OPS_CUDA_VERSION;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  pybind11::list archs;
  std::string s = MOE_OPS_CUDA_ARCHS, cur;
  for (char c : s + ",") {
    if (c == ',') {
      if (!cur.empty()) archs.append(cur);
      cur.clear();
    } else cur += c;
  }
  info["cuda_archs"] = archs;
  pybind11::dict kernels;
  for (const char* op : moe_ops::kOpNames) {
    pybind11::list keys;
    if (has_kernel(op, "CPU")) keys.append("cpu");
    if (has_kernel(op, "CUDA")) keys.append("cuda");
    kernels[op] = keys;
  }
  info["native_kernels"] = kernels;
  // Which CPU kernels run here: AVX2/FMA (else portable scalar code), AVX512-BF16 natively (the
  // packed 'vnni' GEMM, the bf16 as-stored GEMM and combine), whether those are built emulated
  // (SIMDe) as well, and whether the ops that also have AVX2 code use them (natively, or emulated
  // under MOE_OPS_CPU_EMULATE_AVX512=1).
  pybind11::dict isa;
  isa["avx2"] = moe_cpu::have_avx2();
  isa["avx512_bf16"] = moe_cpu::have_avx512_bf16();
  isa["avx512_emulated"] = moe_cpu::avx512_emulation_built();
  isa["avx512_kernels"] = moe_cpu::use_avx512_bf16();
  // fused_experts_quantized's kernels: the AVX512-BF16 ones (repack + decode GEMV), else the AVX2 GEMV, else none
  isa["quantized_experts"] = moe_cpu::use_avx512_bf16() ? "avx512_bf16" : moe_cpu::have_avx2() ? "avx2" : "";
  isa["onednn_brgemm"] = moe_cpu::brgemm_chosen();  // the bf16 expert GEMMs on oneDNN's micro-GEMM
  info["cpu"] = isa;
  pybind11::dict limits;  // the argument limits of csrc/limits.h (moe_ops/ops.py uses the same)
  limits["max_k"] = moe_ops::limits::kMaxK;
  limits["max_experts"] = moe_ops::limits::kMaxExperts;
  limits["int32_max"] = moe_ops::limits::kInt32Max;
  info["limits"] = limits;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "moe_ops native extension: op schemas, CPU and CUDA kernels";
  m.def("build_info", &build_info, "What this extension was built with and which kernels it has.");
  m.def(
      "op_schemas",
      [] {
        pybind11::list out;
        for (const char* s : moe_ops::kOpSchemas) out.append(s);
        return out;
      },
      "The operator schemas (without namespace), as defined in csrc/schemas.h.");
}
