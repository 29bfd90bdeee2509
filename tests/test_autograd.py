"""Gradients of every differentiable op, on every backend with custom ops, against the reference.

* ``gradcheck`` (float64, finite differences) through the public functions of each op-backed
  backend: the test namespace ``testref`` (reference kernels below autograd, so only
  ``moe_ops.autograd``'s formulas produce gradients) and every native backend that accepts
  float64 (one that does not is skipped with the reason);
* gradients equal to the reference backend's own autograd in float32 / float16 / bfloat16;
* backwards run the same namespace's ops (a dispatch log proves it);
* the registration machinery catches a wrong formula (a library op defined in this file).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_ops
from moe_ops import _fake
from moe_ops import autograd as moe_autograd
from tests import refop_lib

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}

# backend name -> op namespace (for the dispatch-log test)
NAMESPACE = {"testref": "moe_ops_testref", "cpu": "moe_ops", "cuda": "moe_ops", "cuda_sim": "moe_ops_sim",
             "triton": "moe_ops_triton"}


def op_backends(op):
    """CPU backends whose kernels are custom ops (so autograd comes from moe_ops.autograd)."""
    moe_autograd.register_all()
    return ["testref"] + [b for b in moe_ops.available_backends(op, "cpu") if b != "reference"]


@pytest.fixture
def testref(monkeypatch):
    return refop_lib.register_backend(monkeypatch)


def _use(backend_name, monkeypatch):
    if backend_name == "testref":
        refop_lib.register_backend(monkeypatch)
    return backend_name


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float64, g=None, requires_grad=True):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def _ids(T, k, E, g, invalid=False):
    """Distinct experts per row (as a router makes them); optionally with sentinel ids."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = ids.to(torch.int32)
    if invalid and T:
        ids[0, 0] = E       # expert-parallel sentinel
        ids[-1, -1] = -1
    return ids


def _offsets(E, M, g, lead=1, tail=1):
    """Monotone offsets with an empty expert, rows before offs[0] and after offs[E]."""
    cuts = torch.sort(torch.randint(lead, M - tail + 1, (E - 1,), generator=g)).values
    offs = torch.cat([torch.tensor([lead]), cuts, torch.tensor([M - tail])])
    offs[1] = offs[0]  # expert 0 empty
    return offs.to(torch.int32)


# ------------------------------------------------------------------------ case builders
# Each returns (fn(*diff_inputs, backend) -> tensor, diff_inputs) on fresh random data.

def case_gating(dtype, variant, g):
    T, E, k = 6, 8, 3
    logits = _rand(T, E, dtype=dtype, g=g)
    kw = dict(scoring="softmax", renormalize=False)
    if variant == "softmax_renorm":
        kw = dict(scoring="softmax", renormalize=True, scaling_factor=2.5)
    elif variant == "sigmoid_group":
        bias = torch.randn(E, generator=g, dtype=torch.float64).to(dtype) * 0.1
        kw = dict(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2, correction_bias=bias,
                  scaling_factor=1.5)
    elif variant == "sigmoid":
        kw = dict(scoring="sigmoid", renormalize=False)

    def fn(logits, backend):
        return moe_ops.topk_gating(logits, k, backend=backend, **kw)[0]
    return fn, (logits,)


def case_permute(dtype, variant, g):
    T, k, E, H = 7, 2, 5, 4
    x = _rand(T, H, dtype=dtype, g=g)
    ids = _ids(T, k, E, g, invalid=True)
    block_m = 3 if variant == "block" else 1

    def fn(x, backend):
        return moe_ops.permute(x, ids, E, block_m=block_m, allow_invalid_ids=True, backend=backend).x_sorted
    return fn, (x,)


def case_unpermute(dtype, variant, g):
    T, k, E, H = 7, 2, 5, 4
    ids = _ids(T, k, E, g, invalid=True)
    res = moe_ops.permute(torch.zeros(T, H), ids, E, block_m=2, allow_invalid_ids=True, backend="reference")
    y = _rand(res.x_sorted.shape[0], H, dtype=dtype, g=g)
    if variant == "no_weights":
        return (lambda y, backend: moe_ops.unpermute(y, res.slot_rows, None, k=k, backend=backend)), (y,)
    w = _rand(T, k, dtype=dtype if dtype == torch.float64 else torch.float32, g=g)
    return (lambda y, w, backend: moe_ops.unpermute(y, res.slot_rows, w, backend=backend)), (y, w)


