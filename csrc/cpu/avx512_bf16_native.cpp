// Native AVX512-BF16 build of the AVX-512 kernels (avx512_kernels.inc: the packed-panel GEMM,
// the as-stored GEMM, the bf16 row combine); avx512_bf16.cpp calls them only when
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
#include "avx512_kernels.inc"
#undef MOE_NO_CONTRACT
}  // namespace moe_cpu::avx512_native
#pragma GCC pop_options
#endif
