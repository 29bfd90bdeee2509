// Op namespace of the SIMT emulator build: `moe_ops_sim` carries every moe_ops schema
// (csrc/schemas.h, the one definition), so the same Python layer and tests drive it.
//
// The CPU implementations registered on it are the CUDA bindings of csrc/cuda/*.cu compiled as
// host C++ with -DMOE_OPS_SIM (see csrc/sim/CMakeLists.txt): they register with
// TORCH_LIBRARY_IMPL(moe_ops_sim, CPU, m) and launch the kernels of csrc/kernels/ through
// moe_ops::launch, which runs them here, thread by thread, on the emulator.
// moe_ops._register_sim exposes the ops that have a CPU kernel as backend "cuda_sim".
#include <torch/library.h>

#include "../schemas.h"

TORCH_LIBRARY(moe_ops_sim, m) {
  for (const char* schema : moe_ops::kOpSchemas) m.def(schema);
}
