"""A test-only op namespace whose kernels are the reference: ``torch.ops.moe_ops_testref.*``.

It defines the schemas of ``csrc/schemas.h`` (read from the built extension when there is one,
else parsed from the header) and implements them on CPU with ``moe_ops.reference``. Because the
kernel runs below autograd, gradients through these ops come *only* from ``moe_ops.autograd``'s
formulas: comparing them with the reference's own autograd tests those formulas (and the fake
and opcheck machinery) before any compiled backend exists.
"""
from __future__ import annotations

import os
import re

import torch

NS = "moe_ops_testref"
BACKEND = "testref"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LIB = None


def op_schemas():
    """The op schemas (without namespace), from ``moe_ops._C`` or ``csrc/schemas.h``."""
    try:
        from moe_ops import _C
        return list(_C.op_schemas())
    except ImportError:
        pass
    text = open(os.path.join(ROOT, "csrc", "schemas.h")).read()
    block = text[text.index("kOpSchemas[]"):]
    block = block[block.index("{") + 1: block.index("};")]
    block = re.sub(r"//[^\n]*", "", block)
    block = re.sub(r'"\s*"', "", block)  # adjacent C literals concatenate
    return re.findall(r'"((?:[^"\\]|\\.)*)"', block)


def _functional(fn):
    """Custom ops must not return (views of) their inputs: clone any output that aliases one.
    Outputs are made contiguous, as the compiled kernels (and the fakes) produce them."""
    def run(*args):
        out = fn(*args)
        ins = [a for a in args if isinstance(a, torch.Tensor)]

        def fresh(t):
            if any(t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in ins):
                return t.clone(memory_format=torch.contiguous_format)
            return t.contiguous()
        return tuple(fresh(t) for t in out) if isinstance(out, tuple) else fresh(out)
    return run


FUSED_EXPERTS_SCHEMA = ("fused_experts(Tensor x, Tensor ids, Tensor? weights, Tensor w_gate_up, Tensor w_down, "
                        "str activation) -> Tensor")


def reference_fused_experts(x, ids, weights, w_gate_up, w_down, activation):
    """The CPU extension op ``fused_experts`` composed from the reference (differentiable)."""
    from moe_ops import reference
    from moe_ops.layer import gated_activation
    E, k = w_gate_up.shape[0], ids.shape[1]
    xs, _, offsets, slot_rows = reference.permute(x, ids, E, 1)
    h = reference.grouped_gemm(xs, w_gate_up, offsets, True)
    y = reference.grouped_gemm(gated_activation(h, activation), w_down, offsets, True)
    return reference.unpermute(y, slot_rows, weights, k)


FUSED_MOE_SCHEMA = ("fused_moe(Tensor x, Tensor router_logits, Tensor w_gate_up, Tensor w_down, int k, "
                    "str activation, str scoring, bool renormalize, int n_group, int topk_group, "
                    "Tensor? correction_bias, float scaling_factor) -> Tensor")


def reference_fused_moe(x, router_logits, w_gate_up, w_down, k, activation, scoring, renormalize, n_group,
                        topk_group, correction_bias, scaling_factor):
    """The Triton extension op ``fused_moe`` (whole dropless layer) composed from the reference."""
    from moe_ops import reference
    weights, ids = reference.topk_gating(router_logits, k, scoring, renormalize, n_group, topk_group,
                                         correction_bias, scaling_factor)
    return reference_fused_experts(x, ids, weights, w_gate_up, w_down, activation)


def define():
    """Define and implement the namespace (once), then register fakes + autograd for it."""
    global _LIB
    if _LIB is not None:
        return NS
    from moe_ops import autograd, reference
    lib = torch.library.Library(NS, "DEF")
    for schema in op_schemas():
        name = schema.split("(")[0]
        lib.define(schema)
        lib.impl(name, _functional(getattr(reference, name)), "CPU")
    if not any(sc.startswith("fused_experts(") for sc in op_schemas()):
        lib.define(FUSED_EXPERTS_SCHEMA)
    lib.impl("fused_experts", _functional(reference_fused_experts), "CPU")
    lib.define(FUSED_MOE_SCHEMA)
    lib.impl("fused_moe", _functional(reference_fused_moe), "CPU")
    _LIB = lib
    autograd.register_for_namespace(NS)
    return NS


def register_backend(monkeypatch):
    """Make ``backend="testref"`` selectable for the duration of a test."""
    from moe_ops import backend
    define()
    monkeypatch.setitem(backend._LOADERS, BACKEND, None)
    backend.register(BACKEND, ("cpu",), {op: getattr(torch.ops.moe_ops_testref, op) for op in backend.OP_NAMES})
    return BACKEND
