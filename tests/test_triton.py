"""Triton backend against the reference, on CPU through the Triton interpreter.

Without a GPU this module sets ``TRITON_INTERPRET=1`` before triton is imported (the backend
registers for cpu tensors only then). The generic matrix (tests/op_matrix.py, run by tests/test_<op stem>.py) also covers the
``triton`` backend; this file adds what is specific to it: E=257 and k=8, empty experts, T=1,
GEMM tiles straddling two experts' segments, the fused layer (gather + SwiGLU / weight +
scatter) and its launch count for E=8 vs E=256, determinism, configs, fake-tensor shapes.

bfloat16: the Triton *interpreter* (3.6, 3.8) computes ``tl.dot`` on bf16 operands wrongly (fp16 and
fp32 are right), so under the interpreter every dot-product test runs in fp16/fp32/fp64 and
the bf16 GEMM variants are skipped (the backend declares them: moe_ops.backend.unsupported_reason). On a GPU
the same code path runs bf16 and these tests include it. Kernels without tl.dot (gating,
permute, combine) are tested in bf16 everywhere.

Shapes stay tiny (H, N, K ~ 16-64): the interpreter runs every program in Python.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops import backend as _backend  # noqa: E402
from moe_ops import reference as R  # noqa: E402
from tests.compare import (assert_bitwise_equal, assert_close_to_reference, assert_exact,  # noqa: E402
                           assert_gating_equal, reference_hi, reference_layer)
from tests.inputs import make_ids, make_layer, make_logits, make_offsets, make_x, seed_for  # noqa: E402

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in moe_ops.available_backends(device=DEVICE):
    pytest.skip(f"triton backend unavailable on {DEVICE}: {moe_ops.load_errors().get('triton')} "
                "(on CPU, TRITON_INTERPRET=1 must be set before triton is first imported)",
                allow_module_level=True)

import moe_ops.triton_kernels as TK  # noqa: E402
from moe_ops.triton_kernels import configs, grouped_gemm as GG  # noqa: E402

INTERP = TK.interpreted()
# dtypes whose tl.dot results are trustworthy here (see the module docstring)
DOT_DTYPES = [torch.float32, torch.float16] + ([] if INTERP else [torch.bfloat16])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run_twice(fn, twice=True):
    """Run ``fn`` (twice when ``twice``: assert bitwise-equal outputs, determinism); return the
    first result. Callers check determinism in one dtype to keep the interpreter's time down."""
    a = fn()
    if not twice:
        return a
    b = fn()
    outs_a = a if isinstance(a, tuple) else (a,)
    outs_b = b if isinstance(b, tuple) else (b,)
    for i, (x, y) in enumerate(zip(outs_a, outs_b)):
        assert_bitwise_equal(x, y, f"output {i}")
    return a


# -------------------------------------------------------------------------------- routing

GATING = [
    # (T, E, k, scoring, renormalize, n_group, topk_group, bias, scale, ties, nan_rows)
    (13, 257, 8, "softmax", False, 0, 0, False, 1.0, False, 0),
    (1, 257, 8, "softmax", True, 0, 0, False, 2.5, False, 0),
    (9, 64, 8, "sigmoid", True, 8, 4, True, 2.5, False, 2),   # DeepSeek-V3-like group routing
    (11, 16, 4, "softmax", False, 0, 0, False, 1.0, True, 1),  # exact ties -> lower index; NaN rows
    (7, 12, 3, "sigmoid", False, 6, 2, False, 1.0, True, 0),   # G=2 groups with ties
    (5, 8, 1, "softmax", False, 8, 3, True, 1.0, False, 0),    # G=1: group score is one key
    (0, 8, 2, "softmax", False, 0, 0, False, 1.0, False, 0),
]


