"""Registers the compiled extension's kernels: ``cpu`` (CPU dispatch key) and ``cuda`` (CUDA key).

Both call ``torch.ops.moe_ops.<op>``; the dispatcher picks the kernel from the tensors' device.
Only ops that really have a kernel for a key are registered, so the automatic choice falls back
to the next backend for the rest.
"""
import torch

from . import _C  # noqa: F401  (loads the schemas and the kernels)
from . import autograd, backend
from ._profiling import stage


def _ops_with_kernel(key: str):
    return {op: getattr(torch.ops.moe_ops, op) for op in backend.OP_NAMES
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ops::{op}", key)}


if _ops_with_kernel("CPU"):
    backend.register("cpu", ("cpu",), _ops_with_kernel("CPU"))
if torch.cuda.is_available() and _ops_with_kernel("CUDA"):
    backend.register("cuda", ("cuda",), _ops_with_kernel("CUDA"))


def _cpu_fused_moe(x, router_logits, w_gate_up, w_down, k, *, activation="swiglu", scoring="softmax",
                   renormalize=False, n_group=None, topk_group=None, correction_bias=None,
                   scaling_factor=1.0, packed=None):
    """``moe_forward``'s dropless layer on the ``cpu`` backend: router kernel, then the fused
    expert op ``moe_ops::fused_experts`` (csrc/cpu/fused_moe.cpp: gather -> GEMM1 + gated
    activation -> GEMM2 -> weighted combine, no intermediate permuted tensors). The fused op has no
    autograd formula and no float64 kernel: those calls run the unfused ``cpu`` ops instead.
    With ``packed`` (:func:`moe_ops.pack_experts`) the experts run ``moe_ops::fused_experts_packed``
    (csrc/cpu/fused_moe_packed.cpp), the same pipeline on the panel GEMM."""
    from . import ops

    with stage("router"):
        weights, ids = ops.topk_gating(router_logits, k, scoring=scoring, renormalize=renormalize,
                                       n_group=n_group, topk_group=topk_group, correction_bias=correction_bias,
                                       scaling_factor=scaling_factor, backend="cpu")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, router_logits, w_gate_up, w_down, correction_bias) if t is not None)
    if x.dtype == torch.float64 or needs_grad:
        return ops.experts_forward(x, weights, ids, w_gate_up, w_down, activation=activation, backend="cpu")
    # One op runs dispatch, experts and combine interleaved per expert: its three stage ranges
    # nest around it (equal spans), so every trace of the layer names all four stages.
    with stage("dispatch"), stage("experts"), stage("combine"):
        if packed is not None:
            return torch.ops.moe_ops.fused_experts_packed(x, ids, weights, packed.w_gate_up, packed.w_down,
                                                          activation)
        return torch.ops.moe_ops.fused_experts(x, ids, weights, w_gate_up, w_down, activation)


if "cpu" in backend._BACKENDS and hasattr(torch.ops.moe_ops, "fused_experts"):
    backend.register_fused_moe("cpu", _cpu_fused_moe)

# Fakes (torch.compile, meta) and autograd formulas for every moe_ops op.
autograd.register_all()
