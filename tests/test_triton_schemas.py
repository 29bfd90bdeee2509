"""The Triton ops' Python signatures match csrc/schemas.h, so they can never drift.

``triton_op`` on torch 2.11 ignores ``schema=`` and infers the schema from the implementation's
annotations (later versions use the one passed), so the annotations are the schema there. Python
has no annotation for a plain schema ``int``: ``int`` is inferred as ``SymInt`` on every torch
version, the one difference allowed. No kernel runs here (it is a static check of signatures).
"""
import importlib.util
import re

import pytest
import torch

import moe_ops

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _schemas():
    from moe_ops import _C  # the one definition (csrc/schemas.h); the Triton backend reads it too
    return {s.split("(", 1)[0].strip(): "(" + s.split("(", 1)[1] for s in _C.op_schemas()}


def _impls():
    err = moe_ops.load_errors().get("triton")
    if err is not None:
        pytest.fail(f"the triton backend failed to load: {err}")
    import moe_ops.triton_kernels as TK
    return TK._IMPLS


def _as_schema_h(s: str) -> str:
    return re.sub(r"\bSymInt\b", "int", s)


def test_every_schema_has_an_implementation():
    assert set(_schemas()) == set(_impls())


@pytest.mark.parametrize("name", sorted(moe_ops.backend.OP_NAMES))
def test_annotations_infer_the_schema(name):
    expected = _schemas()[name]
    inferred = torch.library.infer_schema(_impls()[name], mutates_args=())
    assert _as_schema_h(inferred) == expected, f"{name}: annotations say {inferred}, csrc/schemas.h {expected}"


@pytest.mark.parametrize("name", sorted(moe_ops.backend.OP_NAMES))
def test_registered_schema(name):
    """What torch registered (schema.h's, or the inferred one where schema= is ignored)."""
    _impls()
    op = getattr(torch.ops.moe_ops_triton, name).default
    assert _as_schema_h(str(op._schema)) == f"moe_ops_triton::{name}{_schemas()[name]}"
