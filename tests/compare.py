"""Comparison with the oracle (``moe_ops.reference``):

    assert_close_to_reference(out, ref_lowp, ref_hi)   error judged against the reference's own
                                          error in that dtype (flash-attention style); ``ATOL``
                                          is the per-dtype floor
    assert_exact(out, ref)                bitwise equality (dtype, shape, values; NaN == NaN)
    assert_bitwise_equal(a, b)            determinism: two runs give the same bits
    assert_thread_count_independent(run)  the same bits with 1 and 2 torch threads
    assert_gating_equal(weights, ids, logits, k, ...)  ids exact except rows whose reference
                                          decision is a near-tie; weights vs the reference
                                          weights of the ids the kernel picked
    reference_hi(op, *args)               the reference run on float64 copies of float args
    reference_layer(x, logits, w1, w2, k) moe_forward on the reference backend, in the dtype and
                                          in float64
"""
from __future__ import annotations

from typing import Optional

import torch

from moe_ops import reference as R


# Absolute error floor per dtype, added to 2 * (the reference's own error) + one ulp of the
# largest reference value.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _to64(v):
    return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def reference_hi(op: str, *args):
    """Run ``moe_ops.reference.<op>`` on float64 copies of the float tensor arguments."""
    return getattr(R, op)(*[_to64(a) for a in args])


def reference_layer(x, logits, w1, w2, k, **kw):
    """``moe_forward`` on the reference backend in the inputs' dtype and in float64 (the pair
    :func:`assert_close_to_reference` takes)."""
    import moe_ops
    lowp = moe_ops.moe_forward(x, logits, w1, w2, k, backend="reference", **kw)
    hi = moe_ops.moe_forward(x.double(), logits, w1.double(), w2.double(), k, backend="reference", **kw)
    return lowp, hi


def assert_exact(out: torch.Tensor, ref: torch.Tensor, name: str = "output") -> None:
    """Same dtype, shape and bits (NaN matches NaN of the same payload class)."""
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().cpu(), ref.detach().cpu()
    if o.is_floating_point():
        same = (o == r) | (torch.isnan(o) & torch.isnan(r))
    else:
        same = o == r
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~same).sum())} of {o.numel()} elements differ; first at "
                             f"{bad}: got {[o[tuple(i)].item() for i in bad]}, want "
                             f"{[r[tuple(i)].item() for i in bad]}")


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, name: str = "output") -> None:
    """Determinism: two runs give the same bits."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: runs differ in dtype/shape"
    if a.numel() == 0:
        return
    ai = a.detach().cpu().contiguous().view(torch.uint8)
    bi = b.detach().cpu().contiguous().view(torch.uint8)
    assert torch.equal(ai, bi), f"{name}: two runs on the same input are not bitwise equal"


def _named_tensors(out, name: str):
    """(name, tensor) pairs of a tensor, or a (nested) dict / list / tuple of them."""
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    items = out.items() if isinstance(out, dict) else enumerate(out)
    return [pair for key, v in items for pair in _named_tensors(v, f"{name}[{key}]")]


def assert_thread_count_independent(run, name: str = "output") -> None:
    """``run()`` (returning tensors, or dicts / lists / tuples of them) gives bitwise the same
    outputs with 1 and 2 torch threads, and again on a second 2-thread run."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _named_tensors(run(), name)
        torch.set_num_threads(2)
        two = _named_tensors(run(), name)
        again = _named_tensors(run(), name)
    finally:
        torch.set_num_threads(before)
    assert len(one) == len(two) == len(again)
    for (n, a), (_, b), (_, c) in zip(one, two, again):
        assert_bitwise_equal(a, b, name=f"{n} 1 vs 2 threads")
        assert_bitwise_equal(b, c, name=f"{n} run to run")


def assert_close_to_reference(out: torch.Tensor, ref_lowp: torch.Tensor, ref_hi: torch.Tensor, *,
                              name: str = "output", atol: Optional[float] = None) -> None:
    """``max|out - ref_hi| <= 2 * max|ref_lowp - ref_hi| + atol + ulp(max|ref_hi|)``.

    ``ref_lowp`` is the reference run in the kernel's dtype, ``ref_hi`` in float64: a kernel may
    be twice as wrong as the oracle itself is in that dtype, plus a small floor. Non-finite
    values must match exactly (NaN where ref_hi has NaN, same-signed Inf). ``out`` must have
    ``ref_lowp``'s dtype and shape."""
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != reference {ref_lowp.dtype}"
    assert tuple(out.shape) == tuple(ref_lowp.shape) == tuple(ref_hi.shape), \
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_lowp.shape)}"
    o = out.detach().cpu().double()
    lo = ref_lowp.detach().cpu().double()
    hi = ref_hi.detach().cpu().double()
    fin = torch.isfinite(hi)
    nonfinite_ok = (torch.isnan(o) == torch.isnan(hi)) & (fin | (o == hi) | torch.isnan(hi))
    if not bool(nonfinite_ok.all()):
        i = (~nonfinite_ok).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite mismatch at {i}: got {o[tuple(i)].item()}, "
                             f"reference {hi[tuple(i)].item()} ({int((~nonfinite_ok).sum())} elements)")
    if o.numel() == 0 or not bool(fin.any()):
        return
    o_f, lo_f, hi_f = o[fin], lo[fin], hi[fin]
    if not bool(torch.isfinite(o_f).all()):
        raise AssertionError(f"{name}: non-finite output where the reference is finite")
    err = (o_f - hi_f).abs()
    err_ref = float((lo_f - hi_f).abs().max())
    dtype = out.dtype
    floor = (ATOL[dtype] if atol is None else atol) + torch.finfo(dtype).eps * float(hi_f.abs().max())
    bound = 2 * err_ref + floor
    worst = float(err.max())
    if not worst <= bound:
        i = int(err.argmax())
        raise AssertionError(f"{name} ({dtype}): max error {worst:.3g} vs float64 reference exceeds "
                             f"{bound:.3g} (= 2 * reference's own error {err_ref:.3g} + floor {floor:.3g}); "
                             f"worst element got {o_f[i].item()!r}, want {hi_f[i].item()!r}; "
                             f"{int((err > bound).sum())} of {err.numel()} elements out")


