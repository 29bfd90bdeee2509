// Op namespace of the SIMT emulator build: `moe_ops_sim` carries every moe_ops schema
// (csrc/schemas.h, the one definition), so the same Python layer and tests drive it.
//
// The CPU kernels registered on it are the CUDA ones: the torch binding shared with the CUDA
// build (csrc/cuda/ops_binding.h) instantiated for CPU tensors with no stream, over the launchers
// of csrc/cuda/*.cu compiled as host C++ with -DMOE_OPS_SIM (see CMakeLists.txt here), whose
// moe_ops::launch runs each grid on the emulator. moe_ops._register_sim exposes the ops that
// have a CPU kernel here as backend "cuda_sim".
#include <torch/library.h>

#include "../schemas.h"
#include "../cuda/ops_binding.h"

TORCH_LIBRARY(moe_ops_sim, m) {
  for (const char* schema : moe_ops::kOpSchemas) m.def(schema);
  m.def(moe_ops::kFusedExpertsSchema);  // the CUDA fused expert stage, emulated
}

namespace {

struct SimBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kName = "cuda_sim";
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static void* stream(const at::Tensor&) { return nullptr; }  // the emulator runs each launch synchronously
};

}  // namespace

MOE_OPS_REGISTER_KERNELS(moe_ops_sim, CPU, SimBackend)