@pytest.mark.parametrize("case", GATING, ids=lambda c: f"T{c[0]}-E{c[1]}-k{c[2]}-{c[3]}-g{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_gating(case, dtype):
    T, E, k, scoring, renorm, ng, tg, has_bias, scale, ties, nan_rows = case
    s = seed_for("gating", case, str(dtype))
    logits = make_logits(T, E, seed=s, dtype=dtype, device=DEVICE, ties=ties, nan_rows=nan_rows)
    bias = make_logits(1, E, seed=s + 1, device=DEVICE, scale=0.2)[0] if has_bias else None
    w, ids = _run_twice(lambda: moe_ops.topk_gating(
        logits, k, scoring=scoring, renormalize=renorm, n_group=ng or None, topk_group=tg or None,
        correction_bias=bias, scaling_factor=scale, backend="triton"), dtype == torch.float32)
    assert_gating_equal(w, ids, logits, k, scoring, renorm, ng, tg, bias, scale)
    if ties or dtype == torch.float64:  # no near-tie slack needed: ids must be exactly the reference's
        ref_w, ref_ids = R.topk_gating(logits, k, scoring, renorm, ng, tg, bias, scale)
        assert_exact(ids, ref_ids, "ids")


# ------------------------------------------------------------------------- permute/combine

PERMUTE = [
    # (T, k, E, block_m, ids mode, empty experts, invalid fraction)
    (13, 8, 257, 1, "uniform", 0, 0.0),
    (13, 8, 257, 16, "skew", 0, 0.1),
    (1, 8, 16, 4, "uniform", 0, 0.0),
    (40, 2, 8, 3, "uniform", 3, 0.0),      # empty experts
    (30, 3, 5, 1, "dup", 0, 0.2),          # repeats within a row, invalid ids dropped
    (0, 2, 4, 4, "uniform", 0, 0.0),
    (300, 1, 3, 1, "one", 0, 0.0),         # several rank blocks (BLOCK_S = 128 slots)
]


@pytest.mark.parametrize("case", PERMUTE, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-bm{c[3]}-{c[4]}")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_permute_unpermute(case, dtype):
    T, k, E, bm, mode, empty, invalid = case
    s = seed_for("permute", case, str(dtype))
    ids = make_ids(T, k, E, seed=s, mode=mode, empty=empty, invalid=invalid, device=DEVICE)
    x = make_x(T, 24, seed=s + 1, dtype=dtype, device=DEVICE)
    once = dtype != torch.float32
    out = _run_twice(lambda: moe_ops.permute(x, ids, E, block_m=bm, allow_invalid_ids=True, backend="triton"), not once)
    ref = R.permute(x, ids, E, bm)
    for name, o, r in zip(("x_sorted", "sorted_slots", "expert_offsets", "slot_rows"), out, ref):
        assert_exact(o, r, name)
    # unpermute: padding rows poisoned (must not be read), dropped slots' weights NaN
    y = make_x(ref[1].shape[0], 24, seed=s + 2, dtype=dtype, device=DEVICE)
    y[ref[1] < 0] = float("nan")
    w = make_logits(T, k, seed=s + 3, device=DEVICE).abs()
    w[ref[3].reshape(T, k) < 0] = float("nan")
    for weights in (w, None):
        got = _run_twice(lambda: moe_ops.unpermute(y, ref[3], weights, k=k, backend="triton"), not once)
        assert_close_to_reference(got, R.unpermute(y, ref[3], weights, k),
                                  reference_hi("unpermute", y, ref[3], weights, k), name="unpermute")


CAPACITY = [(40, 2, 8, 5), (13, 8, 257, 1), (30, 3, 6, 0), (1, 4, 8, 3), (200, 2, 4, 70)]


@pytest.mark.parametrize("case", CAPACITY, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-C{c[3]}")
@pytest.mark.parametrize("priority", ["kmajor", "token_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capacity(case, priority, dtype):
    T, k, E, C = case
    s = seed_for("capacity", case, priority, str(dtype))
    ids = make_ids(T, k, E, seed=s, mode="skew", invalid=0.1, device=DEVICE)
    x = make_x(T, 20, seed=s + 1, dtype=dtype, device=DEVICE)
    twice = dtype == torch.float32
    out = _run_twice(lambda: moe_ops.capacity_dispatch(x, ids, E, C, priority=priority,
                                                       allow_invalid_ids=True, backend="triton"), twice)
    ref = R.capacity_dispatch(x, ids, E, C, priority)
    for name, o, r in zip(("buf", "slot_pos", "demand", "kept"), out, ref):
        assert_exact(o, r, name)
    buf = make_x(E * C, 20, seed=s + 2, dtype=dtype, device=DEVICE)
    used = torch.zeros(E * C + 1, dtype=torch.bool, device=DEVICE)
    used[torch.where(ref[1] >= 0, ids.long() * C + ref[1].long(), E * C).reshape(-1)] = True
    buf[~used[:E * C]] = float("nan")  # unused capacity rows: never read
    buf = buf.reshape(E, C, 20)
    w = make_logits(T, k, seed=s + 3, device=DEVICE)
    w[ref[1] < 0] = float("nan")
    got = _run_twice(lambda: moe_ops.capacity_combine(buf, ids, ref[1], w, backend="triton"), twice)
    assert_close_to_reference(got, R.capacity_combine(buf, ids, ref[1], w),
                              reference_hi("capacity_combine", buf, ids, ref[1], w), name="capacity_combine")


# --------------------------------------------------------------------------- grouped GEMM

def _offsets(counts, head=0):
    offs = torch.zeros(len(counts) + 1, dtype=torch.int32)
    offs[0] = head
    offs[1:] = head + torch.tensor(counts, dtype=torch.int32).cumsum(0)
    return offs.to(DEVICE)


GEMM = [
    # (name, counts per expert or None for random, E, M, K, N, head, tail)
    ("straddle", [5, 32, 3, 0, 21], 5, 64, 24, 40, 0, 3),  # 16-row tiles: expert 0/1 boundary mid-tile
    ("e257-empty", None, 257, 40, 16, 16, 2, 1),
    ("one-row", [0, 1, 0], 3, 1, 32, 16, 0, 0),             # T=1-like
    ("all-empty", [0, 0, 0, 0], 4, 9, 16, 16, 4, 0),          # every row outside the offsets
    ("ragged-K", [17, 9], 2, 26, 33, 17, 0, 0),               # K, N not multiples of the tile
]


GEMM_PARAMS = ([(c, tb, dt) for c in GEMM for tb in (False, True) for dt in DOT_DTYPES
                if tb or c[0] != "e257-empty"]  # E=257: the layer's layout only (interpreter time)
               + [(GEMM[0], True, torch.float64), (GEMM[4], False, torch.float64)])


@pytest.mark.parametrize("case,trans_b,dtype", GEMM_PARAMS,
                         ids=lambda v: v[0] if isinstance(v, tuple) else str(v).replace("torch.", ""))
def test_grouped_gemm(case, trans_b, dtype):
    name, counts, E, M, K, N, head, tail = case
    s = seed_for("gemm", case, trans_b, str(dtype))
    offs = (_offsets(counts, head) if counts is not None
            else make_offsets(M, E, seed=s, head=head, tail=tail, empty=E // 3, device=DEVICE))
    a = make_x(M, K, seed=s + 1, dtype=dtype, device=DEVICE)
    outside = torch.ones(M, dtype=torch.bool, device=DEVICE)
    outside[int(offs[0]):int(offs[-1])] = False
    a[outside] = float("nan")  # rows outside [offs[0], offs[E]) must not be read
    b = make_x(E * K, N, seed=s + 2, dtype=dtype, device=DEVICE, scale=0.5).reshape(E, K, N)
    if trans_b:
        b = b.transpose(1, 2).contiguous()
    twice = dtype == torch.float32
    got = _run_twice(lambda: moe_ops.grouped_gemm(a, b, offs, trans_b=trans_b, backend="triton"), twice)
    assert_close_to_reference(got, R.grouped_gemm(a, b, offs, trans_b),
                              reference_hi("grouped_gemm", a, b, offs, trans_b), name="grouped_gemm")
    dc = make_x(M, N, seed=s + 3, dtype=dtype, device=DEVICE)
    dc[outside] = float("nan")
    got = _run_twice(lambda: moe_ops.grouped_gemm_wgrad(a, dc, offs, E, backend="triton"), twice)
    assert_close_to_reference(got, R.grouped_gemm_wgrad(a, dc, offs, E),
                              reference_hi("grouped_gemm_wgrad", a, dc, offs, E), name="grouped_gemm_wgrad")


def test_tile_schedule_is_built_on_device():
    """sched[e] = number of BLOCK_M tiles of experts < e, then each row tile's expert (-1 past
    the last), from the offsets alone."""
    counts = [5, 0, 32, 3, 16, 0, 17]
    E, M = len(counts), 2 + sum(counts) + 3
    offs = _offsets(counts, head=2)
    sched = GG.build_schedule(offs, E, 16, M).cpu()
    tiles = [-(-c // 16) for c in counts]
    prefix = [0] + torch.tensor(tiles).cumsum(0).tolist()
    tile_expert = [e for e, n in enumerate(tiles) for _ in range(n)]
    bound = -(-M // 16) + E
    want = torch.tensor(prefix + tile_expert + [-1] * (bound - len(tile_expert)), dtype=torch.int32)
    assert_exact(sched, want, "schedule")


def test_strided_b_views():
    """A transposed view of b (non-contiguous) gives the same result as a contiguous copy."""
    s = seed_for("strided")
    offs = _offsets([7, 0, 12])
    a = make_x(19, 32, seed=s, device=DEVICE)
    b = make_x(3 * 32, 16, seed=s + 1, device=DEVICE).reshape(3, 32, 16)
    got = moe_ops.grouped_gemm(a, b.transpose(1, 2), offs, trans_b=True, backend="triton")
    assert_exact(got, moe_ops.grouped_gemm(a, b, offs, trans_b=False, backend="triton"), "strided")


@pytest.mark.skipif(not INTERP, reason="only the interpreter mis-computes bf16 tl.dot")
def test_bf16_dot_declared_unsupported_under_interpreter():
    assert _backend.unsupported_reason("triton", "grouped_gemm", torch.bfloat16, "cpu")
    assert _backend.unsupported_reason("triton", "moe_forward", torch.bfloat16, "cpu")
    assert _backend.unsupported_reason("triton", "grouped_gemm", torch.float16, "cpu") is None


# ----------------------------------------------------------------------------- fused layer

def _layer_inputs(T, H, I, E, dtype, seed):
    return make_layer(T, H, I, E, seed=seed, dtype=dtype, device=DEVICE)


# The fused layer against the reference on every backend with one: tests/test_fused_moe.py.


def test_fused_launch_count_independent_of_E():
    """Same number of kernel launches for E=8 and E=256 (static grids, device-built schedule)."""
    counts = {}
    for E in (8, 256):
        x, logits, w1, w2 = _layer_inputs(6, 16, 16, E, torch.float32, seed_for("launches", E))
        with torch.no_grad():
            before = TK.launch_count()
            out = moe_ops.moe_forward(x, logits, w1, w2, 2, backend="triton")
            counts[E] = TK.launch_count() - before
        assert counts[E] == TK.last_launch_count()
        lowp, hi = reference_layer(x, logits, w1, w2, 2)
        assert_close_to_reference(out, lowp, hi, name=f"E={E}")
    assert counts[8] == counts[256] == 7, counts


def test_fused_layer_autograd_falls_back_to_op_chain():
    """With inputs requiring grad the layer runs the unfused op chain (ops with derivatives)."""
    x, logits, w1, w2 = _layer_inputs(5, 16, 16, 4, torch.float32, seed_for("grad"))
    w1.requires_grad_(True)
    out = moe_ops.moe_forward(x, logits, w1, w2, 2, backend="triton")
    assert TK.last_launch_count() > 7  # permute/gemm/unpermute as separate ops
    with torch.no_grad():
        fused = moe_ops.moe_forward(x, logits, w1, w2, 2, backend="triton")
    lowp, hi = reference_layer(x, logits, w1.detach(), w2, 2)
    assert_close_to_reference(out.detach(), lowp, hi, name="unfused chain")
    assert_close_to_reference(fused, lowp, hi, name="fused")


# ------------------------------------------------------------------------ configs / shapes

def test_config_files(tmp_path, monkeypatch):
    E, N, K, M = 3, 16, 32, 19
    dev = configs.device_name(torch.device(DEVICE))
    cfg = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    path = tmp_path / configs.config_filename(E, N, K, dev, torch.float32)
    path.write_text('{"16": %s, "4096": {"BLOCK_M": 128}}' % str(cfg).replace("'", '"'))
    monkeypatch.setenv("MOE_OPS_TRITON_CONFIG_DIR", str(tmp_path))
    assert configs.get_config(E, N, K, torch.float32, torch.device(DEVICE), M) == cfg
    # the tuned config gives the same (correct) result
    offs = _offsets([7, 0, 12])
    a = make_x(M, K, seed=1, device=DEVICE)
    b = make_x(E * K, N, seed=2, device=DEVICE).reshape(E, K, N)
    got = moe_ops.grouped_gemm(a, b, offs, backend="triton")
    assert_close_to_reference(got, R.grouped_gemm(a, b, offs, False),
                              reference_hi("grouped_gemm", a, b, offs, False), name="tuned config")
    monkeypatch.delenv("MOE_OPS_TRITON_CONFIG_DIR")
    default = configs.get_config(E, N, K, torch.float32, torch.device(DEVICE), M)
    assert set(default) == set(configs.KEYS) and default["BLOCK_M"] >= 16


def test_fake_tensor_shapes():
    """The op bodies double as shape functions: run them on fake tensors (no kernel launches)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.moe_ops_triton
    with FakeTensorMode():
        x = torch.empty(5, 16)
        ids = torch.empty(5, 2, dtype=torch.int32)
        before = TK.launch_count()
        xs, ss, offs, rows = ops.permute(x, ids, 4, 4)
        assert xs.shape == (5 * 2 + 4 * 3, 16) and offs.shape == (5,) and rows.shape == (10,)
        w, i = ops.topk_gating(torch.empty(5, 8), 2, "softmax", False, 0, 0, None, 1.0)
        assert w.shape == (5, 2) and i.dtype == torch.int32
        c = ops.grouped_gemm(xs, torch.empty(4, 32, 16), offs, True)
        assert c.shape == (22, 32)
        buf, pos, dem, kept = ops.capacity_dispatch(x, ids, 4, 3, "kmajor")
        assert buf.shape == (4, 3, 16) and pos.shape == (5, 2) and dem.shape == (4,)
        assert TK.launch_count() == before


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile of user Triton kernels needs a GPU")
def test_torch_compile_fullgraph():
    """The ops are triton_ops: torch.compile(fullgraph=True) traces into them, no graph break."""
    offs = _offsets([7, 0, 12], head=1)
    a = make_x(21, 32, seed=1, device=DEVICE)
    b = make_x(3 * 16, 32, seed=2, device=DEVICE).reshape(3, 16, 32)
    x, logits, w1, w2 = _layer_inputs(9, 32, 16, 4, torch.float16, seed_for("compile"))

    def f(a, b, offs, x, logits, w1, w2):
        c = torch.ops.moe_ops_triton.grouped_gemm(a, b, offs, True)
        y = TK.fused_moe_forward(x, logits, w1, w2, 2)
        return c, y

    eager = f(a, b, offs, x, logits, w1, w2)
    compiled = torch.compile(f, fullgraph=True)(a, b, offs, x, logits, w1, w2)
    for e, c in zip(eager, compiled):
        assert_bitwise_equal(e, c, "compiled vs eager")
