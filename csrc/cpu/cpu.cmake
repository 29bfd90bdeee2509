# CPU-kernel build settings (included by CMakeLists.txt for the _C target).
#
# The AVX512-BF16 kernels (*_avx512.cpp, left out of _C's glob) are compiled once per instruction
# set, as ATen's CPU_CAPABILITY files are: one OBJECT library per build, the same sources, the
# namespace given by -DMOE_CPU_AVX512_NS (avx512_bf16_isa.h), linked into _C.
#   native: GCC >= 10 on x86-64, with the AVX-512 target flags; used where the CPU has them.
#   emulated: through SIMDe (pip package simde-py, headers only), so the kernels run and are tested
#     on CPUs without AVX-512. Without SIMDe the bf16 'vnni' packed layout is available only where
#     the CPU has AVX512-BF16 (and the build still succeeds).
set(MOE_OPS_CPU_AVX512_SOURCES
  ${CMAKE_SOURCE_DIR}/csrc/cpu/gemm_vnni_avx512.cpp
  ${CMAKE_SOURCE_DIR}/csrc/cpu/combine_row_bf16_avx512.cpp
  ${CMAKE_SOURCE_DIR}/csrc/cpu/pack_vnni_avx512.cpp
  ${CMAKE_SOURCE_DIR}/csrc/cpu/gemv_quant_avx512.cpp)

# One compilation of the AVX512-BF16 kernels into namespace moe_cpu::<ns>, linked into _C.
function(moe_ops_cpu_avx512_build target ns)
  add_library(${target} OBJECT ${MOE_OPS_CPU_AVX512_SOURCES})
  target_compile_definitions(${target} PRIVATE MOE_CPU_AVX512_NS=${ns} _GLIBCXX_USE_CXX11_ABI=${MOE_OPS_CXX11_ABI})
  set_target_properties(${target} PROPERTIES CXX_VISIBILITY_PRESET hidden)
  if(OpenMP_CXX_FOUND)  # as _C's own sources (SIMDe vectorises its loops with `omp simd` then)
    target_compile_options(${target} PRIVATE ${OpenMP_CXX_FLAGS})
  endif()
  target_link_libraries(_C PRIVATE ${target})
endfunction()

if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 10
   AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
  moe_ops_cpu_avx512_build(moe_ops_cpu_avx512_native avx512_native)
  target_compile_options(moe_ops_cpu_avx512_native PRIVATE
    -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma -mavx2)
  target_compile_definitions(_C PRIVATE MOE_OPS_HAVE_AVX512_NATIVE=1)
  message(STATUS "moe_ops: native AVX512-BF16 kernels built")
else()
  message(STATUS "moe_ops: no native AVX512-BF16 kernels (need GCC >= 10 on x86-64)")
endif()

execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import simde_py; print(simde_py.get_include())"
  OUTPUT_VARIABLE MOE_OPS_SIMDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(MOE_OPS_SIMDE_DIR AND EXISTS "${MOE_OPS_SIMDE_DIR}/simde/x86/avx512.h")
  message(STATUS "moe_ops: SIMDe at ${MOE_OPS_SIMDE_DIR}: emulated AVX512-BF16 kernels built")
  moe_ops_cpu_avx512_build(moe_ops_cpu_avx512_emu avx512_emu)
  target_compile_definitions(moe_ops_cpu_avx512_emu PRIVATE MOE_CPU_AVX512_EMULATED=1)
  target_include_directories(moe_ops_cpu_avx512_emu SYSTEM PRIVATE ${MOE_OPS_SIMDE_DIR})
  # SIMDe passes 512-bit vectors by value without AVX-512 enabled: GCC notes the ABI, harmlessly
  # (the vectors never cross into code compiled otherwise).
  target_compile_options(moe_ops_cpu_avx512_emu PRIVATE -Wno-psabi)
  target_compile_definitions(_C PRIVATE MOE_OPS_HAVE_SIMDE=1)
else()
  message(STATUS "moe_ops: SIMDe not found (pip install simde-py): no emulated AVX512-BF16 kernels")
endif()
