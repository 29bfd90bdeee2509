// Native AVX512-BF16 build of the VNNI panel kernel (vnni_kernel.inc); vnni.cpp calls it only
// when have_avx512_bf16(). Torch-free and std-free on purpose: everything here is compiled for
// AVX-512, so no inline function it instantiates may be shared with (and picked by the linker
// for) code that runs on other CPUs.
#include "vnni.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,avx2")
#include <immintrin.h>

namespace moe_cpu::vnni_native {
#define MOE_VNNI_ENTRY gemm_panels
#include "vnni_kernel.inc"
#undef MOE_VNNI_ENTRY
}  // namespace moe_cpu::vnni_native
#pragma GCC pop_options
#endif
