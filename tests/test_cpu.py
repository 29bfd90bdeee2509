"""CPU-backend specific tests (the generic per-op comparison lives in tests/test_<op family>.py over tests/op_matrix.py).

* ``moe_ops::fused_experts`` (the fused CPU expert path: gather -> GEMM1 + gated activation ->
  GEMM2 -> weighted combine) against the reference pipeline, in float64 and in the dtype;
* thread-count independence: every CPU op gives bitwise the same result with 1 and 2 threads
  (the tile scheduler changes the split, never an element's arithmetic);
* the portable (non-AVX2) kernels, run in a subprocess with ``MOE_OPS_CPU_NO_AVX2=1``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import moe_ops
from moe_ops import reference as R
from tests.compare import assert_close_to_reference, assert_thread_count_independent
from tests.cpu_isa import avx512_emulation_built, rerun_with_emulated_avx512, vnni_kernel_runs
from tests.inputs import make_ids, make_logits, make_offsets, make_x, seed_for
from tests.poison import poison

pytestmark = pytest.mark.skipif("cpu" not in moe_ops.available_backends(device="cpu"),
                                reason="moe_ops._C CPU kernels not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _has_fused() -> bool:
    return hasattr(torch.ops.moe_ops, "fused_experts")


def _ref_experts(x, ids, weights, w_gate_up, w_down, activation):
    """The unfused reference pipeline: permute -> grouped_gemm -> act -> grouped_gemm -> unpermute."""
    E = w_gate_up.shape[0]
    k = ids.shape[1]
    x_sorted, _, offs, slot_rows = R.permute(x, ids, E, 1)
    h = R.grouped_gemm(x_sorted, w_gate_up, offs, True)
    gate, up = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) if activation == "swiglu" else torch.nn.functional.gelu(gate)
    y = R.grouped_gemm((act * up).to(h.dtype), w_down, offs, True)
    return R.unpermute(y, slot_rows, weights, k)


def _layer_inputs(T, E, k, H, I, dtype, seed, mode="uniform"):
    x = make_x(T, H, seed=seed, dtype=dtype)
    empty = 2 if mode == "empty_experts" else 0
    ids = make_ids(T, k, E, seed=seed + 1, mode="uniform" if empty else mode, empty=empty)
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(seed + 2))
    wgu = make_x(E * 2 * I, H, seed=seed + 3, dtype=dtype, scale=H ** -0.5).reshape(E, 2 * I, H)
    wd = make_x(E * H, I, seed=seed + 4, dtype=dtype, scale=I ** -0.5).reshape(E, H, I)
    return x, ids, w, wgu, wd


FUSED_CASES = [
    # T, E, k, H, I, ids mode
    (1, 8, 2, 64, 96, "uniform"),
    (7, 4, 1, 40, 24, "uniform"),        # H, I not multiples of the 16-wide packing
    (33, 16, 4, 72, 50, "skew"),
    (64, 8, 2, 128, 256, "uniform"),
    (20, 8, 3, 48, 32, "empty_experts"),
    (0, 8, 2, 32, 32, "uniform"),
    (13, 2, 1, 33, 17, "uniform"),      # 6-row blocks with every remainder, 16-column panel tails
    (29, 3, 2, 16, 16, "skew"),
]
# Both fused expert ops: weights as stored, and packed once by moe_ops::pack_experts, in its
# panel16 layout (any dtype) and its bf16 vnni layout (the AVX512-BF16 kernel; emulated through
# SIMDe on CPUs without it, so it runs here too).
FUSED_OPS = ["fused_experts", "fused_experts_packed", "fused_experts_packed_vnni"]
VNNI_BUILT = vnni_kernel_runs()
# (op, dtype) pairs: vnni is a bf16 layout
FUSED_OP_DTYPES = [(op, d) for op in FUSED_OPS for d in DTYPES
                   if op != "fused_experts_packed_vnni" or (d == torch.bfloat16 and VNNI_BUILT)]


def _op_dtype_id(p):
    return p if isinstance(p, str) else str(p).replace("torch.", "")


def _fused_op(op):
    if op == "fused_experts":
        return torch.ops.moe_ops.fused_experts
    layout = "vnni" if op.endswith("_vnni") else "panel16"

    def run(x, ids, w, wgu, wd, activation):
        pgu, pd = torch.ops.moe_ops.pack_experts(wgu, wd, layout)
        return torch.ops.moe_ops.fused_experts_packed(x, ids, w, pgu, pd, activation)
    return run


@pytest.mark.skipif(not _has_fused(), reason="fused_experts not built")
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "T{}-E{}-k{}-H{}-I{}-{}".format(*c))
@pytest.mark.parametrize("op,dtype", FUSED_OP_DTYPES, ids=_op_dtype_id)
def test_fused_experts_matches_reference(op, case, activation, dtype):
    T, E, k, H, I, mode = case
    seed = seed_for(op, case, activation, str(dtype))
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, dtype, seed, mode)
    out = _fused_op(op)(x, ids, w, wgu, wd, activation)
    lowp = _ref_experts(x, ids, w, wgu, wd, activation)
    hi = _ref_experts(x.double(), ids, w.double(), wgu.double(), wd.double(), activation)
    assert out.shape == (T, H) and out.dtype == dtype
    assert_close_to_reference(out, lowp, hi, name=op)


@pytest.mark.skipif(not _has_fused(), reason="fused_experts not built")
@pytest.mark.parametrize("op,dtype", FUSED_OP_DTYPES, ids=_op_dtype_id)
def test_fused_experts_drops_invalid_ids_and_handles_no_weights(op, dtype):
    T, E, k, H, I = 16, 6, 2, 40, 24
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, dtype, seed_for("drop", str(dtype)))
    ids[0, 1] = -1
    ids[5, 0] = E + 3
    w[0, 1] = float("nan")  # a dropped slot's weight never reaches the output
    for weights in (w, None):
        out = _fused_op(op)(x, ids, weights, wgu, wd, "swiglu")
        lowp = _ref_experts(x, ids, weights, wgu, wd, "swiglu")
        hi = _ref_experts(x.double(), ids, None if weights is None else weights.double(), wgu.double(),
                          wd.double(), "swiglu")
        assert_close_to_reference(out, lowp, hi, name=op)


@pytest.mark.skipif(not _has_fused() or not hasattr(torch.ops, "moe_cpu_cache"), reason="fused ops / host cache not built")
@pytest.mark.parametrize("op,dtype", FUSED_OP_DTYPES, ids=_op_dtype_id)
def test_fused_experts_write_every_output_and_scratch_element(op, dtype):
    """The fused ops take their output and scratch (gathered rows, activation, expert outputs)
    from the host cache: NaN-fill every cached block between two calls, so an element the op
    fails to write stays NaN and the comparison with the reference fails."""
    c = torch.ops.moe_cpu_cache
    old_cap, old_min = c.configure(64 << 20, 0)  # every allocation through the cache
    try:
        c.clear()
        x, ids, w, wgu, wd = _layer_inputs(45, 6, 2, 56, 40, dtype, seed_for("poison", op, str(dtype)), "skew")
        _fused_op(op)(x, ids, w, wgu, wd, "swiglu")   # fills the cache with this call's blocks
        hits = c.stats()[3]
        c.poison_free()
        out = _fused_op(op)(x, ids, w, wgu, wd, "swiglu")
        assert c.stats()[3] > hits, "the second call did not reuse the poisoned blocks"
        lowp = _ref_experts(x, ids, w, wgu, wd, "swiglu")
        hi = _ref_experts(x.double(), ids, w.double(), wgu.double(), wd.double(), "swiglu")
        assert_close_to_reference(out, lowp, hi, name=op)
    finally:
        c.configure(old_cap, old_min)
        c.clear()


@pytest.mark.skipif(not _has_fused(), reason="fused_experts not built")
def test_fused_experts_meta_shape():
    x = torch.empty(5, 32, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(5, 2, device="meta", dtype=torch.int32)
    wgu = torch.empty(4, 48, 32, device="meta", dtype=torch.bfloat16)
    wd = torch.empty(4, 32, 24, device="meta", dtype=torch.bfloat16)
    out = torch.ops.moe_ops.fused_experts(x, ids, None, wgu, wd, "swiglu")
    assert out.shape == (5, 32) and out.dtype == torch.bfloat16 and out.device.type == "meta"


@pytest.mark.skipif(not _has_fused(), reason="fused_experts not built")
def test_fused_experts_rejects_bad_input():
    x, ids, w, wgu, wd = _layer_inputs(4, 4, 2, 32, 16, torch.float32, 1)
    with pytest.raises(RuntimeError, match="w_down"):
        torch.ops.moe_ops.fused_experts(x, ids, w, wgu, wd[:, :, :8], "swiglu")
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.moe_ops.fused_experts(x, ids, w, wgu, wd, "relu")
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.moe_ops.fused_experts(x, ids.long(), w, wgu, wd, "swiglu")
    # T*k past int32 row indexing (stride-0 views: nothing is allocated), both fused ops
    big_x, big_ids = x[:1].expand(2 ** 30 + 1, -1), ids[:1].expand(2 ** 30 + 1, -1)
    pgu, pd = torch.ops.moe_ops.pack_experts(wgu, wd)
    with pytest.raises(RuntimeError, match="overflows int32"):
        torch.ops.moe_ops.fused_experts(big_x, big_ids, None, wgu, wd, "swiglu")
    with pytest.raises(RuntimeError, match="overflows int32"):
        torch.ops.moe_ops.fused_experts_packed(big_x, big_ids, None, pgu, pd, "swiglu")


# ------------------------------------------------------------------- thread independence

def _run_all_ops(dtype):
    """Every CPU op on inputs big enough to be split into many tiles/chunks."""
    ops = torch.ops.moe_ops
    T, E, k, H, I = 96, 8, 2, 80, 72
    seed = seed_for("threads", str(dtype))
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, dtype, seed, "skew")
    outs = {}
    logits = make_logits(T, 64, seed=seed)
    outs["gating"] = ops.topk_gating(logits, 6, "sigmoid", True, 8, 3, make_x(1, 64, seed=seed + 9).reshape(64), 2.5)
    p = ops.permute(x, ids, E, 4)
    outs["permute"] = p
    outs["unpermute"] = ops.unpermute(p[0], p[3], w, k)
    d = ops.capacity_dispatch(x, ids, E, 20, "kmajor")
    outs["dispatch"] = d
    outs["combine"] = ops.capacity_combine(d[0], ids, d[1], w)
    M = 300
    offs = make_offsets(M, E, seed=seed, head=3, tail=5)
    a = make_x(M, H, seed=seed + 7, dtype=dtype)
    outs["gemm_nt"] = ops.grouped_gemm(a, wgu, offs, True)
    outs["gemm_nn"] = ops.grouped_gemm(a, wgu.transpose(1, 2).contiguous(), offs, False)
    dc = make_x(M, 2 * I, seed=seed + 8, dtype=dtype)
    outs["wgrad"] = ops.grouped_gemm_wgrad(a, dc, offs, E)
    if _has_fused():
        outs["fused"] = ops.fused_experts(x, ids, w, wgu, wd, "swiglu")
        outs["fused_packed"] = _fused_op("fused_experts_packed")(x, ids, w, wgu, wd, "swiglu")
        if dtype == torch.bfloat16 and VNNI_BUILT:
            outs["fused_packed_vnni"] = _fused_op("fused_experts_packed_vnni")(x, ids, w, wgu, wd, "swiglu")
    return outs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_independent_of_thread_count(dtype):
    assert_thread_count_independent(lambda: _run_all_ops(dtype), "cpu ops")


def test_gemm_ignores_rows_outside_offsets():
    """Rows of a outside [offs[0], offs[E]) are never read (NaN there must not leak)."""
    E, M, K, N = 4, 40, 24, 20
    offs = make_offsets(M, E, seed=3, head=4, tail=6)
    a = make_x(M, K, seed=4, dtype=torch.bfloat16)
    lo, hi = int(offs[0]), int(offs[-1])
    poison(a[:lo])
    poison(a[hi:])
    b = make_x(E * N, K, seed=5, dtype=torch.bfloat16).reshape(E, N, K)
    c = torch.ops.moe_ops.grouped_gemm(a, b, offs, True)
    assert not c.isnan().any()
    assert (c[:lo] == 0).all() and (c[hi:] == 0).all()


# ------------------------------------------------- router scores at the ends of the float range

def _cpu_scores(logits, scoring):
    """Every expert's score as the CPU op computes it (k = E: the weights are all the scores)."""
    E = logits.shape[1]
    w, ids = torch.ops.moe_ops.topk_gating(logits, E, scoring, False, 0, 0, None, 1.0)
    return torch.zeros_like(w).scatter(1, ids.long(), w)


