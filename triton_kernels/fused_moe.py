"""The whole dropless MoE layer on the Triton backend, with a launch count independent of E.

    topk_gating                       1 launch   (topk_gating.py)
    index build (rank, scan, place)   3 launches (index_build.py; the scan also writes the GEMM
                                                  tile schedule, so no separate schedule kernel)
    GEMM1: gather x rows + SwiGLU     1 launch   -> h[T*k, I]  (rows in expert order)
    GEMM2: * router weight, scatter   1 launch   -> y[T*k, H]  (rows in slot order; out[T, H] if k == 1)
    k-sum                             1 launch   (weighted_combine.py; skipped when k == 1)

No permuted copy of x and no separate permute/unpermute passes. The scatter writes each slot's
weighted row (in x's dtype, as vLLM's fused_moe) and a fixed-order k-sum adds them in float32:
deterministic, no float atomics. When autograd needs the graph (inputs requiring grad), the
layer runs the unfused op chain instead, whose ops have registered derivatives.

:func:`fused_moe_quantized_forward` is the same layer on weight-only quantized experts
(grouped_gemm_quant.py's kernel with the same gather / SwiGLU / weight + scatter options, the
weights dequantized in its mainloop; moe_ops.ops runs it for moe_forward(weight_format=...)).

The fused layer is a plain Python function, not a registered op (the op contract has no such
op); under torch.compile dynamo traces its ``wrap_triton`` launches like any user kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._library.triton import set_wrap_triton_enabled

from . import index_build, launch, topk_gating, weighted_combine
from .configs import get_config
from moe_ops._profiling import stage
from moe_ops.ops import gated_activation
from .grouped_gemm import run_gemm
from .grouped_gemm_quant import launch_quantized_gemm, logical_nk

ACT_CODES = {"swiglu": 1, "geglu": 2}
_LAST = [0]


def last_launch_count() -> int:
    """Kernels launched by the most recent eager :func:`fused_moe_forward` call."""
    return _LAST[0]


def _fused_layer(x, router_logits, k, E, I, routing, gemm1, gemm2) -> torch.Tensor:
    """router -> index -> GEMM1 (gathers the x rows, gated activation) -> GEMM2 (router weight,
    scattered to slot rows: the first half of the combine) -> combine, whatever the weights are:
    ``gemm1(x, h, offsets, sched, slots, cfg)`` and ``gemm2(h, y, offsets, sched, slots, weights, cfg)``
    launch the two GEMMs. ``routing``: topk_gating's arguments after ``k``."""
    T, H = x.shape
    out = torch.empty((T, H), device=x.device, dtype=x.dtype)
    if T == 0 or H == 0:
        return out
    if I == 0:
        return out.zero_()
    x = x if x.stride(1) == 1 else x.contiguous()
    with stage("router"):
        weights, ids = topk_gating.topk_gating(router_logits, k, *routing)
    M = T * k
    cfg1 = get_config(E, 2 * I, H, x.dtype, x.device, M)
    cfg2 = dict(get_config(E, H, I, x.dtype, x.device, M), BLOCK_M=cfg1["BLOCK_M"])  # one schedule
    with stage("dispatch"):  # the index only: GEMM1 gathers the x rows itself
        _, sorted_slots, offsets, _, sched = index_build.build_index(ids, E, block_m=1, sched_bm=cfg1["BLOCK_M"])
    with stage("experts"):
        h = torch.empty((M, I), device=x.device, dtype=x.dtype)
        gemm1(x, h, offsets, sched, sorted_slots, cfg1)
        y = out if k == 1 else torch.empty((M, H), device=x.device, dtype=x.dtype)
        gemm2(h, y, offsets, sched, sorted_slots, weights.view(-1), cfg2)
    with stage("combine"):  # empty for k == 1: GEMM2's scatter wrote out
        return out if k == 1 else weighted_combine.combine(y, T, k, weighted_combine.MODE_SLOT)


def fused_moe_impl(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                   k: int, activation: str, scoring: str, renormalize: bool, n_group: int, topk_group: int,
                   correction_bias: Optional[torch.Tensor], scaling_factor: float) -> torch.Tensor:
    E, two_i, H = w_gate_up.shape
    I = two_i // 2

    def gemm1(a, h, offsets, sched, slots, cfg):
        run_gemm(a, w_gate_up, h, offsets, sched, E, I, H, cfg, rows=h.shape[0], trans_b=True, slots=slots,
                 topk=k, act=ACT_CODES[activation])

    def gemm2(h, y, offsets, sched, slots, weights, cfg):
        run_gemm(h, w_down, y, offsets, sched, E, H, I, cfg, rows=h.shape[0], trans_b=True, slots=slots,
                 weights=weights, scatter=True)
    return _fused_layer(x, router_logits, k, E, I, (scoring, renormalize, n_group, topk_group, correction_bias,
                                                     scaling_factor), gemm1, gemm2)


