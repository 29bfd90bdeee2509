// Launcher for topk_gating (kernel: csrc/kernels/topk_gating.cuh).
// E <= 256: warp per row with 8 values per lane; E <= 512: 16 per lane; larger E: one block per
// row, 16 values per thread, blockDim = E/16 rounded up to a warp (E <= 16384).
#include "launch_config.h"
#include "../arg_limits.h"
#include "../kernels/topk_gating.cuh"

namespace moe_ops {
namespace launchers {

// Lane j of warp 0 keeps round j's winner (gating_row), so one warp's lanes bound k.
static_assert(limits::kMaxK <= 32, "topk_gating keeps the k winners in the lanes of one warp");

namespace {

constexpr int kBlockVPT = 16;

template <typename T>
void launch_gating(const kern::GatingParams& p, Stream stream) {
  using namespace kern;
  const size_t gsm = gating_group_smem_bytes(p.E, p.n_group);
  if (p.E <= 32 * 8) {
    launch(topk_gating_warp_kernel<T, 8>, dim3(detail::grid_for(p.T, kGatingWarpsPerBlock)),
           dim3(32 * kGatingWarpsPerBlock), gsm * kGatingWarpsPerBlock, stream, p);
  } else if (p.E <= 32 * 16) {
    launch(topk_gating_warp_kernel<T, 16>, dim3(detail::grid_for(p.T, kGatingWarpsPerBlock)),
           dim3(32 * kGatingWarpsPerBlock), gsm * kGatingWarpsPerBlock, stream, p);
  } else {
    int threads = (p.E + kBlockVPT - 1) / kBlockVPT;
    threads = (threads + 31) / 32 * 32;
    launch(topk_gating_block_kernel<T, kBlockVPT>, dim3(detail::grid_for(p.T, 1)), dim3(threads), gsm, stream, p);
  }
}

}  // namespace

bool topk_gating_supported(int E, int n_group) {
  if (E < 1 || E > kGatingMaxExperts) return false;
  if (n_group <= 0) return true;
  const size_t per_block = E <= 512 ? kern::gating_group_smem_bytes(E, n_group) * kern::kGatingWarpsPerBlock
                                    : kern::gating_group_smem_bytes(E, n_group);
  return per_block <= kGatingMaxGroupSmem;
}

void topk_gating(const void* logits, DType dtype, const float* bias, int64_t T, int E, int k, int scoring,
                 bool renormalize, int n_group, int topk_group, float scaling_factor, float* weights, int* ids,
                 StreamHandle stream) {
  if (!topk_gating_supported(E, n_group))
    throw std::invalid_argument("moe_ops: topk_gating supports 1 <= E <= " + std::to_string(kGatingMaxExperts) +
                                " (group-limited: keys of a row must fit " +
                                std::to_string(kGatingMaxGroupSmem / 1024) +
                                " KiB of shared memory), got E=" + std::to_string(E));
  if (k < 1 || k > limits::kMaxK || k > E)
    throw std::invalid_argument("moe_ops: topk_gating needs 1 <= k <= min(E, " + std::to_string(limits::kMaxK) + ")");
  if (scoring != kern::kScoreSoftmax && scoring != kern::kScoreSigmoid)
    throw std::invalid_argument("moe_ops: topk_gating scoring must be 0 (softmax) or 1 (sigmoid)");
  // k may exceed the kept groups' experts: masked ones (-inf keys) fill in by index (DESIGN.md)
  if (n_group > 0 && (E % n_group != 0 || topk_group < 1 || topk_group > n_group))
    throw std::invalid_argument("moe_ops: topk_gating group arguments are inconsistent");
  if (T <= 0) return;
  kern::GatingParams p;
  p.logits = logits;
  p.bias = bias;
  p.weights = weights;
  p.ids = ids;
  p.T = T;
  p.E = E;
  p.k = k;
  p.scoring = scoring;
  p.renormalize = renormalize ? 1 : 0;
  p.n_group = n_group > 0 ? n_group : 0;
  p.topk_group = topk_group;
  p.scaling = scaling_factor;
  const Stream st = detail::to_stream(stream);
  switch (dtype) {  // float64 is rejected by the binding (DESIGN.md: the router works in float32)
    case DType::kFloat32: launch_gating<float>(p, st); break;
    case DType::kFloat16: launch_gating<__half>(p, st); break;
    case DType::kBFloat16: launch_gating<__nv_bfloat16>(p, st); break;
    default: throw std::invalid_argument("moe_ops: topk_gating supports float32/float16/bfloat16 logits");
  }
}

}  // namespace launchers
}  // namespace moe_ops
