"""The sanitizer builds of the emulator catch what they are there for.

scripts/sanitizers.sh builds _C_sim with ASan+UBSan (build-asan/) and TSan (build-tsan/). Here
each planted-bug kernel (tests/csrc/planted_bugs.cuh) runs in a subprocess under its sanitizer and
the report must appear, naming the kernel; the same harness on correct kernels must stay silent
(a harness that always reports proves nothing). Skipped when a build is absent, unless
MOE_OPS_SANITIZERS_REQUIRED=1 (set by scripts/sanitizers.sh, which builds them first).
"""
import glob
import os
import subprocess
import sys
import textwrap

import pytest
from moe_ops import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILDS = {"address": ("build-asan", "libasan.so"), "thread": ("build-tsan", "libtsan.so")}
REQUIRED = envs.flag("MOE_OPS_SANITIZERS_REQUIRED")


def _lib(san):
    found = sorted(glob.glob(os.path.join(ROOT, BUILDS[san][0], "_C_sim*.so")))
    return found[0] if found else None


def _runtime(name):
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


CASES = {
    "race": "st.planted_race(torch.randn(128))",
    "oob": "st.planted_oob(100)",
    "smem_oob": "st.planted_smem_oob(torch.randn(64))",
    "clean": textwrap.dedent("""
        x = torch.randn(3000)
        st.block_sum(x, 256, 3)
        st.warp_ops(torch.randint(-9, 9, (128,), dtype=torch.int32), 64)
        st.early_exit(torch.randint(-5, 9, (256,), dtype=torch.int32))
        st.histogram(torch.randint(-1, 20, (1000,), dtype=torch.int32), 17, 3, 64)
        st.block_reverse(torch.randn(300), 100, 64)
        # tensor cores + async copies: the correct tiled GEMM of planted_bugs.cuh, and cp.async's
        # deferred copies (performed by the issuing thread at its wait, ordered by the barrier)
        for dt in (torch.bfloat16, torch.float16):
            a, b = torch.randn(32, 32).to(dt), torch.randn(48, 32).to(dt)
            c = st.tiled_gemm(a, b, 0)
            assert torch.allclose(c.double(), a.double() @ b.double().T, rtol=1e-4, atol=1e-3), "tiled_gemm"
        st.cp_async(torch.randint(1, 255, (2, 2560), dtype=torch.uint8), torch.arange(32, dtype=torch.int32) % 17)
        for what in ("bad_shuffle", "deadlock", "trap"):
            try:
                st.misuse(what, 64)
                raise SystemExit("misuse did not raise: " + what)
            except RuntimeError:
                pass
    """),
}


def _run(san, case):
    lib = _lib(san)
    preload = _runtime(BUILDS[san][1])
    if lib is None or preload is None:
        why = f"{BUILDS[san][0]}/_C_sim*.so not built (scripts/sanitizers.sh)" if lib is None else \
            f"gcc has no {BUILDS[san][1]}"
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    script = "import torch\ntorch.ops.load_library(%r)\nst = torch.ops.moe_ops_simtest\n%s\nprint('DONE')\n" % (
        lib, CASES[case])
    if san == "address":
        # ASan's __cxa_throw interceptor needs libstdc++ loaded before python dlopens torch.
        libstdcxx = _runtime("libstdc++.so")
        if libstdcxx:
            preload += " " + os.path.realpath(libstdcxx)
    env = dict(os.environ, LD_PRELOAD=preload, OMP_NUM_THREADS="1",
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               TSAN_OPTIONS="halt_on_error=1:exitcode=66",
               MOE_OPS_SIM_DEADLOCK_SECONDS="10")
    env.pop("MOE_OPS_SIM_LIB", None)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def _assert_reported(proc, *needles):
    """Every needle (a string, or a tuple of alternatives) is in the output of a stopped run."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "DONE" not in proc.stdout, f"sanitizer did not stop the run:\n{out[-4000:]}"
    for needle in needles:
        alternatives = needle if isinstance(needle, tuple) else (needle,)
        assert any(a in out for a in alternatives), f"{needle!r} missing from the sanitizer report:\n{out[-6000:]}"


def test_tsan_reports_missing_syncthreads():
    proc = _run("thread", "race")
    _assert_reported(proc, "WARNING: ThreadSanitizer: data race", "planted_race_kernel", "planted_bugs.cuh",
                     "planted_race_kernel(float const*, float*)::tile")


def test_asan_reports_write_past_a_torch_buffer():
    proc = _run("address", "oob")
    _assert_reported(proc, "ERROR: AddressSanitizer: heap-buffer-overflow", "WRITE of size 4", "planted_oob_kernel")


def test_asan_reports_write_past_a_shared_array():
    proc = _run("address", "smem_oob")
    # Whichever of the two sees it first: ASan's redzone around the static, or UBSan's object-size
    # check (it knows the array's extent even through a pointer).
    _assert_reported(proc, ("ERROR: AddressSanitizer: global-buffer-overflow",
                            "runtime error: store to address"), "planted_smem_oob_kernel", "planted_bugs.cuh:")


@pytest.mark.parametrize("san", ["address", "thread"])
def test_correct_kernels_run_clean(san):
    proc = _run(san, "clean")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DONE" in proc.stdout, f"clean run failed under {san}:\n{out[-6000:]}"
    assert "Sanitizer" not in out and "runtime error" not in out, out[-6000:]
