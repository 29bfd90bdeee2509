"""Helpers every moe_ops kernel test uses. Keep this API small; everything here is documented.

Inputs (fresh, seeded, on any device; built on the CPU generator so every device sees the same
values for a seed):
    seed_for(*parts)                      stable 31-bit seed from a test's parameters
    make_logits(T, E, seed=, ...)         router logits, optional exact ties / NaN rows
    make_ids(T, k, E, seed=, ...)         expert ids (distinct per row like top-k, skewed, empty
                                          experts, all-to-one, invalid ids)
    make_x(T, H, seed=, ...)              activations
    make_offsets(M, E, seed=, ...)        monotone int32 expert_offsets with empty experts and
                                          unused head/tail rows

Poisoning:
    poison(t)  fills a tensor in place with NaN (float) or -7 (int) and returns it. Use it on
    *input regions a kernel must not read* (e.g. ``a`` rows outside ``[offs[0], offs[E])``,
    ``y_sorted`` padding rows): the result must not change. The ops are functional -- they allocate
    their outputs -- so an unwritten output element can't be poisoned beforehand; instead every
    test compares *every* output element: integer outputs exactly (padding ``sorted_slots == -1``,
    ``slot_rows == -1`` for dropped slots), data movement outputs (``x_sorted``, ``buf``) bitwise
    including their zero padding, float results with :func:`assert_close_to_reference`, which
    also requires NaN exactly where the float64 reference has NaN. Uninitialised memory (an
    ``torch.empty`` the kernel forgot to fill) then fails as garbage or NaN.

Comparison:
    assert_close_to_reference(out, ref_lowp, ref_hi)   error judged against the reference's own
                                          error in that dtype (flash-attention style)
    assert_exact(out, ref)                bitwise equality (dtype, shape, values; NaN == NaN)
    assert_gating_equal(weights, ids, logits, k, ...)  ids exact except rows whose reference
                                          decision is a near-tie; weights vs the reference
                                          weights of the ids the kernel picked
    reference_hi(op, *args)               the reference run on float64 copies of float args

Backends:
    DEVICES                               ["cpu"] + ["cuda"] when available
    backends_for(op, device)              available backends for op/device, minus "reference"
    unsupported_reason(backend, op, dtype, device)  why a backend skips a dtype for an op, or
                                          None. A backend declares this in the module that
                                          registers it (or ``moe_ops.<name>_kernels``) with a
                                          module-level ``UNSUPPORTED_DTYPES = {(op, dtype):
                                          "reason"}`` or a ``supported(op, dtype, device_type)``
                                          function; tests also read ``UNSUPPORTED`` below, keyed
                                          ``(backend, op, dtype)``.
"""
from __future__ import annotations

import sys
import zlib
from typing import Dict, Optional, Tuple

import torch

import moe_ops
from moe_ops import backend as _backend
from moe_ops import reference as R

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOWP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Test-side declarations (backend, op, dtype) -> reason; backends should prefer their own
# module-level UNSUPPORTED_DTYPES (see module docstring).
UNSUPPORTED: Dict[Tuple[str, str, torch.dtype], str] = {}

# Absolute error floor per dtype, added to 2 * (the reference's own error) + one ulp of the
# largest reference value.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# ------------------------------------------------------------------------- CPU kernel sets

def _cpu_isa() -> dict:
    """moe_ops.build_info()["cpu"] (which CPU kernel sets are built and run), {} without _C."""
    return moe_ops.build_info().get("cpu", {}) if hasattr(torch.ops.moe_ops, "fused_experts") else {}


def avx512_emulation_built() -> bool:
    """Whether the CPU kernels' AVX512-BF16 code is also built emulated (SIMDe), so that
    rerun_with_emulated_avx512 can run it on any CPU."""
    return bool(_cpu_isa().get("avx512_emulated"))


def vnni_kernel_runs() -> bool:
    """Whether the CPU backend's bf16 'vnni' packed layout runs here: natively (AVX512-BF16) or
    emulated (a build with SIMDe)."""
    return bool(_cpu_isa().get("avx512_bf16")) or avx512_emulation_built()


def rerun_with_emulated_avx512(test_file: str, k_expr: str) -> None:
    """Run ``pytest test_file -k k_expr`` in a subprocess with MOE_OPS_CPU_EMULATE_AVX512=1: the
    CPU ops that also have AVX2 code (bf16 combine, fused_experts on bf16 weights as stored) then
    run their AVX512-BF16 kernels through the SIMDe emulation (natively where the CPU has them).
    Asserts that the kernels were on and that the selected tests passed."""
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MOE_OPS_CPU_EMULATE_AVX512="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    on = subprocess.run([sys.executable, "-c", "import moe_ops; print(moe_ops.build_info()['cpu']['avx512_kernels'])"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert on.stdout.strip() == "True", on.stdout + on.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", k_expr],
                         env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


# ------------------------------------------------------------------------------------ inputs

