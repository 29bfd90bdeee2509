"""Where the ``cuda`` backend's kernels come from -- ``"nvcc"`` (built into the extension),
``"nvrtc"`` (csrc/kernels compiled at first use, this package) or none -- and the registration of
the NVRTC kernels as the CUDA kernels of the ``moe_ops`` ops.

``MOE_OPS_CUDA_KERNELS``: ``auto`` (nvcc-built kernels when the extension has them, else NVRTC
when a GPU, CuPy and the kernel sources are present), ``nvcc`` (never NVRTC), ``nvrtc`` (NVRTC
even over nvcc-built kernels, e.g. to compare both; in another process, as the registration is
per process). :func:`install` runs once, from moe_ops/_register_native.py, before the ``cuda``
backend looks up which ops have CUDA kernels; it never raises (the ``cpu`` backend loads from
the same module), it records why instead: ``moe_ops.build_info()["cuda_kernels"]``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

from .. import envs

MODES = ("auto", "nvcc", "nvrtc")
_state: Dict[str, Optional[str]] = {"source": None, "reason": "not decided: the cuda backend was not loaded yet"}
_lib = None  # the torch.library.Library holding the NVRTC registrations (kept alive)


def info() -> Dict[str, Optional[str]]:
    """{"source": "nvcc" | "nvrtc" | None, "reason": why}."""
    return {"source": _state["source"], "reason": _state["reason"]}


def nvrtc_unavailable_reason() -> Optional[str]:
    """Why the NVRTC path cannot work here (CuPy / libnvrtc, kernel sources, CUDA headers), or None."""
    from . import compile as nvcompile, sources
    try:
        nv = nvcompile.nvrtc()
        sources.kernel_dir()
        sources.toolkit_include_dir()
        import cupy_backends.cuda.api.driver  # noqa: F401  (the launch side)
        import torch
        major, minor = torch.cuda.get_device_capability()
        supported = tuple(nv.getSupportedArchs())
        if major * 10 + minor not in supported:
            return (f"NVRTC {'.'.join(map(str, nvcompile.nvrtc_version()))} cannot compile for this GPU "
                    f"(sm_{major}{minor}; it supports {supported}): a newer CuPy/NVRTC is needed")
    except Exception as e:
        return str(e)
    return None


def decide(mode: str, cuda_available: bool, nvcc_kernels: bool,
           nvrtc_problem: Callable[[], Optional[str]]) -> Dict[str, object]:
    """The choice, as data: {"source", "reason", "register_nvrtc"}. ``nvrtc_problem`` is asked
    only when NVRTC would be used (it loads libnvrtc)."""
    nvcc = ("nvcc", "compiled by nvcc when the extension was built")
    if mode not in MODES:
        src, why = nvcc if nvcc_kernels else (None, "no CUDA kernels")
        return {"source": src, "reason": f"{why}; MOE_OPS_CUDA_KERNELS={mode!r} is not one of {MODES}",
                "register_nvrtc": False}
    if mode == "nvcc" or (mode == "auto" and nvcc_kernels):
        if nvcc_kernels:
            return {"source": nvcc[0], "reason": nvcc[1], "register_nvrtc": False}
        return {"source": None, "reason": "MOE_OPS_CUDA_KERNELS=nvcc, and the extension was built without CUDA "
                "kernels (no nvcc at install time)", "register_nvrtc": False}
    fallback = (nvcc[0], nvcc[1] + "; NVRTC was asked for (MOE_OPS_CUDA_KERNELS=nvrtc) but ") if nvcc_kernels \
        else (None, "the extension was built without CUDA kernels (no nvcc at install time) and ")
    if not cuda_available:
        return {"source": fallback[0], "reason": fallback[1] + "no GPU is visible (torch.cuda.is_available() is "
                "False): the NVRTC path compiles for the GPU present at first use", "register_nvrtc": False}
    problem = nvrtc_problem()
    if problem is not None:
        return {"source": fallback[0], "reason": fallback[1] + f"the NVRTC path is unavailable: {problem}",
                "register_nvrtc": False}
    why = "MOE_OPS_CUDA_KERNELS=nvrtc" if mode == "nvrtc" else "the extension was built without CUDA kernels"
    return {"source": "nvrtc", "reason": f"{why}: csrc/kernels compiled by NVRTC at first use for this GPU, cached "
            "in MOE_OPS_CACHE_DIR (default ~/.cache/moe_ops)/nvrtc", "register_nvrtc": True}


def _nvcc_kernels(op_names) -> bool:
    import torch
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ops::{op}", "CUDA") for op in op_names)


def register_nvrtc_kernels() -> list:
    """Register :data:`moe_ops.nvrtc.ops.IMPLS` as the CUDA kernels of the ``moe_ops`` ops (over
    nvcc-built ones when forced; torch warns about that override, which is the point)."""
    global _lib
    import torch
    from . import ops
    if _lib is None:
        _lib = torch.library.Library("moe_ops", "IMPL")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verriding a previously registered kernel.*")
            for name, fn in ops.IMPLS.items():
                if hasattr(torch.ops.moe_ops, name):  # a native-only op an older extension lacks
                    _lib.impl(name, fn, "CUDA")
    return sorted(n for n in ops.IMPLS if hasattr(torch.ops.moe_ops, n))


def install() -> Dict[str, Optional[str]]:
    """Decide once per process and register the NVRTC kernels when they are the choice."""
    global _state
    if _state.get("decided"):
        return info()
    try:
        import torch
        from ..backend import OP_NAMES
        choice = decide(envs.get("MOE_OPS_CUDA_KERNELS"), torch.cuda.is_available(), _nvcc_kernels(OP_NAMES),
                        nvrtc_unavailable_reason)
        if choice["register_nvrtc"]:
            register_nvrtc_kernels()
    except Exception as e:  # never take the cpu backend down with the CUDA choice
        choice = {"source": None, "reason": f"choosing the CUDA kernels failed: {type(e).__name__}: {e}"}
    _state = {"source": choice["source"], "reason": choice["reason"], "decided": True}
    return info()
