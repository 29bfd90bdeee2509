"""The op list is kept in one place: the schemas of csrc/schemas.h (``moe_ops._C.op_schemas()``).

Every other list of ops -- the backend switch's ``OP_NAMES``, the fakes, the autograd formulas,
the Triton implementations, the C++ registrations of every namespace, the public functions in
``moe_ops.__all__``, the ops of every backend that registers a fused layer -- must name exactly
those ops (plus the native-only ones where they apply), so adding an op and forgetting one of
them fails here, not in a user's torch.compile.
"""
import ast
import os

import pytest
import torch

import moe_ops
from moe_ops import _fake, autograd, backend

_C = pytest.importorskip("moe_ops._C")


def _schema_names():
    return [s.split("(", 1)[0].strip() for s in _C.op_schemas()]


CONTRACT = _schema_names()
NATIVE_ONLY = {"fused_experts", "fused_experts_packed", "fused_experts_quantized", "pack_experts"}


def test_backend_switch_lists_the_schemas():
    assert list(backend.OP_NAMES) == CONTRACT


def test_every_op_has_a_fake_and_an_autograd_formula():
    assert set(CONTRACT) <= set(_fake.FAKES), set(CONTRACT) - set(_fake.FAKES)
    formulas = autograd.formulas("moe_ops")
    assert set(CONTRACT) <= set(formulas), set(CONTRACT) - set(formulas)


def test_every_op_is_public():
    assert set(CONTRACT) <= set(moe_ops.__all__), set(CONTRACT) - set(moe_ops.__all__)
    for name in CONTRACT:
        assert callable(getattr(moe_ops, name))


def test_native_namespace_defines_the_schemas_and_only_its_extensions():
    backend._load("cpu")
    defined = set(_fake.op_names("moe_ops"))
    assert set(CONTRACT) <= defined, set(CONTRACT) - defined
    assert defined - set(CONTRACT) <= NATIVE_ONLY, defined - set(CONTRACT)


@pytest.mark.parametrize("name,ns", [("cuda_sim", "moe_ops_sim"), ("triton", "moe_ops_triton")])
def test_other_namespaces_define_exactly_the_schemas(name, ns):
    if backend._load(name) is None:
        pytest.skip(f"{name} not available here: {backend.load_errors().get(name)}")
    # moe_ops_sim: the CUDA fused stage, emulated; moe_ops_triton: its quantized grouped GEMM
    extensions = {"fused_experts"} if ns == "moe_ops_sim" else {"grouped_gemm_quantized"}
    assert set(_fake.op_names(ns)) == set(CONTRACT) | extensions


def test_triton_implements_every_schema():
    backend._load("triton")
    import sys
    module = sys.modules.get("moe_ops.triton_kernels")
    if module is None:
        pytest.skip(f"triton not loaded: {backend.load_errors().get('triton')}")
    assert set(module._IMPLS) == set(CONTRACT)
    assert torch.ops.moe_ops_triton is not None


def _triton_table_keys():
    """The op names of ``_IMPLS`` in triton_kernels/__init__.py, read from the source (so the
    check runs where triton is not installed, too)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels", "__init__.py")
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_IMPLS" for t in node.targets):
            return [k.value for k in node.value.keys]
    raise AssertionError("triton_kernels/__init__.py has no _IMPLS table")


def test_triton_table_names_every_schema_once():
    keys = _triton_table_keys()
    assert sorted(keys) == sorted(CONTRACT), (set(CONTRACT) - set(keys), set(keys) - set(CONTRACT))


def _backends_with_fused_layer():
    for name in list(backend._LOADERS):
        backend._load(name)
    return {n: b for n, b in backend._BACKENDS.items() if b.fused_moe is not None}


def _missing_ops(b):
    return set(CONTRACT) - set(b.ops)


def test_fused_layer_backends_have_every_op():
    """A backend with a fused whole-layer path falls back to its own unfused ops (autograd,
    capacity mode), so it must have every op of the contract."""
    fused = _backends_with_fused_layer()
    for name, b in fused.items():
        assert not _missing_ops(b), f"backend {name!r} registers a fused layer but lacks {sorted(_missing_ops(b))}"


def test_fused_layer_check_catches_a_missing_op(monkeypatch):
    fake = backend.Backend("fused_without_permute", frozenset({"cpu"}),
                           {op: None for op in CONTRACT if op != "permute"}, fused_moe=lambda *a, **k: None)
    monkeypatch.setitem(backend._BACKENDS, fake.name, fake)
    assert _backends_with_fused_layer()[fake.name] is fake
    assert _missing_ops(fake) == {"permute"}
    with pytest.raises(AssertionError, match="lacks"):
        test_fused_layer_backends_have_every_op()
