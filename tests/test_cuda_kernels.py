"""The CUDA kernels' own edge cases, run on CPU by the SIMT emulator (backend ``cuda_sim``).

The op tests (tests/test_<op family>.py over tests/op_matrix.py) already run every op against
the reference over the brief's shape matrix; this file goes after what that matrix does not pin down for *these* kernels:

* topk_gating: each launch path and its boundaries (warp with 8 / 16 values per lane, block per
  row up to E = 16384), the 16-byte vector load and its scalar fallback (unaligned rows),
  special values (+-inf, all -inf, NaN, -0.0 vs +0.0 ties), group-limited corner cases
  (G = 1, all groups kept), float64 logits rejected (the router computes in float32);
* permute / capacity_dispatch: the chunked deterministic ranking across many chunks and with
  a large E (bigger chunks), every row-gather word width (16/8/4/2 bytes) incl. unaligned x;
* unpermute / capacity_combine: vector and scalar column paths, unaligned y, k > 32, float64
  (accumulated in float64 like the reference);
* the C++ argument checks of the shared torch binding (ops_binding.h).
Every comparison is against moe_ops.reference on fresh random inputs; data movement exactly.
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import reference as R
from tests.compare import (assert_bitwise_equal, assert_close_to_reference, assert_exact, assert_gating_equal,
                           reference_hi)
from tests.inputs import make_ids, make_logits, make_x, seed_for

pytestmark = pytest.mark.skipif("cuda_sim" not in moe_ops.available_backends(),
                                reason="the SIMT emulator library _C_sim is not built")
SIM = "cuda_sim"


def _ops():
    return torch.ops.moe_ops_sim


def _unaligned(t: torch.Tensor, shift_elems: int = 1) -> torch.Tensor:
    """A contiguous copy of ``t`` whose data pointer is ``shift_elems`` elements past a
    16-byte boundary (so the kernels must take their scalar fallbacks)."""
    buf = torch.empty(t.numel() + shift_elems, dtype=t.dtype)
    out = buf[shift_elems:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def _gating(logits, k, **kw):
    w, i = moe_ops.topk_gating(logits, k, backend=SIM, **kw)
    w2, i2 = moe_ops.topk_gating(logits, k, backend=SIM, **kw)
    assert_bitwise_equal(w, w2, "weights (determinism)")
    assert_bitwise_equal(i, i2, "ids (determinism)")
    return w, i


def _check_gating(logits, k, scoring="softmax", renormalize=False, n_group=None, topk_group=None,
                  correction_bias=None, scaling_factor=1.0):
    w, i = _gating(logits, k, scoring=scoring, renormalize=renormalize, n_group=n_group,
                   topk_group=topk_group, correction_bias=correction_bias, scaling_factor=scaling_factor)
    assert_gating_equal(w, i, logits, k, scoring, renormalize, n_group or 0, topk_group or 0,
                        correction_bias, scaling_factor)
    return w, i


# --------------------------------------------------------------------------------- topk_gating

# E around each launch-path boundary: warp/8 per lane (<= 256), warp/16 (<= 512), block above.
@pytest.mark.parametrize("E", [3, 32, 255, 256, 257, 512, 513, 2049, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gating_paths(E, dtype):
    k = min(E, 32 if E <= 4096 else 8)
    T = 3 if E <= 4096 else 1
    lg = make_logits(T, E, seed=seed_for("paths", E, str(dtype)), dtype=dtype)
    _check_gating(lg, k)
    _check_gating(lg, k, scoring="sigmoid", renormalize=True, scaling_factor=1.5,
                  correction_bias=make_logits(1, E, seed=seed_for("bias", E), scale=0.3)[0])


@pytest.mark.parametrize("E", [24, 300, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gating_unaligned_rows(E, dtype):
    """Rows that do not start on 16 bytes take the scalar load path, same result."""
    lg = make_logits(5, E, seed=seed_for("unaligned", E, str(dtype)), dtype=dtype)
    ua = _unaligned(lg)
    w, i = _check_gating(ua, 8, renormalize=True)
    w0, i0 = _gating(lg, 8, renormalize=True)
    assert_exact(i, i0, "ids aligned vs unaligned")
    assert_exact(w, w0, "weights aligned vs unaligned")


def test_gating_special_values():
    inf, nan = float("inf"), float("nan")
    E = 40
    lg = make_logits(8, E, seed=seed_for("special"))
    lg[0, 5] = inf                    # softmax row -> all NaN; key ranks inf first
    lg[1, :] = -inf                   # all -inf -> NaN scores; ties -> lowest indices
    lg[2, 3] = -inf
    lg[3, ::3] = nan                  # NaN keys rank last
    lg[4, :] = 0.0
    lg[4, 1::2] = -0.0                # -0.0 and +0.0 tie: lower index first
    lg[5, :] = nan                    # all NaN: ids 0..k-1
    lg[6, :] = 1.0                    # exact ties everywhere
    for scoring, bias in (("softmax", None), ("sigmoid", None),
                          ("sigmoid", make_logits(1, E, seed=1, scale=0.1)[0]),
                          ("softmax", make_logits(1, E, seed=2, scale=0.1)[0])):
        for renorm in (False, True):
            _check_gating(lg, 6, scoring=scoring, renormalize=renorm, correction_bias=bias)
    _, ids = _gating(lg, 6)
    assert ids[4].tolist() == list(range(6)), "signed zeros must tie (lower index first)"
    assert ids[5].tolist() == list(range(6)) and ids[6].tolist() == list(range(6))
    assert ids[0, 0].item() == 5


@pytest.mark.parametrize("E,n_group,topk_group,k", [
    (256, 8, 4, 8),      # DeepSeek-V3
    (64, 64, 5, 5),      # G = 1: group score = the key itself
    (48, 6, 6, 12),      # every group kept
    (1024, 16, 3, 32),   # block path with groups
    (7, 7, 1, 1),
])
def test_gating_grouped(E, n_group, topk_group, k):
    s = seed_for("grouped", E, n_group)
    lg = make_logits(6, E, seed=s, nan_rows=1)
    bias = make_logits(1, E, seed=s + 1, scale=0.2)[0]
    _check_gating(lg, k, scoring="sigmoid", renormalize=True, n_group=n_group, topk_group=topk_group,
                  correction_bias=bias, scaling_factor=2.5)
    _check_gating(lg, k, scoring="softmax", n_group=n_group, topk_group=topk_group)


def test_gating_rejects_float64():
    """DESIGN.md: the router works in float32; the CUDA kernel says so instead of silently
    returning float32 weights where the reference (and the fake) give float64."""
    with pytest.raises(RuntimeError, match="float64"):
        _ops().topk_gating(make_logits(2, 16, seed=1, dtype=torch.float64), 2, "softmax", False, 0, 0, None, 1.0)


def test_gating_empty():
    w, i = _gating(torch.randn(0, 300), 4)
    assert w.shape == (0, 4) and i.shape == (0, 4)


# ------------------------------------------------------------------------ permute / dispatch

def _permute_case(T, k, E, H, block_m, dtype, seed, x=None, invalid=0.1):
    ids = make_ids(T, k, E, seed=seed, mode="dup", invalid=invalid)
    x = make_x(T, H, seed=seed + 1, dtype=dtype) if x is None else x
    out = moe_ops.permute(x, ids, E, block_m=block_m, allow_invalid_ids=True, backend=SIM)
    ref = R.permute(x, ids, E, block_m)
    for n, o, r in zip(("x_sorted", "sorted_slots", "expert_offsets", "slot_rows"), out, ref):
        assert_exact(o, r, f"permute {n}")
    again = moe_ops.permute(x, ids, E, block_m=block_m, allow_invalid_ids=True, backend=SIM)
    for o, a in zip(out, again):
        assert_bitwise_equal(o, a, "permute (determinism)")


def test_permute_many_chunks():
    """T*k = 2400 slots: ten 256-slot chunks, so chunk bases carry across chunks."""
    _permute_case(300, 8, 5, 4, 3, torch.float32, seed_for("chunks"))


def test_permute_large_num_experts():
    """E = 300000 caps the count table at 1M cells: chunks grow past 256 slots."""
    _permute_case(700, 2, 300_000, 2, 1, torch.bfloat16, seed_for("bigE"), invalid=0.0)


@pytest.mark.parametrize("dtype,H", [(torch.float32, 8), (torch.float32, 2), (torch.float32, 3),
                                     (torch.float16, 5), (torch.bfloat16, 24), (torch.float64, 3)])
def test_permute_word_widths(dtype, H):
    """Rows of 16*n, 8, 4*n and 2*n bytes use 16/8/4/2-byte words; an unaligned x falls back."""
    s = seed_for("words", str(dtype), H)
    _permute_case(20, 3, 6, H, 4, dtype, s)
    _permute_case(20, 3, 6, H, 1, dtype, s, x=_unaligned(make_x(20, H, seed=s + 1, dtype=dtype)))


@pytest.mark.parametrize("priority", ["kmajor", "token_major"])
def test_capacity_dispatch_many_chunks(priority):
    T, k, E, H = 200, 4, 6, 8
    s = seed_for("cap", priority)
    ids = make_ids(T, k, E, seed=s, mode="skew", invalid=0.05)
    x = _unaligned(make_x(T, H, seed=s + 1, dtype=torch.float16))
    for C in (0, 7, 150, 1000):
        out = moe_ops.capacity_dispatch(x, ids, E, C, priority=priority, allow_invalid_ids=True, backend=SIM)
        ref = R.capacity_dispatch(x, ids, E, C, priority)
        for n, o, r in zip(("buf", "slot_pos", "demand", "kept"), out, ref):
            assert_exact(o, r, f"capacity_dispatch {n} (C={C})")


# ----------------------------------------------------------------------------------- combine

@pytest.mark.parametrize("dtype,H,unaligned", [(torch.float32, 64, False), (torch.float32, 64, True),
                                               (torch.bfloat16, 8, False), (torch.bfloat16, 13, False),
                                               (torch.float16, 24, True), (torch.float64, 6, False)])
def test_unpermute_column_paths(dtype, H, unaligned):
    T, k, E = 9, 3, 5
    s = seed_for("unpermute", str(dtype), H, unaligned)
    ids = make_ids(T, k, E, seed=s, invalid=0.2)
    _, ss, _, rows = R.permute(make_x(T, H, seed=s, dtype=dtype), ids, E, 2)
    y = make_x(ss.shape[0], H, seed=s + 1, dtype=dtype)
    y[ss < 0] = float("nan")
    if unaligned:
        y = _unaligned(y)
    w = make_logits(T, k, seed=s + 2).abs()
    for weights in (w, None):
        out = moe_ops.unpermute(y, rows, weights, k=k, backend=SIM)
        assert_close_to_reference(out, R.unpermute(y, rows, weights, k),
                                  reference_hi("unpermute", y, rows, weights, k), name="unpermute")


def test_capacity_combine_wide_k():
    """k > 32: the per-warp row table lives in dynamic shared memory, not one lane per slot."""
    T, k, E, C, H = 6, 40, 50, 6, 8
    s = seed_for("widek")
    ids = make_ids(T, k, E, seed=s, invalid=0.1)
    _, pos, _, _ = R.capacity_dispatch(make_x(T, H, seed=s), ids, E, C, "kmajor")
    buf = make_x(E * C, H, seed=s + 1, dtype=torch.bfloat16).reshape(E, C, H)
    w = make_logits(T, k, seed=s + 2)
    out = _ops().capacity_combine(buf, ids, pos, w)
    assert_close_to_reference(out, R.capacity_combine(buf, ids, pos, w),
                              reference_hi("capacity_combine", buf, ids, pos, w), name="capacity_combine")


# ------------------------------------------------------------------------ the binding's checks

def test_binding_rejects_bad_arguments():
    ops = _ops()
    lg = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="scoring"):
        ops.topk_gating(lg, 2, "relu", False, 0, 0, None, 1.0)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.topk_gating(lg, 9, "softmax", False, 0, 0, None, 1.0)
    with pytest.raises(RuntimeError, match="E <= 16384"):
        ops.topk_gating(torch.randn(1, 16385), 2, "softmax", False, 0, 0, None, 1.0)
    with pytest.raises(RuntimeError, match="divisible"):
        ops.topk_gating(lg, 2, "softmax", False, 3, 1, None, 1.0)
    with pytest.raises(RuntimeError, match="correction_bias"):
        ops.topk_gating(lg, 2, "sigmoid", False, 0, 0, torch.randn(7), 1.0)
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.topk_gating(torch.zeros(2, 8, dtype=torch.int32), 2, "softmax", False, 0, 0, None, 1.0)
    x, ids = torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="int32"):
        ops.permute(x, ids.long(), 4, 1)
    with pytest.raises(RuntimeError, match="rows"):
        ops.permute(x, ids[:2], 4, 1)
    with pytest.raises(RuntimeError, match="priority"):
        ops.capacity_dispatch(x, ids, 4, 2, "random")
    with pytest.raises(RuntimeError, match="weights must be"):
        ops.unpermute(torch.randn(6, 4), torch.zeros(6, dtype=torch.int32), torch.ones(3, 3), 2)
    with pytest.raises(RuntimeError, match="slot_pos shape"):
        ops.capacity_combine(torch.randn(4, 2, 4), ids, ids[:, :1].contiguous(), None)


def test_binding_limits_are_the_shared_ones():
    """The binding's k / E invariants use csrc/arg_limits.h (exported by build_info), not local literals."""
    limits = pytest.importorskip("moe_ops._C").build_info()["limits"]
    ops, max_k = _ops(), limits["max_k"]
    lg = torch.randn(2, max_k + 8)
    w, ids = ops.topk_gating(lg, max_k, "softmax", False, 0, 0, None, 1.0)  # the limit itself is valid
    assert ids.shape == (2, max_k)
    with pytest.raises(RuntimeError, match=rf"k must be in \[1, min\(E, {max_k}\)\]"):
        ops.topk_gating(lg, max_k + 1, "softmax", False, 0, 0, None, 1.0)
    with pytest.raises(RuntimeError, match=rf"k must be in \[1, {max_k}\]"):
        ops.unpermute(torch.randn(4, 2), torch.zeros(max_k + 1, dtype=torch.int32), None, max_k + 1)
    with pytest.raises(RuntimeError, match=rf"num_experts must be in \[1, {limits['max_experts']}\]"):
        ops.permute(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32), 0, 1)
