"""Fake (meta) implementations of every moe_ops op schema, for every op namespace.

A fake implementation says what an op returns (shape, dtype, device) without running it; it is
what ``torch.compile``, ``torch.export`` and the ``meta`` device see. One set of shape functions
serves every namespace that defines the schemas of ``csrc/schemas.h``: ``moe_ops`` (native),
``moe_ops_sim`` (SIMT emulator), ``moe_ops_triton`` (Triton). Each backend's registration module
calls :func:`register_for_namespace` once its ops exist.

Shapes depend only on input shapes and int/str arguments (DESIGN.md), so every function here is
valid for symbolic (dynamic) sizes. Float dtypes follow the reference: router weights and the
combine accumulator are float32, float64 inputs stay float64 (so gradcheck runs).
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

Tensor = torch.Tensor
_I32 = torch.int32


def _f32_or_f64(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def topk_gating(logits: Tensor, k: int, scoring: str, renormalize: bool, n_group: int, topk_group: int,
                correction_bias: Optional[Tensor], scaling_factor: float):
    T = logits.shape[0]
    torch._check(logits.dim() == 2, lambda: "moe_ops: logits must be 2-D")
    return (logits.new_empty((T, k), dtype=_f32_or_f64(logits)), logits.new_empty((T, k), dtype=_I32))


def permute(x: Tensor, ids: Tensor, num_experts: int, block_m: int):
    T, k = ids.shape
    S = T * k
    P = S + num_experts * (block_m - 1)
    return (x.new_empty((P, x.shape[1])), x.new_empty((P,), dtype=_I32),
            x.new_empty((num_experts + 1,), dtype=_I32), x.new_empty((S,), dtype=_I32))


def unpermute(y_sorted: Tensor, slot_rows: Tensor, weights: Optional[Tensor], k: int):
    T = slot_rows.numel() // k
    return y_sorted.new_empty((T, y_sorted.shape[1]))


def capacity_dispatch(x: Tensor, ids: Tensor, num_experts: int, capacity: int, priority: str):
    T, k = ids.shape
    return (x.new_empty((num_experts, capacity, x.shape[1])), x.new_empty((T, k), dtype=_I32),
            x.new_empty((num_experts,), dtype=_I32), x.new_empty((num_experts,), dtype=_I32))


def capacity_combine(buf_out: Tensor, ids: Tensor, slot_pos: Tensor, weights: Optional[Tensor]):
    return buf_out.new_empty((ids.shape[0], buf_out.shape[2]))


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool):
    N = b.shape[1] if trans_b else b.shape[2]
    return a.new_empty((a.shape[0], N))


def grouped_gemm_wgrad(a: Tensor, dc: Tensor, expert_offsets: Tensor, num_experts: int):
    return a.new_empty((num_experts, a.shape[1], dc.shape[1]))


def fused_experts(x: Tensor, ids: Tensor, weights: Optional[Tensor], w_gate_up: Tensor, w_down: Tensor,
                  activation: str):
    return x.new_empty(x.shape)


def fused_moe(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor, k: int, activation: str,
              scoring: str, renormalize: bool, n_group: int, topk_group: int, correction_bias: Optional[Tensor],
              scaling_factor: float):
    return x.new_empty(x.shape)


FAKES = {
    "topk_gating": topk_gating,
    "permute": permute,
    "unpermute": unpermute,
    "capacity_dispatch": capacity_dispatch,
    "capacity_combine": capacity_combine,
    "grouped_gemm": grouped_gemm,
    "grouped_gemm_wgrad": grouped_gemm_wgrad,
    # A backend-specific extension op (CPU): the dropless expert half of a layer in one op.
    "fused_experts": fused_experts,
    # The Triton backend's whole dropless layer (router logits in, output out).
    "fused_moe": fused_moe,
}

# Libraries that hold our registrations: kept alive (a dropped Library deregisters its kernels).
_LIBS: Dict[str, torch.library.Library] = {}
_DONE: Set[str] = set()


def op_names(ns: str):
    """The ops of namespace ``ns`` that the dispatcher knows, without overload names."""
    prefix = ns + "::"
    return sorted({n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(prefix)})


def has_fake(qualname: str) -> bool:
    """Whether ``ns::op`` already has a fake: a ``triton_op``/``custom_op`` one, a Python fake, or a
    C++ Meta kernel. We never replace those (the op's author knows its shapes best)."""
    from torch._library import custom_ops, simple_registry
    opdef = custom_ops.OPDEFS.get(qualname)
    if opdef is not None and getattr(opdef, "_abstract_fn", None) is not None:
        return True
    if simple_registry.singleton.find(qualname).fake_impl.kernel is not None:
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta")


def register_for_namespace(ns: str) -> None:
    """Register the fake of every op of :data:`FAKES` that namespace ``ns`` defines. Idempotent;
    ops that already have a fake keep theirs."""
    if ns in _DONE:
        return
    defined = set(op_names(ns))
    lib = None
    for name, fn in FAKES.items():
        q = f"{ns}::{name}"
        if name not in defined or has_fake(q):
            continue
        from torch._library import custom_ops
        if q in custom_ops.OPDEFS:  # a torch.library.custom_op: register on its definition
            custom_ops.OPDEFS[q].register_fake(fn)
            continue
        if lib is None:
            lib = _LIBS.setdefault(ns, torch.library.Library(ns, "FRAGMENT"))
        torch.library.register_fake(q, fn, lib=lib)
    _DONE.add(ns)
