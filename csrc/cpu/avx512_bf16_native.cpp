// Native AVX512-BF16 build of the AVX-512 kernels (vnni_kernel.inc: the packed-panel GEMM;
// bf16_combine_kernel.inc: the bf16 row combine; nt_bf16_kernel.inc: the as-stored GEMM); avx512_bf16.cpp calls them only when
// have_avx512_bf16(). Torch-free and std-free on purpose: everything here is compiled for
// AVX-512, so no inline function it instantiates may be shared with (and picked by the linker
// for) code that runs on other CPUs.
#include "avx512_bf16.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")
#include <immintrin.h>

namespace moe_cpu::avx512_native {
// An empty asm on the product keeps GCC from contracting multiply + add into an FMA.
#define MOE_NO_CONTRACT(v) __asm__("" : "+v"(v))
#define MOE_VNNI_ENTRY gemm_panels
#define MOE_C512_ENTRY combine_bf16
#define MOE_NT_ENTRY gemm_nt
#include "vnni_kernel.inc"
#include "bf16_combine_kernel.inc"
#include "nt_bf16_kernel.inc"
#undef MOE_NT_ENTRY
#undef MOE_C512_ENTRY
#undef MOE_VNNI_ENTRY
#undef MOE_NO_CONTRACT
}  // namespace moe_cpu::avx512_native
#pragma GCC pop_options
#endif
