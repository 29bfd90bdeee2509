#!/usr/bin/env bash
# Sanitizer runs of the CUDA kernels on the SIMT host emulator (docs/sim.md).
#
#   1. builds _C_sim twice with the top-level CMake (emulator library only):
#        build-asan/  -DMOE_OPS_SANITIZER=address  (ASan + UBSan)
#        build-tsan/  -DMOE_OPS_SANITIZER=thread   (TSan)
#   2. in each, runs the emulator's own tests, the cuda_sim op tests (tests/test_<op family>.py
#      -k cuda_sim), the CUDA kernels' edge cases and the grouped GEMM / fused stage cases
#      (tests/test_cuda_{kernels,grouped_gemm}.py) with the sanitizer runtime LD_PRELOADed into python and
#      MOE_OPS_SIM_LIB pointing at that build;
#   3. runs tests/test_sanitizers.py: the planted-bug kernels must be reported (a missing
#      __syncthreads by TSan, out-of-bounds writes by ASan).
# Exits non-zero on any failure. Knobs: PY (python), MAX_JOBS, SANITIZERS ("address thread"),
# SAN_OPS_K / SAN_EMU_K / SAN_GEMM_K (the -k selections of the op tests tests/test_<op stem>.py / test_sim_emulator.py), SAN_PYTEST_ARGS (extra pytest args, e.g.
# "-x"), SKIP_BUILD=1 (reuse the builds).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
PY=$(command -v "$PY" || echo "$PY")
case "$PY" in /*) ;; *) PY="$ROOT/$PY" ;; esac  # absolute, symlinks kept (a venv's python is one)
JOBS=${MAX_JOBS:-2}
SANITIZERS=${SANITIZERS:-"address thread"}
# Default: the whole cuda_sim matrix of the op tests (every op, every kernel path: E from 1
# to 4096, k up to 32, T = 0/1/.., fp32/fp16/bf16) plus the CUDA kernels' own edge cases
# (tests/test_cuda_kernels.py); run times are in docs/sim.md ("Speed").
SAN_OPS_K=${SAN_OPS_K:-"cuda_sim"}
# the per-op backend matrix (tests/op_matrix.py), one file per op family
OP_TESTS="tests/test_topk_gating.py tests/test_permute.py tests/test_capacity.py tests/test_grouped_gemm.py"
# The CUDA GEMM's own cases the op matrix does not cover: the fused stage, hostile offsets and the
# tensor-core kernel on one shape a ring wraps on (both B layouts, both 16-bit dtypes).
SAN_GEMM_K=${SAN_GEMM_K:-"fused or hostile or (kernels and M150 and auto and (bfloat16 or float16))"}
# The emulator self-tests minus the 1024-thread blocks (the slowest to emulate under TSan).
SAN_EMU_K=${SAN_EMU_K:-"not 1024 and not 4096"}
read -r -a EXTRA <<<"${SAN_PYTEST_ARGS:-}"
CMAKE=$(dirname "$PY")/cmake; [ -x "$CMAKE" ] || CMAKE=cmake
NINJA=$(dirname "$PY")/ninja; [ -x "$NINJA" ] || NINJA=$(command -v ninja || true)

log() { printf '\n=== sanitizers: %s\n' "$*"; }

# moe_ops._C (schemas, build_info) is imported by the cuda_sim backend: build it in place if absent.
if ! ls moe_ops/_C.*.so >/dev/null 2>&1; then
  log "building moe_ops._C in place (needed by the cuda_sim backend)"
  MOE_OPS_SIM=0 "$PY" setup.py -q build_ext --inplace
fi

TORCH_PATHS=$("$PY" -c "import torch.utils.cpp_extension as c; print(';'.join(c.include_paths())); print(c.library_paths()[0])" 2>/dev/null)
TORCH_INC=$(echo "$TORCH_PATHS" | head -1)
TORCH_LIB=$(echo "$TORCH_PATHS" | tail -1)
CUDA_ROOT=${CUDA_HOME:-}
if [ -z "$CUDA_ROOT" ] || [ ! -f "$CUDA_ROOT/include/cuda_fp16.h" ]; then
  CUDA_ROOT=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")")")
  [ -f "$CUDA_ROOT/include/cuda_fp16.h" ] || CUDA_ROOT=/usr/local/cuda
fi

build() {  # $1 = address|thread, $2 = build dir
  local san=$1 dir=$2
  log "building _C_sim with MOE_OPS_SANITIZER=$san into $dir/"
  local gen=()
  [ -n "$NINJA" ] && gen=(-G Ninja "-DCMAKE_MAKE_PROGRAM=$NINJA")
  mkdir -p "$dir"
  "$CMAKE" -S . -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DPython_EXECUTABLE=$PY" -DMOE_OPS_MAIN=OFF -DMOE_OPS_SIM=ON -DMOE_OPS_CUDA=OFF \
    "-DMOE_OPS_SANITIZER=$san" "-DMOE_OPS_SIM_OUTPUT_DIR=$ROOT/$dir" "-DMOE_OPS_CUDA_HOME=$CUDA_ROOT" \
    "-DMOE_OPS_TORCH_INCLUDE_DIRS=$TORCH_INC" "-DMOE_OPS_TORCH_LIBRARY_DIR=$TORCH_LIB" >"$dir/configure.log" 2>&1 \
    || { cat "$dir/configure.log"; return 1; }
  "$CMAKE" --build "$dir" --parallel "$JOBS" --target _C_sim
}

sim_lib() { ls "$1"/_C_sim*.so 2>/dev/null | head -1; }

# Runs pytest under a sanitizer: $1 = address|thread, rest = pytest arguments. --capture=sys:
# pytest must not capture file descriptor 2, or a report written just before the sanitizer
# exits the process is lost with pytest's capture file.
run_under() {
  local san=$1; shift
  local dir=build-asan rt=libasan.so
  [ "$san" = thread ] && dir=build-tsan rt=libtsan.so
  local lib; lib=$(sim_lib "$dir")
  local preload; preload=$(gcc -print-file-name=$rt)
  # ASan intercepts __cxa_throw; python does not link libstdc++, so without it preloaded too the
  # interceptor finds no real __cxa_throw and the first C++ exception (a TORCH_CHECK) aborts.
  [ "$san" = address ] && preload="$preload $(readlink -f "$(gcc -print-file-name=libstdc++.so)")"
  # One torch/OpenMP thread: torch's own pool synchronises through uninstrumented libgomp, which
  # TSan cannot see; the emulator's threads are what is under test.
  env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MOE_OPS_SIM_LIB="$ROOT/$lib" LD_PRELOAD="$preload" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:detect_odr_violation=0:allocator_may_return_null=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:suppressions=$ROOT/scripts/tsan.supp" \
    MOE_OPS_SIM_DEADLOCK_SECONDS=20 \
    "$PY" -m pytest -q -p no:cacheprovider --capture=sys "${EXTRA[@]}" "$@"
}

status=0
for san in $SANITIZERS; do
  dir=build-asan; [ "$san" = thread ] && dir=build-tsan
  if [ "${SKIP_BUILD:-0}" != 1 ] || [ -z "$(sim_lib "$dir")" ]; then
    build "$san" "$dir" || { echo "sanitizers: $san build failed"; exit 1; }
  fi
  log "$san: emulator tests (tests/test_sim_emulator.py)"
  run_under "$san" tests/test_sim_emulator.py -k "$SAN_EMU_K" || status=1
  if [ -f tests/op_matrix.py ]; then
    # TSan: the grouped GEMM's op matrix is left to ASan (thousands of emulated warp collectives
    # under TSan cost minutes); TSan runs the GEMM through tests/test_cuda_grouped_gemm.py below.
    ops=$OP_TESTS; [ "$san" = thread ] && ops=${OP_TESTS/ tests\/test_grouped_gemm.py/}
    log "$san: cuda_sim op tests ($ops -k \"$SAN_OPS_K\")"
    # pytest exits 5 when nothing is selected (no cuda_sim kernels registered yet): not a failure.
    rc=0; run_under "$san" $ops -k "$SAN_OPS_K" || rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi
  fi
  if [ -f tests/test_cuda_kernels.py ]; then
    log "$san: CUDA kernel edge cases (tests/test_cuda_kernels.py)"
    run_under "$san" tests/test_cuda_kernels.py || status=1
  fi
  if [ -f tests/test_cuda_grouped_gemm.py ]; then
    # both GEMM kernels (tensor cores: cp.async ring, ldmatrix, mma) and the fused expert stage
    log "$san: CUDA grouped GEMM and fused stage (tests/test_cuda_grouped_gemm.py -k \"$SAN_GEMM_K\")"
    run_under "$san" tests/test_cuda_grouped_gemm.py -k "$SAN_GEMM_K" || status=1
  fi
done

log "planted bugs (tests/test_sanitizers.py)"
MOE_OPS_SANITIZERS_REQUIRED=1 "$PY" -m pytest -q -p no:cacheprovider "${EXTRA[@]}" tests/test_sanitizers.py || status=1

if [ $status -ne 0 ]; then log "FAILED"; else log "all green"; fi
exit $status
