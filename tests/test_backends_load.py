"""A backend that should run here and fails to load is a failure, not a pile of skips.

The backend modules skip their tests when a backend is unavailable (no GPU, extension not
built). That must not hide a backend that is *expected* here and broke on import: Triton on a GPU
or under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it without a GPU), the native extension
whenever its library file is present (e.g. built against another torch), and ``cuda`` on a GPU
when the extension was built with CUDA.
"""
import importlib.util

import pytest
import torch

from moe_ops import envs
import moe_ops

GPU = torch.cuda.is_available()


def _interpreted():
    return envs.flag("TRITON_INTERPRET")


def test_triton_loads():
    if not (GPU or _interpreted()):
        pytest.skip("no GPU and TRITON_INTERPRET is not 1: the triton backend has no device here")
    if importlib.util.find_spec("triton") is None and not GPU:
        pytest.skip("triton not installed (no GPU, so nothing requires it)")
    errors = moe_ops.load_errors()
    assert "triton" not in errors, f"triton backend failed to load: {errors['triton']}"
    device = "cuda" if GPU else "cpu"
    assert "triton" in moe_ops.available_backends(device=device)


def test_native_extension_loads_when_built():
    if importlib.util.find_spec("moe_ops._C") is None:
        pytest.skip("native extension not built")
    errors = moe_ops.load_errors()
    assert "cpu" not in errors, f"moe_ops._C is present but does not load: {errors['cpu']}"
    assert "cpu" in moe_ops.available_backends(device="cpu")


@pytest.mark.skipif(not GPU, reason="no GPU")
def test_cuda_loads_when_built_with_cuda():
    info = moe_ops.build_info()
    assert info.get("native"), f"moe_ops._C does not load: {info.get('error')}"
    if not info.get("cuda"):
        pytest.skip("extension built without CUDA (MOE_OPS_CUDA=0 or no nvcc at build time)")
    errors = moe_ops.load_errors()
    assert "cuda" not in errors, f"cuda backend failed to load: {errors['cuda']}"
    assert "cuda" in moe_ops.available_backends(device="cuda")
