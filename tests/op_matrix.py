"""The per-op backend matrix: every op on every available backend against the reference.

Used by the op test files (tests/test_<stem>.py: topk_gating, permute, capacity, grouped_gemm),
each of which binds ``test_op_matches_reference = matrix_test(<its ops>)``.

For each op and each backend in ``moe_ops.available_backends(op, device)`` except
``"reference"`` (devices: cpu, and cuda when present), the public function is called with
``backend=<name>`` on fresh random inputs and compared with ``moe_ops.reference``:

* integer outputs and pure data movement (``permute``, ``capacity_dispatch``) exactly, every
  element including padding (``sorted_slots == -1``, zero rows) -- the ops allocate their outputs,
  so this is what catches unwritten memory;
* float results with ``assert_close_to_reference`` (error vs the float64 reference at most twice
  the reference's own error in that dtype), NaN exactly where the reference has NaN;
* ``topk_gating`` with ``assert_gating_equal`` (exact ids except genuine near-ties);
* input regions the op must not read are NaN-poisoned (``a`` rows outside the offsets,
  ``y_sorted`` padding rows, unused capacity rows, weights of dropped slots);
* determinism: a second call gives bitwise equal outputs; inputs are not modified.

Shapes: E in {1, 2, 7, 8, 64, 257, 1024, 4096}, k up to 32, T in {0, 1, ~13, ~100}, H in
{8, 64, 200}, dtypes float32/float16/bfloat16. Backends that run emulated here (Triton
interpreter, SIMT emulator: see ``EMULATED``) get the smaller ``EMU_CASES`` matrix unless
``MOE_OPS_TEST_FULL=1``.

A backend that cannot run a dtype for an op declares it when it registers
(``moe_ops.backend.register(..., unsupported={(op, dtype, device_type): reason})``, e.g. Triton's
interpreter and bf16 ``tl.dot``); ``moe_ops.backend.unsupported_reason`` reports it and those
combinations are skipped with the reason.

The router probes (+-inf / NaN logits) live in tests/test_topk_gating.py; the check that this
machinery fails on broken backends, and the forked-child check, in tests/test_op_matrix.py.
"""
from __future__ import annotations


import pytest
import torch

from moe_ops import envs
import moe_ops
from moe_ops import backend as _backend
from moe_ops import reference as R
from moe_ops.backend import unsupported_reason
from tests.backends import DEVICES, backends_for
from tests.compare import assert_bitwise_equal, assert_close_to_reference, assert_exact, assert_gating_equal, reference_hi
from tests.inputs import make_ids, make_logits, make_offsets, make_x, seed_for

LOWP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

OPS = _backend.OP_NAMES

# (E, k, T, H): every E of the brief, k up to 32, T in {0, 1, ~13, ~100}, H in {8, 64, 200}.
CASES = [
    (1, 1, 0, 8), (1, 1, 13, 64),
    (2, 2, 1, 8), (2, 1, 100, 8),
    (7, 3, 13, 200), (7, 7, 5, 8),
    (8, 2, 100, 64), (8, 8, 1, 8),
    (64, 8, 100, 8), (64, 32, 13, 8),
    (257, 32, 13, 8), (257, 4, 100, 8),
    (1024, 16, 13, 8), (1024, 2, 100, 8),
    (4096, 32, 5, 8), (4096, 8, 0, 8),
]

# Backends that run on an emulator on this machine (the Triton interpreter, the SIMT emulator)
# are ~100-1000x slower per launch; they get this smaller matrix unless MOE_OPS_TEST_FULL=1.
# It keeps every E class, T in {0, 1, ~13, 100} and every dtype, with smaller sizes.
EMULATED = {("triton", "cpu"), ("cuda_sim", "cpu")}
EMU_CASES = [
    (1, 1, 0, 8), (2, 2, 1, 8), (7, 3, 13, 64), (8, 2, 100, 8), (64, 8, 5, 8), (257, 4, 3, 8),
    (4096, 4, 1, 8),
]
EMU_SKIP = {("grouped_gemm_wgrad", (4096, 4, 1, 8))}   # db alone is E*K*N; covered at full size
EMU_FP32_ONLY = {(8, 2, 100, 8)}


def _cases_for(op, name, device, dtype):
    if envs.flag("MOE_OPS_TEST_FULL") or (name, device) not in EMULATED:
        return list(enumerate(CASES))
    return [(i, c) for i, c in enumerate(EMU_CASES) if (op, c) not in EMU_SKIP
            and (dtype == torch.float32 or c not in EMU_FP32_ONLY)]


GATING_VARIANTS = ["softmax", "softmax_renorm_scaled", "sigmoid_bias", "grouped", "nan", "ties", "grouped_fill"]
IDS_MODES = [("uniform", 0.0), ("skew", 0.0), ("one", 0.0), ("dup", 0.0), ("uniform", 0.2)]


def _case_id(c):
    return "E{}-k{}-T{}-H{}".format(*c)


def _variant(i, options):
    return options[i % len(options)]


# -------------------------------------------------------------------- one op, one backend

