// Which instruction sets the CPU kernels use here, decided once per process at the first call:
// the CPU's features (__builtin_cpu_supports, which also checks that the OS saves the vector
// state), what this library was built with, and the MOE_OPS_CPU_NO_AVX2 / MOE_OPS_CPU_NO_AVX512 /
// MOE_OPS_CPU_EMULATE_AVX512 settings (moe_ops/envs.py). Every kernel entry point asks these
// functions and falls back to the next kernel set, so the one .so loads and runs on any x86-64
// (and on other CPUs the portable code is all that is built). build_info()["cpu"] reports them.
#pragma once

namespace moe_cpu {

// The AVX2+FMA+F16C kernels (else portable scalar code, same results up to FMA contraction).
bool have_avx2();

// The AVX512-BF16 kernels natively (AVX512F/BW/VL/DQ/BF16); MOE_OPS_CPU_NO_AVX512 turns it off.
bool have_avx512_bf16();
// Whether the emulated (SIMDe) build of the AVX512-BF16 kernels is in this library.
bool avx512_emulation_built();
// Whether the VNNI GEMM runs here at all: natively, or emulated.
inline bool vnni_available() { return have_avx512_bf16() || avx512_emulation_built(); }
// Whether the ops that also have AVX2 code (the bf16 combine, fused_experts on bf16 weights as
// stored) use the AVX512-BF16 kernels: natively, or emulated under MOE_OPS_CPU_EMULATE_AVX512
// (the emulation is far slower than the AVX2 code, so only tests ask for it).
bool use_avx512_bf16();

}  // namespace moe_cpu
