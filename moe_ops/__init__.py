"""moe-ops: fast Mixture-of-Experts kernels (CUDA, Triton, CPU) behind one op contract.

Pipeline: router (:func:`topk_gating`) -> dispatch (:func:`permute` / :func:`capacity_dispatch`)
-> experts (:func:`grouped_gemm`) -> combine (:func:`unpermute` / :func:`capacity_combine`);
:func:`moe_forward` runs them all. Every op has a pure-PyTorch oracle in
:mod:`moe_ops.reference` and kernels in several backends (:func:`available_backends`).
"""
from .backend import available_backends, load_errors
from .layer import MoE, MoEAux
from .quant import dequantize_experts, quantize_experts
from .ops import (
    DispatchResult,
    PackedExperts,
    PermuteResult,
    capacity_combine,
    capacity_dispatch,
    expert_capacity,
    grouped_gemm,
    grouped_gemm_wgrad,
    moe_forward,
    pack_experts,
    permute,
    to_local_ids,
    topk_gating,
    unpermute,
)

from . import integrations  # noqa: F401  (light: moe_ops.integrations.transformers imports transformers)

__version__ = "0.1.0"


def build_info() -> dict:
    """What the native extension was built with: version, torch, CUDA archs, kernels present."""
    try:
        from . import _C
    except ImportError as e:
        return {"version": __version__, "native": False, "error": str(e), "backends": available_backends()}
    info = dict(_C.build_info())
    info["native"] = True
    info["backends"] = available_backends()
    from .nvrtc import select  # where the CUDA kernels come from: "nvcc", "nvrtc" or None, and why
    info["cuda_kernels"] = select.info()
    return info


__all__ = [
    "MoE", "MoEAux", "available_backends", "build_info", "capacity_combine", "capacity_dispatch", "expert_capacity",
    "grouped_gemm", "grouped_gemm_wgrad", "load_errors", "moe_forward", "permute", "to_local_ids", "topk_gating",
    "unpermute", "PermuteResult", "DispatchResult", "PackedExperts", "pack_experts", "dequantize_experts",
    "quantize_experts",
]
