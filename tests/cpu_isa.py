"""Which CPU kernel sets the build has and runs (read from ``moe_ops.build_info()["cpu"]``), and a
rerun of tests with the AVX512-BF16 kernels emulated."""
from __future__ import annotations

import sys

import torch

import moe_ops


def _cpu_isa() -> dict:
    """moe_ops.build_info()["cpu"] (which CPU kernel sets are built and run), {} without _C."""
    return moe_ops.build_info().get("cpu", {}) if hasattr(torch.ops.moe_ops, "fused_experts") else {}


def avx512_emulation_built() -> bool:
    """Whether the CPU kernels' AVX512-BF16 code is also built emulated (SIMDe), so that
    rerun_with_emulated_avx512 can run it on any CPU."""
    return bool(_cpu_isa().get("avx512_emulated"))


def vnni_kernel_runs() -> bool:
    """Whether the CPU backend's bf16 'vnni' packed layout runs here: natively (AVX512-BF16) or
    emulated (a build with SIMDe)."""
    return bool(_cpu_isa().get("avx512_bf16")) or avx512_emulation_built()


def rerun_with_emulated_avx512(test_file: str, k_expr: str) -> None:
    """Run ``pytest test_file -k k_expr`` in a subprocess with MOE_OPS_CPU_EMULATE_AVX512=1: the
    CPU ops that also have AVX2 code (bf16 combine, fused_experts on bf16 weights as stored) then
    run their AVX512-BF16 kernels through the SIMDe emulation (natively where the CPU has them).
    Asserts that the kernels were on and that the selected tests passed."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOE_OPS_CPU_EMULATE_AVX512="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    on = subprocess.run([sys.executable, "-c", "import moe_ops; print(moe_ops.build_info()['cpu']['avx512_kernels'])"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert on.stdout.strip() == "True", on.stdout + on.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", k_expr],
                         env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def quantized_kernels() -> str:
    """Which kernels moe_ops::fused_experts_quantized runs here: "avx512_bf16", "avx2" or ""."""
    return str(moe_ops.build_info().get("cpu", {}).get("quantized_experts") or "")


def rerun_with_avx2_only(test_file: str, k_expr: str) -> None:
    """Run ``pytest test_file -k k_expr`` in a subprocess with MOE_OPS_CPU_NO_AVX512=1: the CPU
    kernels then take their AVX2 code (what AVX2-only CPUs such as Zen 3 run). Asserts that the
    quantized experts' kernels were the AVX2 ones and that the selected tests passed."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOE_OPS_CPU_NO_AVX512="1")
    env.pop("MOE_OPS_CPU_EMULATE_AVX512", None)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    on = subprocess.run([sys.executable, "-c",
                         "import moe_ops; print(moe_ops.build_info()['cpu']['quantized_experts'])"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert on.stdout.strip() == "avx2", on.stdout + on.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", k_expr],
                         env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