def _assert_scores_like_torch(got, want, what):
    """Equal to torch's float32 scores up to a few ulps (one ulp of a denormal too), and exactly 0
    where torch's are 0: a masked expert's score must not be a tiny positive number."""
    assert torch.equal(got == 0, want == 0), \
        f"{what}: zero pattern differs, e.g. got {got[(got == 0) != (want == 0)][:4].tolist()} " \
        f"want {want[(got == 0) != (want == 0)][:4].tolist()}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN pattern differs"
    err = (got - want).abs().nan_to_num(0.0)
    bound = 4e-7 * want.abs().nan_to_num(0.0) + 2 * 1.5e-45
    assert bool((err <= bound).all()), f"{what}: max error {float((err - bound).max()):.3g} above the bound"


def test_router_scores_match_torch_over_the_float_range():
    """sigmoid / softmax where exp overflows, gives a denormal, underflows to 0, and at +-inf, on
    the vectorised (AVX2) path: 12 experts per row, one full 8-lane vector and a partial one."""
    inf = float("inf")
    grid = torch.arange(-120.0, 120.0 + 0.125, 0.25)  # steps of 1/4 stay clear of exp's cut-offs
    vals = torch.cat([grid, torch.tensor([inf, -inf, -88.5, -88.7, -87.4, 88.7, 103.9, -103.9])])
    vals = torch.cat([vals, vals.new_zeros(-vals.numel() % 12)]).reshape(-1, 12)
    _assert_scores_like_torch(_cpu_scores(vals, "sigmoid"), torch.sigmoid(vals), "sigmoid")
    # softmax rows [0, d1..d11], d <= 0: the scores of the d's are exp(d) / (1 + ...), down to denormals
    d = torch.cat([-grid[grid >= 0], torch.tensor([-inf, -88.5, -103.9])])
    d = torch.cat([d, d.new_zeros(-d.numel() % 11)]).reshape(-1, 11)
    rows = torch.cat([d.new_zeros(d.shape[0], 1), d], 1)
    _assert_scores_like_torch(_cpu_scores(rows, "softmax"), torch.softmax(rows, -1), "softmax")
    rows = torch.tensor([[-inf] * 12, [inf] + [0.0] * 11, [inf, inf] + [-inf] * 10])
    _assert_scores_like_torch(_cpu_scores(rows, "softmax"), torch.softmax(rows, -1), "softmax +-inf rows")


