"""Every public function rejects bad input with TypeError/ValueError and a clear message, before
any kernel runs, and accepts empty inputs (T = 0, experts without tokens).

Device mismatches use the ``meta`` device (no GPU needed; value checks never read meta tensors).
int32-overflow cases use ``expand``-ed tensors (no memory) with value checks off, so nothing
reads their 2^31 elements.
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import backend as _backend

F32, I32 = torch.float32, torch.int32
BIG = 2**31  # rows past INT32_MAX


def z(*shape, dtype=F32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def ids_(T, k, E=4):
    return (torch.arange(T * k, dtype=I32).reshape(T, k) % E) if T else z(0, k, dtype=I32)


def offs_(*v):
    return torch.tensor(v, dtype=I32)


X, IDS = z(6, 3), ids_(6, 2)
W_GU, W_D = z(4, 8, 3), z(4, 3, 4)

BAD = [
    # --- topk_gating
    ("gating logits int", lambda: moe_ops.topk_gating(z(4, 8, dtype=I32), 2), TypeError, "logits must have dtype"),
    ("gating logits 1-D", lambda: moe_ops.topk_gating(z(8), 2), ValueError, "logits must be 2-D"),
    ("gating logits list", lambda: moe_ops.topk_gating([[0.0, 1.0]], 1), TypeError, "must be a torch.Tensor"),
    ("gating E=0", lambda: moe_ops.topk_gating(z(4, 0), 1), ValueError, "at least one expert"),
    ("gating k>E", lambda: moe_ops.topk_gating(z(4, 8), 9), ValueError, "k must be <= 8"),
    ("gating k>32", lambda: moe_ops.topk_gating(z(4, 64), 33), ValueError, "k must be <= 32"),
    ("gating k=0", lambda: moe_ops.topk_gating(z(4, 8), 0), ValueError, "k must be >= 1"),
    ("gating k float", lambda: moe_ops.topk_gating(z(4, 8), 2.0), TypeError, "k must be an int"),
    ("gating k bool", lambda: moe_ops.topk_gating(z(4, 8), True), TypeError, "k must be an int"),
    ("gating scoring", lambda: moe_ops.topk_gating(z(4, 8), 2, scoring="relu"), ValueError, "scoring must be one of"),
    ("gating n_group alone", lambda: moe_ops.topk_gating(z(4, 8), 2, n_group=2), ValueError, "together"),
    ("gating n_group not dividing", lambda: moe_ops.topk_gating(z(4, 9), 2, n_group=2, topk_group=1), ValueError, "not divisible by n_group"),
    ("gating topk_group > n_group", lambda: moe_ops.topk_gating(z(4, 8), 2, n_group=2, topk_group=3), ValueError, "topk_group must be <= 2"),
    ("gating bias shape", lambda: moe_ops.topk_gating(z(4, 8), 2, correction_bias=z(7)), ValueError, "correction_bias must have 8"),
    ("gating bias dtype", lambda: moe_ops.topk_gating(z(4, 8), 2, correction_bias=z(8, dtype=I32)), TypeError, "correction_bias must have dtype"),
    ("gating bias device", lambda: moe_ops.topk_gating(z(4, 8), 2, correction_bias=z(8, device="meta")), ValueError, "one device"),
    ("gating scaling str", lambda: moe_ops.topk_gating(z(4, 8), 2, scaling_factor="2"), TypeError, "scaling_factor"),
    ("gating unknown backend", lambda: moe_ops.topk_gating(z(4, 8), 2, backend="nope"), ValueError, "unknown backend"),
    ("gating expert_range type", lambda: moe_ops.topk_gating(z(4, 8), 2, expert_range=3), TypeError, "expert_range must be a"),
    ("gating expert_range past E", lambda: moe_ops.topk_gating(z(4, 8), 2, expert_range=(6, 3)), ValueError, "exceeds the 8 experts"),
    ("gating expert_range count 0", lambda: moe_ops.topk_gating(z(4, 8), 2, expert_range=(0, 0)), ValueError, "count must be >= 1"),
    ("gating expert_range start<0", lambda: moe_ops.topk_gating(z(4, 8), 2, expert_range=(-1, 2)), ValueError, "start must be >= 0"),
    # --- permute
    ("permute expert_range past E", lambda: moe_ops.permute(X, IDS, 4, expert_range=(2, 3)), ValueError, "exceeds the 4 experts"),
    ("to_local_ids bad range", lambda: moe_ops.to_local_ids(IDS, (1,)), TypeError, "expert_range must be a"),
    ("permute x int", lambda: moe_ops.permute(z(6, 3, dtype=I32), IDS, 4), TypeError, "x must have dtype"),
    ("permute ids float", lambda: moe_ops.permute(X, IDS.float(), 4), TypeError, "ids must have dtype"),
    ("permute ids 1-D", lambda: moe_ops.permute(X, IDS.reshape(-1), 4), ValueError, "ids must be 2-D"),
    ("permute ids rows", lambda: moe_ops.permute(X, ids_(5, 2), 4), ValueError, "ids has 5 rows but x has 6"),
    ("permute ids >= E", lambda: moe_ops.permute(X, IDS, 3), ValueError, r"ids must lie in \[0, 3\)"),
    ("permute ids < 0", lambda: moe_ops.permute(X, IDS - 1, 4), ValueError, r"allow_invalid_ids"),
    ("permute k=0", lambda: moe_ops.permute(X, z(6, 0, dtype=I32), 4, block_m=4), ValueError, r"k in \[1, 32\]"),
    ("permute k=33", lambda: moe_ops.permute(X, z(6, 33, dtype=I32), 4), ValueError, r"k in \[1, 32\]"),
    ("permute E=0", lambda: moe_ops.permute(X, IDS, 0), ValueError, "num_experts must be >= 1"),
    ("permute block_m=0", lambda: moe_ops.permute(X, IDS, 4, block_m=0), ValueError, "block_m must be >= 1"),
    ("permute device", lambda: moe_ops.permute(X, IDS.to("meta"), 4), ValueError, "one device"),
    ("permute P overflow", lambda: moe_ops.permute(X, IDS, 2**20, block_m=4096), ValueError, "overflows int32"),
    # --- unpermute
    ("unpermute y int", lambda: moe_ops.unpermute(z(12, 3, dtype=I32), ids_(6, 2).reshape(-1), z(6, 2)), TypeError, "y_sorted must have dtype"),
    ("unpermute rows float", lambda: moe_ops.unpermute(z(12, 3), z(12), z(6, 2)), TypeError, "slot_rows must have dtype"),
    ("unpermute no k", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1)), ValueError, "needs k"),
    ("unpermute k mismatch", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1), z(6, 2), k=3), ValueError, "disagrees"),
    ("unpermute not multiple", lambda: moe_ops.unpermute(z(12, 3), ids_(1, 5).reshape(-1), k=2), ValueError, "not a multiple"),
    ("unpermute weights rows", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1), z(5, 2)), ValueError, r"weights must have shape \(6, 2\)"),
    ("unpermute weights dtype", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1), z(6, 2, dtype=I32)), TypeError, "weights must have dtype"),
    ("unpermute row out of range", lambda: moe_ops.unpermute(z(3, 3), ids_(6, 2, E=4).reshape(-1), z(6, 2)), ValueError, r"slot_rows must lie in \[-1, 3\)"),
    ("unpermute row < -1", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1) - 2, z(6, 2)), ValueError, "slot_rows must lie in"),
    ("unpermute k>32", lambda: moe_ops.unpermute(z(40, 3), torch.zeros(40, dtype=I32), k=40), ValueError, "k must be <= 32"),
    ("unpermute device", lambda: moe_ops.unpermute(z(12, 3), ids_(6, 2).reshape(-1), z(6, 2, device="meta")), ValueError, "one device"),
    # --- expert_capacity
    ("capacity tokens<0", lambda: moe_ops.expert_capacity(-1, 2, 8, 1.0), ValueError, "num_tokens must be >= 0"),
    ("capacity factor<0", lambda: moe_ops.expert_capacity(8, 2, 8, -0.5), ValueError, "capacity_factor"),
    ("capacity factor nan", lambda: moe_ops.expert_capacity(8, 2, 8, float("nan")), ValueError, "capacity_factor"),
    ("capacity factor inf", lambda: moe_ops.expert_capacity(8, 2, 8, float("inf")), ValueError, "capacity_factor"),
    ("capacity factor str", lambda: moe_ops.expert_capacity(8, 2, 8, "1"), TypeError, "capacity_factor"),
    ("capacity E=0", lambda: moe_ops.expert_capacity(8, 2, 0, 1.0), ValueError, "num_experts must be >= 1"),
    ("capacity multiple_of=0", lambda: moe_ops.expert_capacity(8, 2, 8, 1.0, multiple_of=0), ValueError, "multiple_of"),
    # --- capacity_dispatch
    ("dispatch capacity<0", lambda: moe_ops.capacity_dispatch(X, IDS, 4, -1), ValueError, "capacity must be >= 0"),
    ("dispatch capacity float", lambda: moe_ops.capacity_dispatch(X, IDS, 4, 2.5), TypeError, "capacity must be an int"),
    ("dispatch priority", lambda: moe_ops.capacity_dispatch(X, IDS, 4, 2, priority="random"), ValueError, "priority must be one of"),
    ("dispatch ids range", lambda: moe_ops.capacity_dispatch(X, IDS, 2, 2), ValueError, r"ids must lie in \[0, 2\)"),
    ("dispatch ids rows", lambda: moe_ops.capacity_dispatch(X, ids_(3, 2), 4, 2), ValueError, "rows"),
    ("dispatch device", lambda: moe_ops.capacity_dispatch(X.to("meta"), IDS, 4, 2), ValueError, "one device"),
    ("dispatch E*C overflow", lambda: moe_ops.capacity_dispatch(X, IDS, 4, 2**30), ValueError, "overflows int32"),
    # --- capacity_combine
    ("combine buf 2-D", lambda: moe_ops.capacity_combine(z(4, 3), IDS, IDS), ValueError, "buf_out must be 3-D"),
    ("combine slot_pos float", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS, IDS.float()), TypeError, "slot_pos must have dtype"),
    ("combine shapes", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS, ids_(6, 1)), ValueError, "slot_pos shape"),
    ("combine pos >= C", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS, IDS), ValueError, r"slot_pos must lie in \[-1, 2\)"),
    ("combine kept invalid id", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS + 4, IDS % 2), ValueError, "kept slots need ids"),
    ("combine weights shape", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS, IDS % 2, z(6, 3)), ValueError, "weights must have shape"),
    ("combine device", lambda: moe_ops.capacity_combine(z(4, 2, 3), IDS.to("meta"), IDS % 2), ValueError, "one device"),
    # --- grouped_gemm
    ("gemm a int", lambda: moe_ops.grouped_gemm(z(6, 3, dtype=I32), W_D, offs_(0, 1, 2, 3, 6)), TypeError, "a must have dtype"),
    ("gemm dtype mismatch", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5, dtype=torch.float16), offs_(0, 1, 2, 3, 6)), TypeError, "share a dtype"),
    ("gemm b 2-D", lambda: moe_ops.grouped_gemm(z(6, 3), z(3, 5), offs_(0, 6)), ValueError, "b must be 3-D"),
    ("gemm K mismatch", lambda: moe_ops.grouped_gemm(z(6, 4), z(4, 3, 5), offs_(0, 1, 2, 3, 6)), ValueError, "K=3"),
    ("gemm K mismatch trans", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(0, 1, 2, 3, 6), trans_b=True), ValueError, "trans_b"),
    ("gemm offsets int64", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(0, 1, 2, 3, 6).long()), TypeError, "expert_offsets must have dtype"),
    ("gemm offsets count", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(0, 1, 6)), ValueError, "E\\+1 = 5 entries"),
    ("gemm offsets not monotone", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(0, 3, 2, 4, 6)), ValueError, "non-decreasing"),
    ("gemm offsets negative", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(-1, 1, 2, 4, 6)), ValueError, "non-negative"),
    ("gemm offsets past M", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5), offs_(0, 1, 2, 4, 7)), ValueError, "past the 6 rows"),
    ("gemm device", lambda: moe_ops.grouped_gemm(z(6, 3), z(4, 3, 5, device="meta"), offs_(0, 1, 2, 3, 6)), ValueError, "one device"),
    # --- grouped_gemm_wgrad
    ("wgrad dtype", lambda: moe_ops.grouped_gemm_wgrad(z(6, 3), z(6, 5, dtype=torch.float16), offs_(0, 3, 6), 2), ValueError, "share rows and dtype"),
    ("wgrad rows", lambda: moe_ops.grouped_gemm_wgrad(z(6, 3), z(5, 5), offs_(0, 3, 6), 2), ValueError, "share rows and dtype"),
    ("wgrad E mismatch", lambda: moe_ops.grouped_gemm_wgrad(z(6, 3), z(6, 5), offs_(0, 3, 6), 3), ValueError, "E\\+1 = 4 entries"),
    ("wgrad offsets past M", lambda: moe_ops.grouped_gemm_wgrad(z(6, 3), z(6, 5), offs_(0, 3, 9), 2), ValueError, "past the 6 rows"),
    ("wgrad E=0", lambda: moe_ops.grouped_gemm_wgrad(z(6, 3), z(6, 5), offs_(0), 0), ValueError, "num_experts must be >= 1"),
    # --- moe_forward
    ("moe x int", lambda: moe_ops.moe_forward(z(6, 3, dtype=I32), z(6, 4), W_GU, W_D, 2), TypeError, "x must have dtype"),
    ("moe logits None", lambda: moe_ops.moe_forward(X, None, W_GU, W_D, 2), TypeError, "router_logits must be a torch.Tensor"),
    ("moe logits shape", lambda: moe_ops.moe_forward(X, z(6, 5), W_GU, W_D, 2), ValueError, "router_logits must be"),
    ("moe w_gate_up odd", lambda: moe_ops.moe_forward(X, z(6, 4), z(4, 7, 3), W_D, 2), ValueError, "w_gate_up must be"),
    ("moe w_down shape", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU, z(4, 4, 3), 2), ValueError, "w_down must be"),
    ("moe dtype mix", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU.half(), W_D.half(), 2), TypeError, "share a dtype"),
    ("moe activation", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU, W_D, 2, activation="relu"), ValueError, "activation"),
    ("moe k>E", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU, W_D, 5), ValueError, "k must be <= 4"),
    ("moe priority", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU, W_D, 2, capacity_factor=1.0, priority="x"), ValueError, "priority"),
    ("moe capacity_factor", lambda: moe_ops.moe_forward(X, z(6, 4), W_GU, W_D, 2, capacity_factor=-1.0), ValueError, "capacity_factor"),
    ("moe device", lambda: moe_ops.moe_forward(X, z(6, 4, device="meta"), W_GU, W_D, 2), ValueError, "one device"),
]


@pytest.mark.parametrize("call,exc,match", [pytest.param(c, e, m, id=n) for n, c, e, m in BAD])
def test_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.fixture
def no_value_checks(monkeypatch):
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", "0")


class _Unreadable(torch.Tensor):
    """A tensor whose values must not be touched: metadata queries only. Size checks must refuse
    a 2**31-element expanded view before anything reads, converts or reshapes it (each of which
    would allocate or scan gigabytes first)."""
    _META = {torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.size, torch.Tensor.stride,
             torch.Tensor.is_inference, torch.Tensor.element_size, torch.Tensor.is_contiguous}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in cls._META and getattr(func, "__name__", "") != "__get__":  # properties: shape, dtype..
            raise AssertionError(f"read {getattr(func, '__name__', func)} of a 2**31-element view before its size check")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _big(*shape, dtype=F32):
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape).as_subclass(_Unreadable)


def _big_ids(rows, k, dtype=I32):
    return _big(rows, k, dtype=dtype)


OVERFLOW = [
    ("gating T*k", lambda: moe_ops.topk_gating(_big(2**26, 32), 32)),
    ("permute T*k", lambda: moe_ops.permute(_big(2**26, 1), _big_ids(2**26, 32), 4)),
    ("permute T*k int64", lambda: moe_ops.permute(_big(2**26, 1), _big_ids(2**26, 32, torch.int64), 4)),
    ("unpermute T*k", lambda: moe_ops.unpermute(z(4, 1), _big(BIG, dtype=I32), k=1)),
    ("unpermute T*k 2-D", lambda: moe_ops.unpermute(z(4, 1), _big(2**26, 32, dtype=torch.int64), k=32)),
    ("dispatch T*k", lambda: moe_ops.capacity_dispatch(_big(2**26, 1), _big_ids(2**26, 32), 4, 1)),
    ("dispatch T*k int64", lambda: moe_ops.capacity_dispatch(_big(2**26, 1), _big_ids(2**26, 32, torch.int64), 4, 1)),
    ("combine T*k", lambda: moe_ops.capacity_combine(z(4, 1, 1), _big_ids(2**26, 32), _big_ids(2**26, 32))),
    ("gemm M", lambda: moe_ops.grouped_gemm(_big(BIG, 1), z(1, 1, 1), offs_(0, 1))),
    ("wgrad M", lambda: moe_ops.grouped_gemm_wgrad(_big(BIG, 1), _big(BIG, 1), offs_(0, 1), 1)),
]


def _meta(*shape, dtype=F32):
    return torch.empty(*shape, dtype=dtype, device="meta")


OVERFLOW += [  # the same sizes as meta tensors: no memory at all, refused by size alone
    ("meta gating T*k", lambda: moe_ops.topk_gating(_meta(2**26, 64), 32)),
    ("meta permute T*k", lambda: moe_ops.permute(_meta(2**26, 8), _meta(2**26, 32, dtype=I32), 4)),
    ("meta unpermute T*k", lambda: moe_ops.unpermute(_meta(4, 8), _meta(BIG, dtype=I32), k=1)),
    ("meta dispatch T*k", lambda: moe_ops.capacity_dispatch(_meta(2**26, 8), _meta(2**26, 32, dtype=I32), 4, 1)),
    ("meta combine T*k", lambda: moe_ops.capacity_combine(_meta(4, 1, 8), _meta(2**26, 32, dtype=I32),
                                                          _meta(2**26, 32, dtype=I32))),
    ("meta gemm M", lambda: moe_ops.grouped_gemm(_meta(BIG, 8), _meta(1, 8, 8), _meta(2, dtype=I32))),
    ("meta moe_forward T*k", lambda: moe_ops.moe_forward(_meta(2**26, 8), _meta(2**26, 64), _meta(64, 16, 8),
                                                         _meta(64, 8, 8), 32)),
    ("moe_forward T*k", lambda: moe_ops.moe_forward(_big(2**26, 8), _big(2**26, 64), z(64, 16, 8), z(64, 8, 8), 32)),
]


@pytest.mark.parametrize("checks", ["0", "auto"], ids=["value_checks_off", "value_checks_on"])
@pytest.mark.parametrize("call", [pytest.param(c, id=n) for n, c in OVERFLOW])
def test_rejects_int32_overflow(call, checks, monkeypatch):
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", checks)
    with pytest.raises(ValueError, match="overflows int32"):
        call()


@pytest.mark.parametrize("E", [2**31 - 1, 2**31, 2**40])
def test_rejects_num_experts_past_int32(E):
    for call in (lambda: moe_ops.permute(X, IDS, E), lambda: moe_ops.capacity_dispatch(X, IDS, E, 1),
                 lambda: moe_ops.grouped_gemm_wgrad(X, X, offs_(0, 6), E)):
        with pytest.raises(ValueError, match="num_experts must be <= 2147483646"):
            call()


# int64 ids past int32: a plain cast would wrap 2**32 + 1 onto expert 1; they must be dropped
_WIDE = torch.tensor([[0, 2**32 + 1], [1, 2], [3, -2**32 + 2], [2**31, 2]])
_WIDE_AS_DROPPED = torch.tensor([[0, -1], [1, 2], [3, -1], [-1, 2]], dtype=I32)


@pytest.mark.parametrize("backend", [b for b in moe_ops.available_backends("permute", "cpu")])
def test_int64_ids_past_int32_are_dropped(backend):
    x = torch.randn(4, 5)
    w = torch.rand(4, 2)
    kw = dict(allow_invalid_ids=True, backend=backend)
    for a, b in zip(moe_ops.permute(x, _WIDE, 4, **kw), moe_ops.permute(x, _WIDE_AS_DROPPED, 4, **kw)):
        assert torch.equal(a, b)
    got, want = moe_ops.capacity_dispatch(x, _WIDE, 4, 2, **kw), moe_ops.capacity_dispatch(x, _WIDE_AS_DROPPED, 4, 2, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    out = moe_ops.capacity_combine(want.buf, _WIDE, want.slot_pos, w, backend=backend)
    assert torch.equal(out, moe_ops.capacity_combine(want.buf, _WIDE_AS_DROPPED, want.slot_pos, w, backend=backend))
    assert torch.equal(moe_ops.to_local_ids(_WIDE, (0, 4)), _WIDE_AS_DROPPED)
    assert moe_ops.to_local_ids(torch.tensor([[2**32 + 5]]), (4, 4)).tolist() == [[-1]]


def test_value_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", "0")
    # out-of-range ids pass the (disabled) value check and are then dropped by the op
    out = moe_ops.permute(X, IDS + 10, 4)
    assert (out.slot_rows == -1).all() and (out.sorted_slots == -1).all()


@pytest.mark.parametrize("backend", moe_ops.available_backends())
def test_accepts_empty(backend):
    """T = 0 (and experts without tokens) through every public function."""
    devs = sorted(_backend._load(backend).devices)
    if "cpu" not in devs:
        pytest.skip("cpu-less backend")
    kw = dict(backend=backend)
    w, ids = moe_ops.topk_gating(z(0, 8), 2, **kw)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == I32
    w, ids = moe_ops.topk_gating(z(0, 8), 2, scoring="sigmoid", n_group=4, topk_group=2,
                                 correction_bias=z(8), **kw)
    assert ids.shape == (0, 2)
    r = moe_ops.permute(z(0, 3), ids, 8, block_m=4, **kw)
    assert r.x_sorted.shape == (8 * 3, 3) and (r.x_sorted == 0).all() and (r.sorted_slots == -1).all()
    assert r.expert_offsets.tolist() == [0] * 9 and r.slot_rows.shape == (0,)
    assert moe_ops.unpermute(r.x_sorted, r.slot_rows, w, **kw).shape == (0, 3)
    assert moe_ops.unpermute(r.x_sorted, r.slot_rows, k=2, **kw).shape == (0, 3)
    d = moe_ops.capacity_dispatch(z(0, 3), ids, 8, 2, **kw)
    assert d.buf.shape == (8, 2, 3) and (d.buf == 0).all() and d.demand.tolist() == [0] * 8
    assert moe_ops.capacity_combine(d.buf, ids, d.slot_pos, w, **kw).shape == (0, 3)
    d0 = moe_ops.capacity_dispatch(z(5, 3), ids_(5, 2), 8, 0, **kw)  # C = 0: all dropped
    assert d0.buf.shape == (8, 0, 3) and (d0.slot_pos == -1).all() and d0.kept.tolist() == [0] * 8
    if "grouped_gemm" in _backend._load(backend).ops:  # the CUDA backend has no GEMM kernels
        assert moe_ops.grouped_gemm(z(0, 3), z(8, 3, 5), torch.zeros(9, dtype=I32), **kw).shape == (0, 5)
        assert moe_ops.grouped_gemm_wgrad(z(0, 3), z(0, 5), torch.zeros(9, dtype=I32), 8, **kw).shape == (8, 3, 5)
    assert moe_ops.moe_forward(z(0, 3), z(0, 4), W_GU, W_D, 2, backend=backend).shape == (0, 3)
    assert moe_ops.moe_forward(z(0, 3), z(0, 4), W_GU, W_D, 2, capacity_factor=1.0, backend=backend).shape == (0, 3)


def test_int64_ids_are_accepted():
    r64 = moe_ops.permute(X, IDS.long(), 4)
    r32 = moe_ops.permute(X, IDS, 4)
    for a, b in zip(r64, r32):
        assert torch.equal(a, b)
