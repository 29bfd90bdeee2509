"""Custom-op hygiene: ``torch.library.opcheck`` on samples of every op of every moe_ops namespace.

opcheck checks the schema (no hidden aliasing or mutation), that autograd is registered, that
the fake implementation agrees with the kernel (shapes, dtypes, strides), and that AOT
dispatch with dynamic shapes reproduces outputs and gradients. The namespaces are every one the
dispatcher knows whose name starts with ``moe_ops`` (the test namespace ``moe_ops_testref``,
whose kernels are the reference, always exists); an op without samples here fails
:func:`test_every_registered_op_has_samples`.
"""
from __future__ import annotations


import pytest
import torch

from moe_ops import envs
import moe_ops
from moe_ops import _fake
from moe_ops import autograd as moe_autograd
from tests import refop_lib

# Not package ops: test_autograd / this file define moe_ops_selftest* to test the machinery; the
# SIMT emulator's moe_ops_simtest holds its self-test kernels (planted bugs, thread-id probes).
SKIP_NS = {"moe_ops_selftest", "moe_ops_selftest2", "moe_ops_simtest"}


def namespaces():
    moe_ops.available_backends()   # load every backend that can load here
    refop_lib.define()
    moe_autograd.register_all()
    names = {n.split("::")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ops")}
    return sorted(names - SKIP_NS)


def registered_ops():
    return [(ns, op) for ns in namespaces() for op in _fake.op_names(ns)]


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x(*shape, dtype=torch.float32, seed=0, grad=True):
    return torch.randn(*shape, generator=_g(seed)).to(dtype).requires_grad_(grad)


def _ids(T, k, E, seed=0, invalid=False):
    g = _g(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    if invalid and T:
        ids[0, 0] = E
        ids[-1, -1] = -1
    return ids


def _routing(T, k, E, block_m=1, invalid=False):
    res = moe_ops.permute(torch.zeros(T, 1), _ids(T, k, E, invalid=invalid), E, block_m=block_m,
                          allow_invalid_ids=True, backend="reference")
    return res


def samples(op, dtype=torch.float32):
    """Positional argument tuples (schema order) for ``op``."""
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    if op == "topk_gating":
        return [
            (_x(6, 8, dtype=dtype), 2, "softmax", False, 0, 0, None, 1.0),
            (_x(6, 8, dtype=dtype), 3, "softmax", True, 0, 0, None, 2.0),
            (_x(5, 8, dtype=dtype), 2, "sigmoid", True, 4, 2, torch.randn(8, generator=_g(1)).to(dtype), 2.5),
            (_x(0, 8, dtype=dtype), 2, "softmax", True, 0, 0, None, 1.0),
        ]
    if op == "permute":
        return [
            (_x(7, 4, dtype=dtype), _ids(7, 2, 5), 5, 1),
            (_x(7, 4, dtype=dtype), _ids(7, 2, 5, invalid=True), 5, 4),
            (_x(0, 4, dtype=dtype), _ids(0, 2, 5), 5, 2),
        ]
    if op == "unpermute":
        r = _routing(7, 2, 5, block_m=2, invalid=True)
        r0 = _routing(0, 2, 5)
        P = r.x_sorted.shape[0]
        return [
            (_x(P, 4, dtype=dtype), r.slot_rows, _x(7, 2, dtype=wdt, seed=1), 2),
            (_x(P, 4, dtype=dtype), r.slot_rows, None, 2),
            (_x(r0.x_sorted.shape[0], 4, dtype=dtype), r0.slot_rows, _x(0, 2, dtype=wdt), 2),
        ]
    if op == "capacity_dispatch":
        return [
            (_x(8, 3, dtype=dtype), _ids(8, 2, 4, invalid=True), 4, 3, "kmajor"),
            (_x(8, 3, dtype=dtype), _ids(8, 2, 4), 4, 5, "token_major"),
            (_x(8, 3, dtype=dtype), _ids(8, 2, 4), 4, 0, "kmajor"),
            (_x(0, 3, dtype=dtype), _ids(0, 2, 4), 4, 2, "kmajor"),
        ]
    if op == "capacity_combine":
        ids = _ids(8, 2, 4, invalid=True)
        d = moe_ops.capacity_dispatch(torch.zeros(8, 1), ids, 4, 3, allow_invalid_ids=True, backend="reference")
        return [
            (_x(4, 3, 5, dtype=dtype), ids, d.slot_pos, _x(8, 2, dtype=wdt, seed=2)),
            (_x(4, 3, 5, dtype=dtype), ids, d.slot_pos, None),
        ]
    if op in ("grouped_gemm", "grouped_gemm_wgrad"):
        offs = torch.tensor([1, 1, 5, 10], dtype=torch.int32)   # empty expert, rows outside
        empty = torch.zeros(4, dtype=torch.int32)
        if op == "grouped_gemm":
            return [
                (_x(11, 4, dtype=dtype), _x(3, 4, 6, dtype=dtype, seed=1), offs, False),
                (_x(11, 4, dtype=dtype), _x(3, 6, 4, dtype=dtype, seed=1), offs, True),
                (_x(0, 4, dtype=dtype), _x(3, 4, 6, dtype=dtype, seed=1), empty, False),
            ]
        return [
            (_x(11, 4, dtype=dtype), _x(11, 6, dtype=dtype, seed=1), offs, 3),
            (_x(0, 4, dtype=dtype), _x(0, 6, dtype=dtype, seed=1), empty, 3),
        ]
    if op == "fused_experts":
        ids = _ids(7, 2, 4, invalid=True)
        return [
            (_x(7, 8, dtype=dtype), ids, _x(7, 2, dtype=wdt, seed=1), _x(4, 6, 8, dtype=dtype, seed=2) * 0.3,
             _x(4, 8, 3, dtype=dtype, seed=3) * 0.3, "swiglu"),
            (_x(7, 8, dtype=dtype), _ids(7, 2, 4), None, _x(4, 6, 8, dtype=dtype, seed=2) * 0.3,
             _x(4, 8, 3, dtype=dtype, seed=3) * 0.3, "geglu"),
            (_x(0, 8, dtype=dtype), _ids(0, 2, 4), None, _x(4, 6, 8, dtype=dtype, seed=2),
             _x(4, 8, 3, dtype=dtype, seed=3), "swiglu"),
        ]
    if op in ("pack_experts", "fused_experts_packed"):
        # CPU packed-weight path: odd sizes so the 16-column panels are zero-padded.
        wgu, wd = _x(4, 2 * 9, 8, dtype=dtype, seed=2) * 0.3, _x(4, 8, 9, dtype=dtype, seed=3) * 0.3
        if op == "pack_experts":
            return [(wgu, wd)]
        # Packed weights are constants packed from detached weights, as moe_ops.pack_experts does.
        # pack_experts has no autograd: packing grad-requiring weights gives non-leaf inputs with
        # the autograd fallback's grad_fn and all-None eager grads, and torch 2.11's AOT check then
        # demands that the compiled backward raise (2.14 does not), so that sample tests nothing.
        pgu, pd = torch.ops.moe_ops.pack_experts(wgu.detach(), wd.detach())
        return [
            (_x(7, 8, dtype=dtype), _ids(7, 2, 4, invalid=True), _x(7, 2, dtype=wdt, seed=1), pgu, pd, "swiglu"),
            (_x(7, 8, dtype=dtype), _ids(7, 2, 4), None, pgu, pd, "geglu"),
            (_x(0, 8, dtype=dtype), _ids(0, 2, 4), None, pgu, pd, "swiglu"),
        ]
    if op == "grouped_gemm_quantized":  # the Triton op on quantized b [E, N, K] (fp8: see fused_experts_quantized)
        offs = torch.tensor([1, 1, 5, 10], dtype=torch.int32)   # empty expert, rows outside
        w = _x(3, 20, 64, seed=1, grad=False) * 0.3
        out = []
        for fmt in ("int8", "mxfp4"):
            q, s = moe_ops.quantize_experts(w, fmt)
            out += [(_x(11, 64, dtype=dtype, grad=False), q, s, offs, fmt, 0, 0),
                    (_x(0, 64, dtype=dtype, grad=False), q, s, torch.zeros(4, dtype=torch.int32), fmt, 0, 0)]
        return out
    if op == "fused_experts_quantized":  # bf16 activations whatever dtype is asked
        x = _x(7, 64, dtype=torch.bfloat16)
        w1, w2 = _x(3, 2 * 32, 64, seed=2) * 0.3, _x(3, 64, 32, seed=3) * 0.3
        out = []
        # (fp8 weights: opcheck's schema check compares tensors with ops float8 lacks on CPU;
        # the op's fp8 path is tested in tests/test_quant.py)
        for fmt, bn, bk in (("int8", 0, 0), ("mxfp4", 0, 0)):
            kw = {"block_size": (bn, bk)} if fmt == "fp8_e4m3" else {}
            q1, s1 = moe_ops.quantize_experts(w1, fmt, **kw)
            q2, s2 = moe_ops.quantize_experts(w2, fmt, **kw)
            out.append((x, _ids(7, 2, 3, invalid=True), _x(7, 2, seed=1), q1, s1, q2, s2, fmt, bn, bk, "swiglu"))
        return out
    if op == "fused_moe":
        wgu, wd = _x(8, 6, 8, dtype=dtype, seed=2) * 0.3, _x(8, 8, 3, dtype=dtype, seed=3) * 0.3
        bias = torch.randn(8, generator=_g(4)).to(dtype) * 0.1
        return [
            (_x(7, 8, dtype=dtype), _x(7, 8, dtype=dtype, seed=1), wgu, wd, 2, "swiglu", "softmax", True, 0, 0,
             None, 1.0),
            (_x(7, 8, dtype=dtype), _x(7, 8, dtype=dtype, seed=1), wgu, wd, 3, "swiglu", "sigmoid", True, 4, 2,
             bias, 2.5),
            (_x(0, 8, dtype=dtype), _x(0, 8, dtype=dtype, seed=1), wgu, wd, 2, "geglu", "softmax", False, 0, 0,
             None, 1.0),
        ]
    return []


# namespace -> backend whose CPU availability says whether its ops can run here (the Triton ops
# exist on any machine with triton, but run on CPU only under TRITON_INTERPRET=1).
NS_BACKEND = {"moe_ops": "cpu", "moe_ops_sim": "cuda_sim", "moe_ops_triton": "triton"}


def _has_cpu_kernel(ns, op):
    if ns in NS_BACKEND and NS_BACKEND[ns] not in moe_ops.available_backends(device="cpu"):
        return False
    q = f"{ns}::{op}"
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(q, k)
               for k in ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd"))


def test_every_registered_op_has_samples():
    ops = registered_ops()
    assert ("moe_ops_testref", "permute") in ops  # the machinery sees at least the test namespace
    missing = [f"{ns}::{op}" for ns, op in ops if not samples(op)]
    assert not missing, f"ops without opcheck samples: {missing}"


def test_coverage_check_can_fail():
    """An op registered in a moe_ops* namespace without samples is reported."""
    lib = torch.library.Library("moe_ops_coverage_probe", "DEF")
    lib.define("mystery(Tensor x) -> Tensor")
    try:
        ops = [(ns, op) for ns, op in registered_ops() if ns == "moe_ops_coverage_probe"]
        assert ops == [("moe_ops_coverage_probe", "mystery")]
        assert not samples("mystery")
    finally:
        del lib


OPCHECK_PARAMS = [(ns, op) for ns, op in registered_ops() if ns in ("moe_ops_testref", "moe_ops", "moe_ops_sim",
                                                                     "moe_ops_triton")]


@pytest.mark.parametrize("ns,op", OPCHECK_PARAMS, ids=[f"{n}::{o}" for n, o in OPCHECK_PARAMS])
def test_opcheck(ns, op):
    if not _has_cpu_kernel(ns, op):
        pytest.skip(f"{ns}::{op} has no CPU kernel here")
    fn = getattr(getattr(torch.ops, ns), op).default
    utils = None  # all of opcheck's checks
    if ns == "moe_ops_triton" and envs.flag("TRITON_INTERPRET"):
        # Triton's interpreter cannot be traced (AOT dispatch); a GPU run covers that check.
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in samples(op):
        torch.library.opcheck(fn, args, test_utils=utils) if utils else torch.library.opcheck(fn, args)


@pytest.mark.parametrize("ns,op", OPCHECK_PARAMS, ids=[f"{n}::{o}" for n, o in OPCHECK_PARAMS])
def test_fake_matches_kernel_low_precision(ns, op):
    """Fake vs real shapes/dtypes in bfloat16 (opcheck above runs float32)."""
    if not _has_cpu_kernel(ns, op):
        pytest.skip(f"{ns}::{op} has no CPU kernel here")
    fn = getattr(getattr(torch.ops, ns), op).default
    for args in samples(op, torch.bfloat16):
        torch.library.opcheck(fn, args, test_utils=("test_schema", "test_faketensor"))


def test_opcheck_catches_wrong_fake():
    """A fake that lies about the output shape fails opcheck (the check is not vacuous)."""
    lib = torch.library.Library("moe_ops_selftest2", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: torch.cat([x, x]), "CPU")
    torch.library.register_fake("moe_ops_selftest2::twice", lambda x: x.new_empty(x.shape), lib=lib)
    try:
        with pytest.raises(Exception):
            torch.library.opcheck(torch.ops.moe_ops_selftest2.twice.default, (torch.randn(3),),
                                  test_utils=("test_faketensor",))
    finally:
        del lib