_SCALAR_SCRIPT = r"""
import torch, moe_ops
from moe_ops import reference as R
from moe_ops import _C  # noqa
g = torch.Generator().manual_seed(0)
E, M, K, N = 3, 30, 37, 19
offs = torch.tensor([2, 10, 10, 27], dtype=torch.int32)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    a = torch.randn(M, K, generator=g).to(dt)
    for tb in (True, False):
        b = (torch.randn(E, N, K, generator=g) if tb else torch.randn(E, K, N, generator=g)).to(dt)
        c = torch.ops.moe_ops.grouped_gemm(a, b, offs, tb).double()
        r = R.grouped_gemm(a.double(), b.double(), offs, tb)
        assert (c - r).abs().max() < (1e-4 if dt == torch.float32 else 0.1), (dt, tb)
    y = torch.randn(M, N, generator=g).to(dt)
    rows = torch.randint(-1, M, (20,), generator=g, dtype=torch.int32)
    w = torch.rand(10, 2, generator=g)
    assert torch.equal(torch.ops.moe_ops.unpermute(y, rows, w, 2), R.unpermute(y, rows, w, 2))
# the router's scalar path: sigmoid(-inf) = 0 below a denormal; NaN keys (softmax of only -inf)
# below the masked groups' -inf
inf = float("inf")
_, ids = torch.ops.moe_ops.topk_gating(torch.tensor([[-inf, -88.5]]), 1, "sigmoid", False, 0, 0, None, 1.0)
assert ids.tolist() == [[1]], ids
_, ids = torch.ops.moe_ops.topk_gating(torch.full((1, 16), -inf), 4, "softmax", False, 4, 2, torch.zeros(16), 1.0)
assert ids.tolist() == [[8, 9, 10, 11]], ids
print("ok")
"""


@pytest.mark.skipif(not avx512_emulation_built(),
                    reason="no SIMDe build: no emulated AVX-512 kernels")
def test_avx512_fused_experts_emulated():
    """fused_experts on bf16 weights as stored with the AVX512-BF16 kernels (each weight block
    repacked to VNNI per tile, then vdpbf16ps), emulated through SIMDe: this file's bf16 fused_experts tests (reference cases, dropped
    ids, NaN-poisoned scratch) and the thread-count test again, in a subprocess."""
    rerun_with_emulated_avx512(os.path.abspath(__file__),
                               "(fused_experts and bfloat16 and not packed) or thread_count")


def test_portable_kernels_without_avx2():
    env = dict(os.environ, MOE_OPS_CPU_NO_AVX2="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SCALAR_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
