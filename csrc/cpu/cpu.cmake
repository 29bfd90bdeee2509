# CPU-kernel build settings (included by CMakeLists.txt for the _C target).
#
# SIMDe (pip package simde-py, headers only) lets avx512_bf16_emu.cpp compile the AVX512-BF16 panel
# kernel into portable code, so the kernel runs and is tested on CPUs without AVX-512. Without
# it the bf16 'vnni' packed layout is available only where the CPU has AVX512-BF16.
execute_process(
  COMMAND ${Python_EXECUTABLE} -c "import simde_py; print(simde_py.get_include())"
  OUTPUT_VARIABLE MOE_OPS_SIMDE_DIR OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(MOE_OPS_SIMDE_DIR AND EXISTS "${MOE_OPS_SIMDE_DIR}/simde/x86/avx512.h")
  message(STATUS "moe_ops: SIMDe at ${MOE_OPS_SIMDE_DIR}: emulated AVX512-BF16 kernel built")
  target_include_directories(_C SYSTEM PRIVATE ${MOE_OPS_SIMDE_DIR})
  target_compile_definitions(_C PRIVATE MOE_OPS_HAVE_SIMDE=1)
  # SIMDe passes 512-bit vectors by value without AVX-512 enabled: GCC notes the ABI, harmlessly
  # (everything stays inside this file).
  set_source_files_properties(${CMAKE_SOURCE_DIR}/csrc/cpu/avx512_bf16_emu.cpp PROPERTIES COMPILE_OPTIONS "-Wno-psabi")
else()
  message(STATUS "moe_ops: SIMDe not found (pip install simde-py): no emulated AVX512-BF16 kernel")
endif()