def seed_for(*parts) -> int:
    """A stable seed from a test's parameters (so each parametrization gets fresh values)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_x(T: int, H: int, *, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """``x[T, H]`` ~ N(0, scale^2), rounded to ``dtype``."""
    return (torch.randn(T, H, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def make_logits(T: int, E: int, *, seed: int, dtype=torch.float32, device="cpu", ties: bool = False,
                nan_rows: int = 0, scale: float = 2.0) -> torch.Tensor:
    """Router logits ``[T, E]``. ``ties``: values on a coarse grid so many exact ties occur.
    ``nan_rows``: that many rows get NaN in a few random columns (row 0 first)."""
    g = _gen(seed)
    if ties:
        lg = torch.randint(-3, 4, (T, E), generator=g).double() * 0.5
    else:
        lg = torch.randn(T, E, generator=g, dtype=torch.float64) * scale
    for t in range(min(nan_rows, T)):
        cols = torch.randperm(E, generator=g)[: max(1, E // 4)]
        lg[t, cols] = float("nan")
    return lg.to(dtype).to(device)


def make_ids(T: int, k: int, E: int, *, seed: int, device="cpu", mode: str = "uniform",
             empty: int = 0, invalid: float = 0.0) -> torch.Tensor:
    """Expert ids ``[T, k]`` int32.

    ``mode``: ``"uniform"`` / ``"skew"`` (Zipf-like load) -- ids distinct within a row, like
    top-k; ``"one"`` -- every row's first choice is expert 0; ``"dup"`` -- independent draws,
    repeats allowed within a row. ``empty``: that many experts (a random set) never chosen
    (needs ``k <= E - empty``). ``invalid``: fraction of slots replaced by out-of-range ids
    (-1, E, or large), which every op must drop.
    """
    g = _gen(seed)
    logp = torch.zeros(E, dtype=torch.float64)
    if mode == "skew":
        logp = -1.5 * torch.log(torch.arange(1, E + 1, dtype=torch.float64))[torch.randperm(E, generator=g)]
    if empty:
        assert k <= E - empty, "make_ids: not enough non-empty experts for k"
        logp[torch.randperm(E, generator=g)[:empty]] = float("-inf")
    if mode == "dup":
        probs = torch.softmax(logp, 0).expand(T, E) if T else torch.zeros(0, E, dtype=torch.float64)
        ids = torch.multinomial(probs, k, replacement=True, generator=g) if T else torch.zeros(0, k, dtype=torch.long)
    else:
        gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=g, dtype=torch.float64).clamp_min(1e-300)))
        ids = torch.argsort(logp + gumbel, dim=1, descending=True)[:, :k]
        if mode == "one" and T:
            zero_at = (ids == 0)
            # put expert 0 first; keep the row distinct by moving the old first choice where 0 was
            first = ids[:, :1].clone()
            ids = torch.where(zero_at, first.expand_as(ids), ids)
            ids[:, 0] = 0
    if invalid > 0 and ids.numel():
        bad = torch.rand(ids.shape, generator=g) < invalid
        choices = torch.tensor([-1, E, E + 5, -(2**31), 2**31 - 1])
        repl = choices[torch.randint(0, len(choices), ids.shape, generator=g)]
        ids = torch.where(bad, repl, ids)
    return ids.to(torch.int32).to(device)


def make_offsets(M: int, E: int, *, seed: int, device="cpu", head: int = 0, tail: int = 0,
                 empty: int = 0) -> torch.Tensor:
    """Monotone ``expert_offsets[E+1]`` int32 starting at ``head`` and ending at ``M - tail``;
    ``empty`` experts (random) get no rows, the rest a random split of the used rows."""
    g = _gen(seed)
    used = M - head - tail
    assert used >= 0
    w = torch.rand(E, generator=g, dtype=torch.float64)
    if empty:
        w[torch.randperm(E, generator=g)[:empty]] = 0
    if used and float(w.sum()) == 0:
        w[0] = 1
    cuts = torch.sort(torch.rand(used, generator=g)).values  # a random composition of `used`
    bucket = torch.searchsorted(torch.cumsum(w, 0) / w.sum().clamp_min(1e-300), cuts.double(), right=True)
    counts = torch.zeros(E, dtype=torch.long).scatter_add(0, bucket.clamp(max=E - 1), torch.ones_like(bucket))
    offs = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]) + head
    return offs.to(torch.int32).to(device)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating) or -7 (integer); returns ``t``."""
    with torch.no_grad():
        t.fill_(float("nan") if t.is_floating_point() else -7)
    return t


# -------------------------------------------------------------------------------- comparison

def _to64(v):
    return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def reference_hi(op: str, *args):
    """Run ``moe_ops.reference.<op>`` on float64 copies of the float tensor arguments."""
    return getattr(R, op)(*[_to64(a) for a in args])


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


# ---------------------------------------------------------------------------------- backends

def backends_for(op: str, device: str) -> list:
    """Backends (other than the oracle) that implement ``op`` for ``device`` tensors here."""
    return [b for b in moe_ops.available_backends(op, device) if b != "reference"]


def unsupported_reason(backend: str, op: str, dtype: torch.dtype, device: str = "cpu") -> Optional[str]:
    """Why ``backend`` does not support ``dtype`` for ``op`` on ``device`` (None if it does).

    Looked up, in order: ``UNSUPPORTED[(backend, op, dtype)]`` (test side); then in the module
    that registers the backend (``moe_ops.backend._LOADERS[backend]``) and in
    ``moe_ops.<backend>_kernels`` (e.g. ``moe_ops.triton_kernels``), whichever are imported:
    a dict/set ``UNSUPPORTED_DTYPES`` of ``(op, dtype)`` (dict values are the reason), or a
    function ``supported(op, dtype, device_type) -> bool``."""
    if (backend, op, dtype) in UNSUPPORTED:
        return UNSUPPORTED[(backend, op, dtype)]
    if _backend._load(backend) is None:
        return None
    for name in (_backend._LOADERS.get(backend), f"moe_ops.{backend}_kernels"):
        module = sys.modules.get(name) if name else None
        if module is None:
            continue
        declared = getattr(module, "UNSUPPORTED_DTYPES", None)
        if declared and (op, dtype) in declared:
            return declared[(op, dtype)] if isinstance(declared, dict) else f"declared by {name}"
        supported = getattr(module, "supported", None)
        if callable(supported) and not supported(op, dtype, device):
            return f"{name}.supported() says no"
    return None