def _group_args(E, k):
    """A valid (n_group, topk_group) for E and k: the smallest group count > 1 dividing E, or 1."""
    ng = next((g for g in (8, 4, 2) if E % g == 0 and E // g >= 1), 1)
    G = E // ng
    tg = min(ng, max(1, -(-k // G)) + (1 if ng > 2 else 0))
    return ng, tg


def _inputs(op, case, idx, dtype, device):
    """(public kwargs-call, reference positional args, output kinds) for op on this case."""
    E, k, T, H = case
    s = seed_for(op, case, str(dtype), device)
    mode, invalid = _variant(idx, IDS_MODES)
    if op == "topk_gating":
        v = _variant(idx, GATING_VARIANTS)
        logits = make_logits(T, E, seed=s, dtype=dtype, device=device, ties=v == "ties",
                             nan_rows=2 if v == "nan" else 0)
        kw = dict(scoring="softmax", renormalize=False, n_group=None, topk_group=None,
                  correction_bias=None, scaling_factor=1.0)
        if v == "softmax_renorm_scaled":
            kw.update(renormalize=True, scaling_factor=2.5)
        elif v in ("sigmoid_bias", "nan", "grouped"):
            kw.update(scoring="sigmoid", renormalize=True,
                      correction_bias=make_logits(1, E, seed=s + 1, device=device, scale=0.2)[0])
        if v == "grouped":
            ng, tg = _group_args(E, k)
            kw.update(n_group=ng, topk_group=tg, scaling_factor=2.5)
        elif v == "grouped_fill":  # k beyond the kept groups' experts: masked (-inf) ones fill in
            G = k - 1 if k > 1 and E % (k - 1) == 0 else 1
            kw.update(scoring="sigmoid", renormalize=True, n_group=E // G, topk_group=1,
                      correction_bias=make_logits(1, E, seed=s + 1, device=device, scale=0.2)[0])
        return dict(logits=logits, k=k, kw=kw)
    ids = make_ids(T, k, E, seed=s + 2, mode=mode, invalid=invalid, device=device)
    x = make_x(T, H, seed=s + 3, dtype=dtype, device=device)
    if op == "permute":
        return dict(args=(x, ids, E), kw=dict(block_m=_variant(idx, [1, 4, 16, 3]), allow_invalid_ids=True),
                    ref=(x, ids, E, _variant(idx, [1, 4, 16, 3])))
    if op == "unpermute":
        bm = _variant(idx, [1, 4, 16])
        _, sorted_slots, _, slot_rows = R.permute(x, ids, E, bm)
        y = make_x(sorted_slots.shape[0], H, seed=s + 4, dtype=dtype, device=device)
        y[sorted_slots < 0] = float("nan")                        # padding rows: never read
        w = make_logits(T, k, seed=s + 5, device=device).abs()
        w[slot_rows.reshape(T, k) < 0] = float("nan")              # dropped slots: never read
        w = None if idx % 4 == 3 else w
        return dict(args=(y, slot_rows, w), kw=dict(k=k), ref=(y, slot_rows, w, k))
    if op == "capacity_dispatch":
        C = _variant(idx, [moe_ops.expert_capacity(T, k, E, 1.0), 0, 1, moe_ops.expert_capacity(T, k, E, 2.0, min_capacity=4)])
        prio = _variant(idx, ["kmajor", "token_major", "token_major", "kmajor", "token_major"])
        return dict(args=(x, ids, E, C), kw=dict(priority=prio, allow_invalid_ids=True), ref=(x, ids, E, C, prio))
    if op == "capacity_combine":
        C = _variant(idx, [moe_ops.expert_capacity(T, k, E, 1.25), 1, 3])
        prio = _variant(idx, ["kmajor", "token_major"])
        _, slot_pos, _, _ = R.capacity_dispatch(x, ids, E, C, prio)
        buf = make_x(E * C, H, seed=s + 4, dtype=dtype, device=device)
        used = torch.zeros(E * C + 1, dtype=torch.bool, device=device)
        used[torch.where(slot_pos >= 0, ids.long() * C + slot_pos.long(), E * C).reshape(-1)] = True
        buf[~used[: E * C]] = float("nan")                          # unused capacity: never read
        buf = buf.reshape(E, C, H)
        w = make_logits(T, k, seed=s + 5, device=device)
        w[slot_pos < 0] = float("nan")
        w = None if idx % 4 == 3 else w
        return dict(args=(buf, ids, slot_pos, w), kw={}, ref=(buf, ids, slot_pos, w))
    # grouped GEMMs: M rows like a permuted batch, unused head/tail rows poisoned.
    M = T * k + (idx % 3) * 3
    head, tail = (idx % 2) * min(2, M), ((idx // 2) % 2) * min(3, M)
    head, tail = (head, tail) if head + tail <= M else (0, 0)
    offs = make_offsets(M, E, seed=s + 6, head=head, tail=tail, empty=min(E - 1, E // 3), device=device)
    K, N = H, _variant(idx, [8, 24, 64 if H <= 64 else 8])
    a = make_x(M, K, seed=s + 7, dtype=dtype, device=device)
    outside = torch.ones(M, dtype=torch.bool, device=device)
    outside[head: M - tail] = False
    a[outside] = float("nan")
    if op == "grouped_gemm":
        trans_b = bool(idx % 2)
        b = make_x(E * K, N, seed=s + 8, dtype=dtype, device=device, scale=0.5).reshape(E, K, N)
        if trans_b:
            b = b.transpose(1, 2).contiguous()
        return dict(args=(a, b, offs), kw=dict(trans_b=trans_b), ref=(a, b, offs, trans_b))
    dc = make_x(M, N, seed=s + 8, dtype=dtype, device=device)
    dc[outside] = float("nan")
    return dict(args=(a, dc, offs, E), kw={}, ref=(a, dc, offs, E))


def _snapshot(values):
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in values]


def check_op(op, name, device, dtype, case, idx):
    """Run ``op`` on backend ``name`` and compare with the reference; AssertionError on mismatch."""
    inp = _inputs(op, case, idx, dtype, device)
    fn = getattr(moe_ops, op)
    if op == "topk_gating":
        call = lambda: fn(inp["logits"], inp["k"], backend=name, **inp["kw"])  # noqa: E731
        tensors = [inp["logits"], inp["kw"]["correction_bias"]]
    else:
        call = lambda: fn(*inp["args"], backend=name, **inp["kw"])  # noqa: E731
        tensors = list(inp["args"])
    before = _snapshot(tensors)
    out1 = call()
    out2 = call()
    outs1 = tuple(out1) if isinstance(out1, tuple) else (out1,)
    outs2 = tuple(out2) if isinstance(out2, tuple) else (out2,)
    for o in outs1:
        assert o.device.type == device, f"{op}[{name}]: output on {o.device}, input on {device}"
    for i, (a, b) in enumerate(zip(outs1, outs2)):
        assert_bitwise_equal(a, b, f"{op}[{name}] output {i} (determinism)")
    for i, (t, t0) in enumerate(zip(tensors, before)):
        if isinstance(t, torch.Tensor):
            assert_exact(t, t0, f"{op}[{name}] input {i} was modified")

    if op == "topk_gating":
        kw = inp["kw"]
        assert_gating_equal(outs1[0], outs1[1], inp["logits"], inp["k"], kw["scoring"], kw["renormalize"],
                            kw["n_group"] or 0, kw["topk_group"] or 0, kw["correction_bias"],
                            kw["scaling_factor"])
        return
    ref = getattr(R, op)(*inp["ref"])
    refs = tuple(ref) if isinstance(ref, tuple) else (ref,)
    assert len(outs1) == len(refs), f"{op}[{name}]: {len(outs1)} outputs, reference has {len(refs)}"
    if op in ("permute", "capacity_dispatch"):
        for i, (o, r) in enumerate(zip(outs1, refs)):
            assert_exact(o, r, f"{op}[{name}] output {i}")
        return
    hi = reference_hi(op, *inp["ref"])
    assert_close_to_reference(outs1[0], refs[0], hi, name=f"{op}[{name}]")


# MOE_OPS_TEST_SELF=1 runs the whole matrix with the reference registered as an extra backend
# ("reference_copy"): a check of the machinery itself (every case, dtype and tolerance path).
SELF = "reference_copy"
if envs.flag("MOE_OPS_TEST_SELF") and SELF not in _backend._LOADERS:
    _backend._LOADERS[SELF] = None
    _backend._LOADED.add(SELF)
    _backend.register(SELF, DEVICES, {op: getattr(R, op) for op in OPS})


def params(ops):
    """pytest params ``(op, device, name, dtype, case, idx)`` of the matrix for ``ops``."""
    out = []
    for op in ops:
        for device in DEVICES:
            names = backends_for(op, device)
            if not names:  # one visible skip per (op, device) instead of hundreds
                out.append(pytest.param(op, device, None, None, None, 0, id=f"{op}-{device}-none",
                                        marks=pytest.mark.skip(reason=f"no backend other than the "
                                                               f"reference implements {op} on {device}")))
            for name in names:
                for dtype in LOWP_DTYPES:
                    for idx, case in _cases_for(op, name, device, dtype):
                        out.append(pytest.param(op, device, name, dtype, case, idx,
                                                id=f"{op}-{device}-{name}-{str(dtype)[6:]}-{_case_id(case)}"))
    return out


def run_case(op, device, name, dtype, case, idx):
    """One matrix entry: skipped when the backend declares the dtype unsupported, else checked."""
    reason = unsupported_reason(name, op, dtype, device)
    if reason:
        pytest.skip(f"{name} does not support {op} in {dtype}: {reason}")
    # salt the case index with the dtype so each dtype sees a different variant of the case
    check_op(op, name, device, dtype, case, idx + LOWP_DTYPES.index(dtype))


def matrix_test(ops):
    """``test_op_matches_reference`` over the matrix of ``ops``, for an op test file to bind at
    module level (pytest collects it there, as tests/test_<stem>.py::test_op_matches_reference)."""
    @pytest.mark.parametrize("op,device,name,dtype,case,idx", params(ops))
    def test_op_matches_reference(op, device, name, dtype, case, idx):
        run_case(op, device, name, dtype, case, idx)
    return test_op_matches_reference
