// oneDNN's micro-GEMM ("brgemm" ukernel) as ATen exposes it (at::native::cpublas::brgemm, the
// library behind torch's own bf16 matmul on CPUs with AVX512-BF16 or AMX), for the bf16 expert
// GEMMs (vnni_experts.h): bf16 x bf16 -> float32 on B in the VNNI block layout.
//
// B layout: K/2 rows of ldb (k even, k odd) pairs -- for ldb = 32 one block of the 'vnni'
// packing (avx512_bf16.h kVnniBlock), so pack_experts(layout='vnni') weights are brgemm operands
// as they are. Without AMX, ATen's cpublas::pack refuses to pack (could_pack is false), which is
// why the packing is moe_ops' own. Measured on AVX512-BF16 without AMX (AMD Zen 4, docs/cpu.md "oneDNN brgemm (issue
// 15)"): each output is one vdpbf16ps chain over the pairs in ascending order, bitwise equal to
// gemm_panels_vnni and independent of M and the column block -- checked by
// bench/cpu_brgemm_micro.py --check and, through the op, by tests/test_cpu_packed.py.
#pragma once

#include <cstdint>

namespace moe_cpu {

// Whether brgemm runs here: this torch was built with the oneDNN ukernel (a one-time probe call
// that must give the exact product), oneDNN is enabled (torch.backends.mkldnn.enabled, asked at
// every call) and the CPU has AVX512-BF16 natively (have_avx512_bf16: MOE_OPS_CPU_NO_AVX512 turns
// it off as well).
bool brgemm_available();
// Whether the bf16 VNNI expert GEMMs (vnni_experts.h) use it: where available, on CPUs with
// AMX-BF16 (where oneDNN runs it on AMX tiles; untimed and its rounding unchecked until measured
// on such a CPU, docs/cpu.md), or as MOE_OPS_CPU_BRGEMM says (1: on, 0: off; read at every call).
// Without AMX the own kernel is measured faster in the layer (it prefetches the next block), and
// both give the same bits (checked by tests/test_cpu_packed.py with MOE_OPS_CPU_BRGEMM=1).
bool brgemm_chosen();

// C[i*ldc + j] = sum_k A[i*lda + k] * B[(k/2)*ldb*2 + 2*j + k%2]   for i < M, j < N <= ldb, k < K
// K even (an odd K is padded to a pair by the packing, with a zero weight and a finite A pad).
void brgemm_bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 float* C, int64_t ldc);
// Ends this thread's use of brgemm (the AMX tile state; a no-op without AMX): after a thread's
// run of tiles.
void brgemm_done();

}  // namespace moe_cpu
