// CUDA implementations of the moe_ops ops: the shared binding (ops_binding.h) instantiated with
// torch's current CUDA stream and a device guard. Kernels and launchers are in csrc/cuda/*.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops_binding.h"

namespace {

struct CudaBackend {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr const char* kName = "cuda";
  struct Guard {
    explicit Guard(const at::Tensor& t) : g(t.device()) {}
    c10::cuda::CUDAGuard g;
  };
  static void* stream(const at::Tensor& t) {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
  }
};

}  // namespace

MOE_OPS_REGISTER_KERNELS(moe_ops, CUDA, CudaBackend)