def case_capacity_dispatch(dtype, variant, g):
    T, k, E, H, C = 8, 2, 4, 3, 3  # demand 16 slots over 4 experts with C=3: drops
    x = _rand(T, H, dtype=dtype, g=g)
    ids = _ids(T, k, E, g, invalid=True)
    prio = "token_major" if variant == "token_major" else "kmajor"

    def fn(x, backend):
        return moe_ops.capacity_dispatch(x, ids, E, C, priority=prio, allow_invalid_ids=True, backend=backend).buf
    return fn, (x,)


def case_capacity_combine(dtype, variant, g):
    T, k, E, H, C = 8, 2, 4, 3, 3
    ids = _ids(T, k, E, g, invalid=True)
    d = moe_ops.capacity_dispatch(torch.zeros(T, H), ids, E, C, allow_invalid_ids=True, backend="reference")
    buf = _rand(E, C, H, dtype=dtype, g=g)
    if variant == "no_weights":
        return (lambda b, backend: moe_ops.capacity_combine(b, ids, d.slot_pos, None, backend=backend)), (buf,)
    w = _rand(T, k, dtype=dtype if dtype == torch.float64 else torch.float32, g=g)
    return (lambda b, w, backend: moe_ops.capacity_combine(b, ids, d.slot_pos, w, backend=backend)), (buf, w)


def case_grouped_gemm(dtype, variant, g):
    M, K, N, E = 11, 4, 5, 3
    trans_b = variant == "trans_b"
    a = _rand(M, K, dtype=dtype, g=g)
    b = _rand(E, N, K, dtype=dtype, g=g) if trans_b else _rand(E, K, N, dtype=dtype, g=g)
    offs = _offsets(E, M, g)
    return (lambda a, b, backend: moe_ops.grouped_gemm(a, b, offs, trans_b=trans_b, backend=backend)), (a, b)


def case_grouped_gemm_wgrad(dtype, variant, g):
    M, K, N, E = 11, 4, 5, 3
    a, dc = _rand(M, K, dtype=dtype, g=g), _rand(M, N, dtype=dtype, g=g)
    offs = _offsets(E, M, g)
    return (lambda a, dc, backend: moe_ops.grouped_gemm_wgrad(a, dc, offs, E, backend=backend)), (a, dc)


