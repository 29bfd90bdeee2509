"""Registers the compiled extension's kernels: ``cpu`` (CPU dispatch key) and ``cuda`` (CUDA key).

Both call ``torch.ops.moe_ops.<op>``; the dispatcher picks the kernel from the tensors' device.
Only ops that really have a kernel for a key are registered, so the automatic choice falls back
to the next backend for the rest.
"""
import torch

from . import _C  # noqa: F401  (loads the schemas and the kernels)
from . import autograd, backend
from .nvrtc import select as _cuda_kernels
from .ops import cpu_fused_moe, cuda_fused_moe


def _ops_with_kernel(key: str):
    return {op: getattr(torch.ops.moe_ops, op) for op in backend.OP_NAMES
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ops::{op}", key)}


# The NVRTC kernels become the CUDA kernels when they are the choice (MOE_OPS_CUDA_KERNELS,
# docs/cuda.md "CUDA without nvcc"): before the lookup below, which then finds them.
_cuda_kernels.install()

if _ops_with_kernel("CPU"):
    backend.register("cpu", ("cpu",), _ops_with_kernel("CPU"))
if torch.cuda.is_available() and _ops_with_kernel("CUDA"):
    backend.register("cuda", ("cuda",), _ops_with_kernel("CUDA"))


# The dropless layer's fused expert op (when it applies: ops.cpu_fused_moe).
if "cpu" in backend._BACKENDS and hasattr(torch.ops.moe_ops, "fused_experts"):
    backend.register_fused_moe("cpu", cpu_fused_moe)
if "cuda" in backend._BACKENDS and torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::fused_experts", "CUDA"):
    backend.register_fused_moe("cuda", cuda_fused_moe("cuda", torch.ops.moe_ops.fused_experts))

# Fakes (torch.compile, meta) and autograd formulas for every moe_ops op.
autograd.register_all()
