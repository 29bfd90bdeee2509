"""Every environment variable moe-ops reads, in one table (name, default, what it does, who reads it).

Python code reads them through :func:`get`; the C++ reads are listed here too, so this table (and
the README's, which tests/test_envs.py checks against it) is the whole list. A variable read
anywhere else is a test failure.
"""
from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional


class Setting(NamedTuple):
    name: str
    default: Optional[str]
    doc: str
    read_by: str  # "python", "c++", "build" (setup.py / CMake / Makefile), "tests" or "gpu-check"


_SETTINGS = [
    # --- run time, Python
    Setting("MOE_OPS_BACKEND", None, "backend for every op when `backend=` is not given "
            "(reference, cpu, cuda, cuda_sim, triton); unset: the fastest present", "python"),
    Setting("MOE_OPS_VALUE_CHECKS", "auto", "checks that read tensor values (ids in range, offsets "
            "monotone): auto = CPU tensors only, 1 = CUDA too (a sync per op), 0 = never", "python"),
    Setting("MOE_OPS_NVTX", "0", "1: push NVTX ranges named moe_ops.* when CUDA is present, without "
            "a torch profiler (docs/profiling.md)", "python"),
    Setting("MOE_OPS_TRITON_CONFIG_DIR", None, "extra folder of tuned Triton GEMM configs "
            "(JSON per E, N, device; docs/triton.md)", "python"),
    Setting("MOE_OPS_CUDA_KERNELS", "auto", "where the `cuda` backend's kernels come from: auto (nvcc-built "
            "when the extension has them, else NVRTC at first use when CuPy is installed), nvcc, nvrtc "
            "(even when nvcc-built ones exist; docs/cuda.md)", "python"),
    Setting("MOE_OPS_CACHE_DIR", None, "folder of moe_ops' on-disk caches (NVRTC cubins in <it>/nvrtc); "
            "unset: ~/.cache/moe_ops", "python"),
    Setting("MOE_OPS_SIM_LIB", None, "path of the SIMT emulator library to load instead of "
            "moe_ops/_C_sim*.so (the sanitizer builds)", "python"),
    Setting("TRITON_INTERPRET", "0", "Triton's own switch: 1 runs Triton kernels on CPU through its "
            "interpreter (set before triton is imported); the triton backend then takes CPU tensors",
            "python"),
    # --- run time, C++
    Setting("MOE_OPS_CPU_CACHE_MB", "512", "size cap of the CPU backend's cache of output/scratch "
            "blocks (csrc/cpu/host_alloc.cpp)", "c++"),
    Setting("MOE_OPS_CPU_NO_AVX2", None, "set: CPU kernels take their portable paths", "c++"),
    Setting("MOE_OPS_CPU_NO_AVX512", None, "set: no AVX512-BF16 kernels even where the CPU has "
            "them", "c++"),
    Setting("MOE_OPS_CPU_BRGEMM", None, "`1`/`0`: the bf16 expert GEMMs on oneDNN's brgemm or not "
            "(default: on only on CPUs with AMX-BF16)", "c++"),
    Setting("MOE_OPS_CPU_GEMV_ROWS", "4", "quantized experts (fused_experts_quantized): tiles of at most "
            "this many rows an expert run the decode GEMV on the quantized rows as stored, larger ones "
            "repack to VNNI panels (0: never the GEMV)", "c++"),
    Setting("MOE_OPS_CPU_EMULATE_AVX512", None, "set: run the AVX512-BF16 kernels through their "
            "SIMDe emulation (testing on CPUs without them)", "c++"),
    Setting("MOE_OPS_CUDA_GEMM", None, "`simt`: the CUDA grouped GEMMs on CUDA cores only (default: "
            "tensor cores for bf16/fp16 with 16-byte aligned rows on sm_80+)", "c++"),
    Setting("MOE_OPS_SIM_BLOCK_ORDER", None, "SIMT emulator: `reverse` runs blocks in reverse order "
            "(testing order independence)", "c++"),
    Setting("MOE_OPS_SIM_DEADLOCK_SECONDS", "2.0", "SIMT emulator: a block stuck this long at a "
            "barrier is reported as a deadlock", "c++"),
    # --- build
    Setting("MOE_OPS_CUDA", "auto", "compile the CUDA kernels: auto (when nvcc and a CUDA torch "
            "exist), 0, 1", "build"),
    Setting("MOE_OPS_SIM", "1", "also build the SIMT emulator library _C_sim", "build"),
    Setting("MOE_OPS_BUILD_DIR", "build", "CMake build folder", "build"),
    Setting("TORCH_CUDA_ARCH_LIST", "8.0;9.0a", "CUDA archs to compile for", "build"),
    Setting("MAX_JOBS", "nproc", "parallel compile jobs", "build"),
    Setting("CUDA_HOME", None, "CUDA toolkit root (else CUDA_PATH, else found from the nvcc on PATH)",
            "build"),
    Setting("CUDA_PATH", None, "CUDA toolkit root when CUDA_HOME is unset", "build"),
    # --- tests
    Setting("MOE_OPS_TEST_THREADS", None, "torch.set_num_threads(n) for the test run", "tests"),
    Setting("MOE_OPS_TEST_FULL", None, "1: emulated backends get the full test matrix", "tests"),
    Setting("MOE_OPS_TEST_SELF", None, "1: the op tests (tests/op_matrix.py) also run the reference as a backend against "
            "itself", "tests"),
    Setting("LD_PRELOAD", None, "the loader's own variable: tests read it to tell they run under a "
            "sanitizer runtime (scripts/sanitizers.sh preloads libtsan/libasan)", "tests"),
    # --- the GPU check (scripts/gpu_check.py sets GPU_CHECK_* for its pytest plugin)
    Setting("OUT", "gpu-check-out", "make gpu-check: folder the check writes its files into", "gpu-check"),
    Setting("GPU_CHECK_RESULTS", None, "internal: file the pytest plugin writes its results to", "gpu-check"),
    Setting("GPU_CHECK_SHARD", "0/1", "internal: i/n, the shard of the selected tests this run takes",
            "gpu-check"),
    Setting("GPU_CHECK_SAMPLE", "0", "internal: how many CPU-device tests to sample besides the GPU ones",
            "gpu-check"),
    Setting("GPU_CHECK_DEADLINE", "inf", "internal: time.time() after which remaining tests are skipped",
            "gpu-check"),
    Setting("MOE_OPS_SANITIZERS_REQUIRED", None, "1: a missing sanitizer build fails the sanitizer "
            "tests (CI) instead of skipping them", "tests"),
    Setting("MOE_OPS_NVRTC_REQUIRED", None, "1: a missing CuPy NVRTC fails the NVRTC tests instead of skipping "
            "them (`make test` sets it when its requirements install CuPy)", "tests"),
]

SETTINGS: Dict[str, Setting] = {s.name: s for s in _SETTINGS}


def get(name: str) -> Optional[str]:
    """The value of setting ``name`` (its default when unset; an empty value counts as unset)."""
    s = SETTINGS[name]  # a KeyError here is a setting missing from the table
    v = os.environ.get(name)
    return s.default if v is None or v == "" else v


def raw(name: str) -> Optional[str]:
    """The value of setting ``name`` as set (None when unset or empty), for readers whose default
    is computed (a path, the core count)."""
    SETTINGS[name]  # a KeyError here is a setting missing from the table
    v = os.environ.get(name)
    return None if v == "" else v


def flag(name: str) -> bool:
    """Whether a 0/1 setting is on."""
    return (get(name) or "0") not in ("0", "")


def markdown_table() -> str:
    """The README's settings table."""
    rows = ["| variable | default | read by | what |", "| --- | --- | --- | --- |"]
    for s in _SETTINGS:
        rows.append(f"| `{s.name}` | {'`' + s.default + '`' if s.default else '--'} | {s.read_by} | {s.doc} |")
    return "\n".join(rows)
