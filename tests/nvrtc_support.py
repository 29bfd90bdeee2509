"""Shared by tests/test_nvrtc_*.py: skip when CuPy's NVRTC is absent (CI installs it, so there
these tests run), and the header parse the manifest is checked against."""
from __future__ import annotations

import os
import re

import pytest

from moe_ops import envs
from moe_ops.nvrtc import compile as nvcompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_DIR = os.path.join(ROOT, "csrc", "kernels")
ARCHS = ("80", "90a")  # what CI compiles (scripts/ptxas_report.sh's pair)


def require_nvrtc():
    """CuPy's NVRTC, or a skip -- a failure under MOE_OPS_NVRTC_REQUIRED=1 (`make test` with
    requirements-dev.txt, which installs CuPy: CI), so a broken install cannot pass as skipped."""
    try:
        return nvcompile.nvrtc()
    except nvcompile.NVRTCUnavailable as e:
        if envs.flag("MOE_OPS_NVRTC_REQUIRED"):
            pytest.fail(f"CuPy's NVRTC is required (MOE_OPS_NVRTC_REQUIRED=1) but not available: {e}")
        pytest.skip(f"CuPy's NVRTC is not available here ({e})")


_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
_GLOBAL = re.compile(r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\([^)]*\)\s*)?(?:void\s+)?(\w+)\s*\(")


def globals_by_header(kdir: str = KERNEL_DIR) -> dict:
    """header -> names of the __global__ functions it defines (comments stripped)."""
    out = {}
    for name in sorted(os.listdir(kdir)):
        if name.endswith(".cuh"):
            text = _COMMENT.sub("", open(os.path.join(kdir, name)).read())
            found = _GLOBAL.findall(text)
            if found:
                out[name] = sorted(set(found))
    return out