def _unfused(x, router_logits, w_gate_up, w_down, k, activation, scoring, renormalize, n_group, topk_group,
             correction_bias, scaling_factor):
    ops = torch.ops.moe_ops_triton
    E = w_gate_up.shape[0]
    with stage("router"):
        weights, ids = ops.topk_gating(router_logits, k, scoring, renormalize, n_group, topk_group,
                                       correction_bias, scaling_factor)
    with stage("dispatch"):
        x_sorted, _, offsets, slot_rows = ops.permute(x, ids, E, 1)
    with stage("experts"):
        h = ops.grouped_gemm(x_sorted, w_gate_up, offsets, True)
        y = ops.grouped_gemm(gated_activation(h, activation), w_down, offsets, True)
    with stage("combine"):
        return ops.unpermute(y, slot_rows, weights, k)


def fused_moe_forward(x, router_logits, w_gate_up, w_down, k, *, activation="swiglu", scoring="softmax",
                      renormalize=False, n_group=None, topk_group=None, correction_bias=None,
                      scaling_factor=1.0):
    """``moe_forward``'s dropless path (same keyword signature); arguments already validated."""
    args = (x, router_logits, w_gate_up, w_down, int(k), activation, scoring, bool(renormalize),
            n_group or 0, topk_group or 0, correction_bias, float(scaling_factor))
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in args)
    if needs_grad:
        fn = _unfused
    elif torch.compiler.is_compiling():
        fn = fused_moe_impl  # dynamo traces the wrap_triton launches into the graph
    else:
        fn = _eager_fused
    before = launch.launch_count()
    out = fn(*args)
    _LAST[0] = launch.launch_count() - before
    return out


def _eager_fused(*args):
    # Plain launches in eager mode (as triton_op's eager path does), not the tracing HOP.
    with set_wrap_triton_enabled(False):
        return fused_moe_impl(*args)


def fused_moe_quantized_impl(x, router_logits, w_gate_up, gu_scale, w_down, d_scale, fmt, block_n, block_k, k,
                             activation, scoring, renormalize, n_group, topk_group, correction_bias, scaling_factor):
    """:func:`fused_moe_impl` with quantized ``w_gate_up`` ([E, 2I, H] logical) and ``w_down`` ([E, H, I])."""
    E, two_i, H = logical_nk(w_gate_up, fmt)
    I = two_i // 2

    def gemm1(a, h, offsets, sched, slots, cfg):
        launch_quantized_gemm(a, w_gate_up, gu_scale, h, offsets, sched, fmt, block_n, block_k, cfg, N=I, K=H,
                              rows=h.shape[0], slots=slots, topk=k, act=ACT_CODES[activation])

    def gemm2(h, y, offsets, sched, slots, weights, cfg):
        launch_quantized_gemm(h, w_down, d_scale, y, offsets, sched, fmt, block_n, block_k, cfg, N=H, K=I,
                              rows=h.shape[0], slots=slots, weights=weights, scatter=True)
    return _fused_layer(x, router_logits, k, E, I, (scoring, renormalize, n_group, topk_group, correction_bias,
                                                     scaling_factor), gemm1, gemm2)


def fused_moe_quantized_forward(x, router_logits, w_gate_up, gu_scale, w_down, d_scale, fmt, block_n, block_k, k, *,
                                activation="swiglu", scoring="softmax", renormalize=False, n_group=None,
                                topk_group=None, correction_bias=None, scaling_factor=1.0):
    """moe_forward's dropless layer on quantized weights (arguments already validated; no
    gradient: moe_ops.ops sends calls that need one elsewhere)."""
    args = (x, router_logits, w_gate_up, gu_scale, w_down, d_scale, fmt, int(block_n), int(block_k), int(k),
            activation, scoring, bool(renormalize), n_group or 0, topk_group or 0, correction_bias,
            float(scaling_factor))
    before = launch.launch_count()
    if torch.compiler.is_compiling():
        out = fused_moe_quantized_impl(*args)
    else:
        with set_wrap_triton_enabled(False):
            out = fused_moe_quantized_impl(*args)
    _LAST[0] = launch.launch_count() - before
    return out
