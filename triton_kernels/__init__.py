"""Triton backend of moe-ops (``torch.ops.moe_ops_triton``), imported lazily by
``moe_ops.backend`` as ``moe_ops.triton_kernels``.

The op schemas come from the compiled extension (``moe_ops._C.op_schemas()``, defined once in
csrc/schemas.h). Each op is a ``torch.library.triton_op`` whose body launches its kernels through
``wrap_triton``, so ``torch.compile`` traces into the kernels, and the body itself (run on fake
tensors) is the shape function. Devices: cuda; cpu too under ``TRITON_INTERPRET=1`` (the Triton
interpreter, for tests).

Ops, one file per op family (the same stems as csrc/ and tests/): topk_gating.py · permute.py
(permute, unpermute) · capacity.py (capacity_dispatch, capacity_combine) · grouped_gemm.py
(grouped_gemm, grouped_gemm_wgrad, the fused layer's GEMMs) · fused_moe.py (the whole layer).
Kernels several of them share: index_build.py (the counting sort of slots by expert) ·
weighted_combine.py (the weighted k-sum) · launch.py (launching, interpreter detection).
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (a missing triton makes the backend unavailable, not the package)
from torch.library import triton_op

from .. import backend as _backend
from . import capacity, grouped_gemm, grouped_gemm_quant, permute, topk_gating
from .launch import interpreted, interpreter_defect, launch_count
from .fused_moe import fused_moe_forward, fused_moe_quantized_forward, last_launch_count

NAMESPACE = "moe_ops_triton"

# A broken interpreter makes the backend fail to load with the reason (moe_ops.load_errors(),
# a test failure in tests/test_backends_load.py), rather than every kernel failing obscurely.
_defect = interpreter_defect()
if _defect is not None:
    raise ImportError(f"moe_ops.triton_kernels: {_defect}")

# What the Triton *interpreter* computes wrongly (3.6 and 3.8 alike): tl.dot on bfloat16 operands
# returns garbage there (fp16/fp32 are right). The code path on a GPU is identical, so this is declared
# (moe_ops.backend.unsupported_reason) for CPU tensors under the interpreter only. "moe_forward" is the
# fused layer.
_BF16_DOT_OPS = ("grouped_gemm", "grouped_gemm_wgrad", "moe_forward")
UNSUPPORTED = {
    (op, torch.bfloat16, "cpu"): "the Triton interpreter computes tl.dot on bfloat16 wrongly (GPU path is "
                                 "identical and supported)"
    for op in _BF16_DOT_OPS} if interpreted() else {}


_IMPLS = {
    "topk_gating": topk_gating.topk_gating,
    "permute": permute.permute,
    "unpermute": permute.unpermute,
    "capacity_dispatch": capacity.capacity_dispatch,
    "capacity_combine": capacity.capacity_combine,
    "grouped_gemm": grouped_gemm.grouped_gemm,
    "grouped_gemm_wgrad": grouped_gemm.grouped_gemm_wgrad,
}

def _op_schemas():
    from .. import _C  # the one definition of the schemas (csrc/schemas.h)
    return list(_C.op_schemas())


def _define():
    defined = {}
    for schema in _op_schemas():
        name, rest = schema.split("(", 1)
        name = name.strip()
        if name not in _IMPLS:
            raise RuntimeError(f"moe_ops.triton_kernels: no Triton implementation for op {name!r}")
        # torch 2.11's triton_op ignores schema= and infers it from the annotations, which
        # therefore spell the same schema (tests/test_triton_schemas.py; int -> SymInt there).
        triton_op(f"{NAMESPACE}::{name}", _IMPLS[name], mutates_args=(), schema="(" + rest)
        defined[name] = getattr(torch.ops.moe_ops_triton, name)
    return defined


# Triton-only op outside the cross-backend contract (no C++/CUDA kernel of its own): the grouped GEMM on
# weight-only quantized experts (grouped_gemm_quant.py). Other backends run moe_ops.grouped_gemm's
# dequantize-then-grouped_gemm path, so the schema lives with its one implementation.
EXTENSION_IMPLS = {"grouped_gemm_quantized": grouped_gemm_quant.grouped_gemm_quantized}
EXTENSION_SCHEMAS = {"grouped_gemm_quantized": grouped_gemm_quant.SCHEMA}


def _define_extensions():
    for name, fn in EXTENSION_IMPLS.items():
        triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=(), schema=EXTENSION_SCHEMAS[name])
    return {n: getattr(torch.ops.moe_ops_triton, n) for n in EXTENSION_IMPLS}


if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "grouped_gemm"):
    OPS = _define()
    EXTENSION_OPS = _define_extensions()
else:  # module re-imported (e.g. importlib.reload): the ops exist already
    OPS = {n: getattr(torch.ops.moe_ops_triton, n) for n in _IMPLS}
    EXTENSION_OPS = {n: getattr(torch.ops.moe_ops_triton, n) for n in EXTENSION_IMPLS}

_devices = ("cuda",) + (("cpu",) if interpreted() else ())
_backend.register("triton", _devices, OPS, unsupported=UNSUPPORTED)
_backend.register_fused_moe("triton", fused_moe_forward)

__all__ = ["OPS", "EXTENSION_OPS", "UNSUPPORTED", "fused_moe_forward", "fused_moe_quantized_forward",
           "last_launch_count", "launch_count", "interpreted"]
