# Extra nvcc flags for the moe_ops CUDA kernels; included by the top-level CMakeLists.txt inside
# its MOE_OPS_CUDA block (target _C). No --use_fast_math: the router's softmax/sigmoid use the
# accurate expf so the CUDA results track the float64 reference like the other backends.
#   MOE_OPS_PTXAS_REPORT=1 (environment or -D): ptxas prints registers/spills/smem per kernel.
target_compile_options(_C PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-warn-spills -Xptxas=-warn-lmem-usage>)
if(MOE_OPS_PTXAS_REPORT OR "$ENV{MOE_OPS_PTXAS_REPORT}")
  target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-v>)
endif()