def _fragile_rows(keys: torch.Tensor, k: int, tol: float) -> torch.Tensor:
    """Rows whose top-k decision (membership or order) hinges on a near-tie: two keys among the
    first k+1 ranked ones that differ by a nonzero amount <= tol (relative to max(1, |key|)).
    Exact ties are *not* fragile: the lower index must win."""
    if keys.shape[1] < 2:
        return torch.zeros(keys.shape[0], dtype=torch.bool)
    ranked = keys.gather(1, R.rank_order(keys)[:, : min(k + 1, keys.shape[1])])
    a, b = ranked[:, :-1], ranked[:, 1:]
    gap = (a - b).abs()
    scale = torch.maximum(a.abs(), b.abs()).nan_to_num(1.0, 1.0, 1.0).clamp_min(1.0)
    near = (gap > 0) & (gap <= tol * scale)
    return near.any(dim=1)


def assert_gating_equal(weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor, k: int,
                        scoring: str = "softmax", renormalize: bool = False, n_group: int = 0,
                        topk_group: int = 0, correction_bias: Optional[torch.Tensor] = None,
                        scaling_factor: float = 1.0, *, key_tol: float = 1e-5) -> None:
    """Check a kernel's ``topk_gating`` output against the reference.

    * ``ids``: int32 ``[T, k]``, in range, distinct per row; equal to the reference's ids except
      in rows where the reference's decision is a near-tie (two of the first k+1 ranked selection
      keys -- or, group-limited, two of the first topk_group+1 group scores -- differ by a
      nonzero amount <= ``key_tol`` relative). Exact ties must follow the rule (lower index).
    * ``weights``: float32 ``[T, k]``, close to the reference weights *of the ids the kernel
      picked* (so a legitimate near-tie swap is judged on its own weights).
    """
    T, E = logits.shape
    args = (logits, k, scoring, renormalize, n_group, topk_group, correction_bias, scaling_factor)
    ref_w, ref_ids = R.topk_gating(*args)
    assert ids.dtype == torch.int32, f"ids dtype {ids.dtype} != int32"
    assert tuple(ids.shape) == (T, k) and tuple(weights.shape) == (T, k), \
        f"shapes ids {tuple(ids.shape)} weights {tuple(weights.shape)} != {(T, k)}"
    assert weights.dtype == ref_w.dtype, f"weights dtype {weights.dtype} != {ref_w.dtype}"
    got = ids.detach().cpu().long()
    if T == 0:
        return
    assert bool(((got >= 0) & (got < E)).all()), "ids out of range"
    srt = got.sort(dim=1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all()), "ids not distinct within a row"
    lg = logits.detach().cpu()
    bias = None if correction_bias is None else correction_bias.detach().cpu()
    keys = R.selection_keys(lg, scoring, n_group, topk_group, bias)
    fragile = _fragile_rows(keys, k, key_tol)
    if n_group > 0:
        pre = R.selection_keys(lg, scoring, 0, 0, bias)  # group scores come from unmasked keys
        G = E // n_group
        grouped = pre.reshape(T, n_group, G)
        top = grouped.gather(-1, R.rank_order(grouped)[..., : min(2, G)]).sum(-1)
        fragile |= _fragile_rows(top, topk_group, key_tol)
        # a near-tie inside a group's top-2/3 boundary moves the group score only by ~tol: covered
    ok = (got == ref_ids.cpu().long()).all(dim=1) | fragile
    if not bool(ok.all()):
        t = int((~ok).nonzero()[0])
        raise AssertionError(f"topk_gating ids differ from the reference in {int((~ok).sum())} rows "
                             f"(not near-ties); row {t}: got {got[t].tolist()}, want {ref_ids[t].tolist()}, "
                             f"keys got {keys[t, got[t]].tolist()} want {keys[t, ref_ids[t].long()].tolist()}")
    lo = R.gating_weights(R.gating_scores(lg, scoring), got, renormalize, scaling_factor)
    hi = R.gating_weights(R.gating_scores(lg.double(), scoring), got, renormalize, scaling_factor)
    assert_close_to_reference(weights.detach().cpu(), lo, hi, name="topk_gating weights")