def case_moe_forward(dtype, variant, g):
    T, H, I, E, k = 6, 8, 4, 4, 2
    x = _rand(T, H, dtype=dtype, g=g)
    logits = _rand(T, E, dtype=dtype, g=g)
    wgu = (_rand(E, 2 * I, H, dtype=torch.float64, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    wd = (_rand(E, H, I, dtype=torch.float64, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    cap = 0.75 if variant == "capacity" else None

    def fn(x, logits, wgu, wd, backend):
        return moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True, capacity_factor=cap, backend=backend)
    return fn, (x, logits, wgu, wd)


def fused_backends(op="fused_experts"):
    """Backends whose namespace has a CPU kernel for extension op ``op`` (fused_experts: CPU
    backend; fused_moe: Triton under the interpreter)."""
    moe_autograd.register_all()
    out = ["testref"]
    for b in moe_ops.available_backends(device="cpu"):
        ns = NAMESPACE.get(b)
        if ns and b != "reference" and op in _fake.op_names(ns) and any(torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{op}", key)
                                           for key in ("CPU", "CompositeExplicitAutograd")):
            out.append(b)
    return out


def case_fused_experts(dtype, variant, g):
    T, H, I, E, k = 7, 8, 4, 4, 2
    x = _rand(T, H, dtype=dtype, g=g)
    ids = _ids(T, k, E, g, invalid=variant == "sentinels")
    wgu = (_rand(E, 2 * I, H, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    wd = (_rand(E, H, I, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    w = _rand(T, k, dtype=dtype if dtype == torch.float64 else torch.float32, g=g)
    act = "geglu" if variant == "geglu" else "swiglu"

    def fn(x, w, wgu, wd, backend):
        if backend == "reference":
            return refop_lib.reference_fused_experts(x, ids, w, wgu, wd, act)
        return getattr(torch.ops, NAMESPACE[backend]).fused_experts(x, ids, w, wgu, wd, act)
    return fn, (x, w, wgu, wd)


def case_fused_moe(dtype, variant, g):
    T, H, I, E, k = 7, 8, 4, 8, 2
    x = _rand(T, H, dtype=dtype, g=g)
    logits = _rand(T, E, dtype=dtype, g=g)
    wgu = (_rand(E, 2 * I, H, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    wd = (_rand(E, H, I, g=g, requires_grad=False) * 0.5).to(dtype).requires_grad_()
    if variant == "deepseek":
        bias = torch.randn(E, generator=g, dtype=torch.float64).to(dtype) * 0.1
        args = (k, "swiglu", "sigmoid", True, 4, 2, bias, 2.5)
    else:
        args = (k, "swiglu", "softmax", True, 0, 0, None, 1.0)

    def fn(x, logits, wgu, wd, backend):
        if backend == "reference":
            return refop_lib.reference_fused_moe(x, logits, wgu, wd, *args)
        return getattr(torch.ops, NAMESPACE[backend]).fused_moe(x, logits, wgu, wd, *args)
    return fn, (x, logits, wgu, wd)


CASES = {
    "topk_gating": (case_gating, ["softmax", "softmax_renorm", "sigmoid", "sigmoid_group"]),
    "permute": (case_permute, ["plain", "block"]),
    "unpermute": (case_unpermute, ["weights", "no_weights"]),
    "capacity_dispatch": (case_capacity_dispatch, ["kmajor", "token_major"]),
    "capacity_combine": (case_capacity_combine, ["weights", "no_weights"]),
    "grouped_gemm": (case_grouped_gemm, ["plain", "trans_b"]),
    "grouped_gemm_wgrad": (case_grouped_gemm_wgrad, ["plain"]),
}
PARAMS = [(op, v) for op, (_, vs) in CASES.items() for v in vs]
ALL_BACKENDS = sorted({b for op in CASES for b in op_backends(op)})


# Ops whose kernels run in an op's forward + backward (for per-backend dtype support declarations).
CHAIN = {"topk_gating": ["topk_gating"], "permute": ["permute", "unpermute"], "unpermute": ["unpermute"],
         "capacity_dispatch": ["capacity_dispatch", "capacity_combine"], "capacity_combine": ["capacity_combine"],
         "grouped_gemm": ["grouped_gemm", "grouped_gemm_wgrad"],
         "grouped_gemm_wgrad": ["grouped_gemm_wgrad", "grouped_gemm"],
         "moe_forward": list(moe_ops.backend.OP_NAMES) + ["moe_forward"]}
CHAIN["fused_experts"] = CHAIN["fused_moe"] = CHAIN["moe_forward"]


def _skip_unsupported(backend, op, dtype):
    from moe_ops.backend import unsupported_reason
    if backend == "testref":  # the reference's own math in a test namespace: every dtype
        return
    for o in CHAIN[op]:
        why = unsupported_reason(backend, o, dtype)
        if why:
            pytest.skip(f"{backend} does not support {o} in {dtype}: {why}")


def _gradcheck(fn, inputs, backend, **kw):
    """Full gradcheck for the cheap test namespace; fast mode (random projections, a handful of
    evaluations) for real kernels, which may be slow (the Triton interpreter)."""
    return torch.autograd.gradcheck(lambda *t: _call(fn, t, backend), inputs, eps=1e-6, atol=1e-6,
                                    fast_mode=backend not in ("testref", "reference"), **kw)


def _call(fn, inputs, backend):
    return fn(*inputs, backend)


def _accepts_float64(fn, inputs, backend):
    """Whether ``backend`` computes this float64 case in float64 precision (gradcheck's finite
    differences need it). A backend that rejects float64, or accepts it but computes at float32
    precision, is skipped by the callers with that reason."""
    args = [t.detach() for t in inputs]
    try:
        with torch.no_grad():
            out = _call(fn, args, backend)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        if "float64" in str(e) or "Double" in str(e) or "dtype" in str(e):
            return False
        raise
    if backend in ("reference", "testref"):
        return True
    with torch.no_grad():
        ref = _call(fn, args, "reference")
    return out.dtype == torch.float64 and bool(((out - ref).abs() <= 1e-11 * (1 + ref.abs())).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op,variant", PARAMS)
def test_gradcheck(op, variant, backend, monkeypatch):
    if backend not in op_backends(op):
        pytest.skip(f"backend {backend} has no {op} kernel")
    _use(backend, monkeypatch)
    fn, inputs = CASES[op][0](torch.float64, variant, _gen(1))
    if not _accepts_float64(fn, inputs, backend):
        pytest.skip(f"backend {backend}'s {op} does not compute float64 in float64 precision: gradcheck needs it")
    _skip_unsupported(backend, op, torch.float64)
    assert _gradcheck(fn, inputs, backend)


@pytest.mark.parametrize("backend", ["reference"] + ALL_BACKENDS)
def test_gradcheck_moe_forward(backend, monkeypatch):
    _use(backend, monkeypatch)
    for variant in ("dropless", "capacity"):
        fn, inputs = case_moe_forward(torch.float64, variant, _gen(2))
        if not _accepts_float64(fn, inputs, backend):
            pytest.skip(f"backend {backend} does not compute float64 in float64 precision")
        assert _gradcheck(fn, inputs, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradgradcheck_grouped_gemm(backend, monkeypatch):
    """grouped_gemm_wgrad has a backward too, so the GEMM is twice differentiable."""
    if backend not in op_backends("grouped_gemm_wgrad"):
        pytest.skip(f"backend {backend} has no wgrad kernel")
    _use(backend, monkeypatch)
    fn, inputs = case_grouped_gemm(torch.float64, "plain", _gen(3))
    if not _accepts_float64(fn, inputs, backend):
        pytest.skip(f"backend {backend} does not compute float64 in float64 precision")
    assert torch.autograd.gradgradcheck(lambda *t: _call(fn, t, backend), inputs, eps=1e-6, atol=1e-6,
                                        fast_mode=backend != "testref")


def _grads(fn, inputs, backend, gout_seed):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = _call(fn, ins, backend)
    gout = torch.randn(out.shape, generator=_gen(gout_seed), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, ins, gout, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("op,variant", PARAMS + [("moe_forward", "dropless"), ("moe_forward", "capacity")])
def test_grads_match_reference(op, variant, backend, dtype, monkeypatch):
    if op != "moe_forward" and backend not in op_backends(op):
        pytest.skip(f"backend {backend} has no {op} kernel")
    _use(backend, monkeypatch)
    _skip_unsupported(backend, op, dtype)
    builder = case_moe_forward if op == "moe_forward" else CASES[op][0]
    fn, inputs = builder(dtype, variant, _gen(4))
    ref_out, ref_grads = _grads(fn, inputs, "reference", 5)
    out, grads = _grads(fn, inputs, backend, 5)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (rg is None), f"input {i}: gradient presence differs"
        if g is None:
            continue
        assert g.dtype == rg.dtype and g.shape == rg.shape
        scale = max(1.0, float(rg.double().abs().max()))
        torch.testing.assert_close(g.double(), rg.double(), atol=atol * scale * 4, rtol=rtol * 4,
                                   msg=lambda m: f"grad of input {i} ({op}/{variant}, {backend}): {m}")


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.name()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backward_uses_same_backend_ops(backend, monkeypatch):
    """The backward of each op is made of the same namespace's ops (where it has them)."""
    _use(backend, monkeypatch)
    ns = NAMESPACE[backend]
    expect = {"permute": ["unpermute"], "capacity_dispatch": ["capacity_combine"],
              "grouped_gemm": ["grouped_gemm", "grouped_gemm_wgrad"]}
    for op, used in expect.items():
        if backend not in op_backends(op):
            continue
        fn, inputs = CASES[op][0](torch.float32, CASES[op][1][0], _gen(6))
        out = _call(fn, inputs, backend)
        with _OpLog() as log:
            torch.autograd.grad(out, inputs, torch.ones_like(out))
        for u in used:
            if backend == "testref" or u in moe_ops.backend._BACKENDS[backend].ops:
                assert any(n.startswith(f"{ns}::{u}") for n in log.names), (op, u, log.names)


# --------------------------------------------------------------- registration machinery

def test_machinery_catches_wrong_formula():
    """Register a deliberately wrong backward on a library op defined here: gradcheck fails;
    the right one passes. Proves the per-namespace registration path really takes effect."""
    lib = torch.library.Library("moe_ops_selftest", "DEF")
    lib.define("scale3(Tensor x) -> Tensor")
    lib.impl("scale3", lambda x: x * 3, "CPU")
    torch.library.register_fake("moe_ops_selftest::scale3", lambda x: torch.empty_like(x), lib=lib)
    factor = {"f": 2.0}
    torch.library.register_autograd("moe_ops_selftest::scale3", lambda ctx, g: g * factor["f"], lib=lib)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(torch.ops.moe_ops_selftest.scale3, (x,), raise_exception=False)
    factor["f"] = 3.0
    assert torch.autograd.gradcheck(torch.ops.moe_ops_selftest.scale3, (x,))
    del lib


def test_registration_is_idempotent_and_complete():
    ns = refop_lib.define()
    moe_autograd.register_for_namespace(ns)  # a second time: no duplicate-kernel error
    from moe_ops import _fake
    for op in _fake.op_names(ns):
        q = f"{ns}::{op}"
        assert _fake.has_fake(q), q
        assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "Autograd"), q
    assert set(_fake.op_names(ns)) == set(moe_ops.backend.OP_NAMES) | {"fused_experts", "fused_moe"}


FUSED_VARIANTS = ["swiglu", "geglu", "sentinels"]


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_gradcheck_fused_experts(variant, backend):
    refop_lib.define()
    fn, inputs = case_fused_experts(torch.float64, variant, _gen(9))
    if not _accepts_float64(fn, inputs, backend):
        pytest.skip(f"backend {backend}'s fused_experts does not compute float64 in float64 precision: gradcheck needs it")
    assert _gradcheck(fn, inputs, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_fused_experts_grads_match_reference(variant, backend, dtype):
    refop_lib.define()
    _skip_unsupported(backend, "fused_experts", dtype)
    fn, inputs = case_fused_experts(dtype, variant, _gen(10))
    ref_out, ref_grads = _grads(fn, inputs, "reference", 11)
    out, grads = _grads(fn, inputs, backend, 11)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol * 4, rtol=rtol * 4)
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == rg.dtype and g.shape == rg.shape
        scale = max(1.0, float(rg.double().abs().max()))
        torch.testing.assert_close(g.double(), rg.double(), atol=atol * scale * 8, rtol=rtol * 8,
                                   msg=lambda m: f"grad of input {i} (fused_experts/{variant}, {backend}): {m}")


@pytest.mark.parametrize("backend", fused_backends("fused_moe"))
@pytest.mark.parametrize("variant", ["softmax", "deepseek"])
def test_fused_moe_gradients(variant, backend):
    """The whole-layer extension op: gradcheck (float64, where accepted) and float32 vs reference."""
    refop_lib.define()
    fn, inputs = case_fused_moe(torch.float64, variant, _gen(12))
    if _accepts_float64(fn, inputs, backend):
        assert _gradcheck(fn, inputs, backend)
    fn, inputs = case_fused_moe(torch.float32, variant, _gen(13))
    ref_out, ref_grads = _grads(fn, inputs, "reference", 14)
    out, grads = _grads(fn, inputs, backend, 14)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4)
