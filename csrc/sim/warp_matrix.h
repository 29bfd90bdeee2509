// SIMT host emulator: functional models of the sm_80 warp matrix and async-copy instructions
// behind csrc/kernels/mma.cuh (which includes this under MOE_OPS_SIM only). Semantics, strictness
// and the mma summation order: docs/sim.md ("Tensor-core and async-copy models").
//
//   ldmatrix / mma_m16n8k16   warp collectives over a per-lane payload (warp_exchange): every one
//                             of the warp's 32 lanes must take part, the last arrival computes all
//                             lanes' results (csrc/sim/warp_matrix.cpp).
//   cp_async*                 per-thread deferred copies: recorded at issue, performed (in issue
//                             order, by the issuing thread) by the wait that retires their group.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe_sim {

// A warp collective with up to kWarpPayloadBytes of input and of output per lane. All 32 lanes of
// the warp must call it with the same `combine` (else it raises, as for the shuffles); the last to
// arrive runs combine(in, out) on every lane's input (in[lane]) and each lane then receives
// out[lane]. An exception from `combine` is raised in every lane. `what` names it in errors.
constexpr size_t kWarpPayloadBytes = 64;
using WarpCombine = void (*)(const unsigned char (*in)[kWarpPayloadBytes], unsigned char (*out)[kWarpPayloadBytes]);
void warp_exchange(const char* what, WarpCombine combine, const void* in, size_t in_bytes, void* out, size_t out_bytes);

// ldmatrix.sync.aligned.m8n8.x<num>[.trans].shared.b16: regs[0..num) of this lane.
void ldmatrix(int num, bool trans, uint32_t* regs, const void* smem_row);

enum class MmaInput : int { kBF16, kF16 };
// mma.sync.aligned.m16n8k16.row.col.f32.<type>.<type>.f32: d[4] of this lane.
void mma_m16n8k16(MmaInput type, float* d, const uint32_t* a, const uint32_t* b, const float* c);

// cp.async.{ca,cg}.shared.global with cp-size `cp_size` (4, 8, 16) and src-size `src_bytes`.
void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
// Runtime only: forgets the calling thread's copies (at the start and end of every block).
void cp_async_reset();

}  // namespace moe_sim
