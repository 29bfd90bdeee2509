"""Triton grouped GEMM on weight-only quantized experts (issue 17; triton_kernels/grouped_gemm_quant.py).

Oracle: ``reference.grouped_gemm_quantized`` (dequantize_experts, then the reference grouped GEMM in
float32). Error is judged scale-invariantly (RMS of the difference / RMS of the reference) per
activation dtype. Decoding is checked exactly with one-hot activations: row r of expert e picks
column k of the weights, so the output is the dequantized weight itself (every mxfp4 byte and e8m0
scale incl. 0/127/254/255, every fp8 code incl. NaN, every int8 value). Outputs are NaN-poisoned
(the kernel is given a NaN-filled output buffer) and ``a`` rows the kernel must not read are NaN.

As tests/test_triton.py: under the Triton interpreter bf16 ``tl.dot`` is wrong, so fp32/fp16 run
there and bf16 only on a GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import moe_ops  # noqa: E402
from moe_ops import quant  # noqa: E402
from moe_ops import reference as R  # noqa: E402
from tests.compare import assert_bitwise_equal  # noqa: E402
from tests.inputs import make_layer, make_offsets, make_x, seed_for  # noqa: E402
from tests.poison import poison  # noqa: E402

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in moe_ops.available_backends(device=DEVICE):
    pytest.skip(f"triton backend unavailable on {DEVICE}: {moe_ops.load_errors().get('triton')}",
                allow_module_level=True)

import moe_ops.triton_kernels as TK  # noqa: E402
from moe_ops.triton_kernels import grouped_gemm_quant as GQ  # noqa: E402

INTERP = TK.interpreted()
DTYPES = [torch.float32, torch.float16] + ([] if INTERP else [torch.bfloat16])
# scale-invariant error vs the float32 reference: the output's own rounding dominates
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def _rel_rms(got, ref):
    return float((got.double() - ref.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt())


def _same(got, want, name):
    """Equal values (+0 == -0), NaN exactly where ``want`` has NaN."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    ok = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert bool(ok.all()), (f"{name}: {int((~ok).sum())} of {ok.numel()} differ, first at {(~ok).nonzero()[:3].tolist()}: "
                            f"{got[~ok][:3].tolist()} vs {want[~ok][:3].tolist()}")


def _block(fmt, block):
    return quant._block(block) if fmt == "fp8_e4m3" else (0, 0)


def _kw(fmt, block):
    return {"block_size": block} if fmt == "fp8_e4m3" else {}


def _run(a, q, s, offs, fmt, block):
    """The kernel on a NaN-poisoned output buffer: every element must be written."""
    E, N, K = GQ.logical_nk(q, fmt)
    out = poison(torch.empty(a.shape[0], N, dtype=a.dtype, device=a.device))
    return GQ.run_quantized_gemm(a, q, s, offs.to(torch.int32), fmt, *_block(fmt, block), out)


CASES = [
    # (name, format, block, E, M, N, K, head, tail, empty experts)
    ("fp8-partial-blocks", "fp8_e4m3", (128, 128), 3, 40, 130, 200, 2, 3, 1),  # K, N not multiples of 128
    ("fp8-16x32", "fp8_e4m3", (16, 32), 4, 45, 40, 96, 0, 0, 1),
    ("fp8-5x48", "fp8_e4m3", (5, 48), 3, 30, 33, 100, 1, 0, 0),      # block_k 48: K tiles of 16
    ("fp8-7x12", "fp8_e4m3", (7, 12), 3, 30, 20, 50, 0, 2, 1),       # block_k 12: per-element scales
    ("mxfp4", "mxfp4", None, 4, 45, 40, 96, 3, 2, 1),
    ("int8", "int8", None, 3, 37, 33, 72, 0, 4, 1),
    ("int8-scale-n1", "int8", None, 2, 20, 24, 40, 0, 0, 0),           # scale [E, N, 1]
    ("all-rows-outside", "int8", None, 3, 9, 16, 32, 9, 0, 0),         # every expert empty
    ("T0", "mxfp4", None, 3, 0, 16, 64, 0, 0, 0),
]


def _case_inputs(case, dtype):
    name, fmt, block, E, M, N, K, head, tail, empty = case
    s = seed_for("triton-quant", name, str(dtype))
    q, sc = quant.quantize_experts(make_x(E * N, K, seed=s).reshape(E, N, K), fmt, **_kw(fmt, block))
    if name == "int8-scale-n1":
        sc = sc.unsqueeze(-1)
    offs = make_offsets(M, E, seed=s + 1, head=head, tail=min(tail, M - head), empty=empty)
    a = make_x(M, K, seed=s + 2, dtype=dtype)
    outside = torch.ones(M, dtype=torch.bool)
    outside[int(offs[0]):int(offs[-1])] = False
    a[outside] = float("nan")  # rows outside [offs[0], offs[E]) must not be read
    return [t.to(DEVICE) for t in (a, q, sc, offs)] + [fmt, block]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_dequantized_reference(case, dtype):
    a, q, sc, offs, fmt, block = _case_inputs(case, dtype)
    got = _run(a, q, sc, offs, fmt, block)
    ref = R.grouped_gemm_quantized(a.float(), q, sc, offs, fmt, *_block(fmt, block))
    assert got.dtype == dtype and got.shape == ref.shape
    lo, hi = int(offs[0]), int(offs[-1])
    assert bool((got[:lo] == 0).all() and (got[hi:] == 0).all()), "rows outside the offsets must be 0"
    assert bool(torch.isfinite(got).all())
    if hi > lo:
        assert _rel_rms(got, ref) <= TOL[dtype], _rel_rms(got, ref)
    if dtype == torch.float32:  # determinism, and the public op gives the same bits
        again = moe_ops.grouped_gemm(a, q, offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton",
                                     **_kw(fmt, block))
        assert_bitwise_equal(got, again, "two calls")


def _one_hot_rows(E, K, dtype):
    """E*K rows: row e*K + k is 1 at column k (so it reads expert e's weight column k exactly)."""
    a = torch.eye(K, dtype=dtype).repeat(E, 1)
    offs = torch.arange(E + 1, dtype=torch.int32) * K
    return a.to(DEVICE), offs.to(DEVICE)


def _picked(w, E, K):
    """What the one-hot rows compute from dequantized weights w[E, N, K]: out[e*K + k, n] = w[e, n, k]."""
    return w.transpose(1, 2).reshape(E * K, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_mxfp4_every_nibble_and_e8m0_scale(dtype):
    E, N, G = 2, 64, 2
    K = G * 32
    blocks = torch.arange(E * N * G * 16, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(E, N, G, 16)
    blocks = blocks[:, torch.randperm(N, generator=torch.Generator().manual_seed(1))]
    scales = torch.arange(E * N * G, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(E, N, G)
    for special in (0, 1, 126, 127, 128, 253, 254, 255):
        assert bool((scales == special).any())
    a, offs = _one_hot_rows(E, K, dtype)
    got = _run(a, blocks.to(DEVICE), scales.to(DEVICE), offs, "mxfp4", None)
    want = _picked(quant.dequantize_experts(blocks, scales, "mxfp4"), E, K).to(dtype)
    _same(got.cpu(), want, "mxfp4 decode")


@pytest.mark.parametrize("fmt,block,fp8_bits", [("fp8_e4m3", (16, 16), False), ("fp8_e4m3", (8, 8), False),
                                                ("fp8_e4m3", (16, 16), True), ("int8", None, False)])
def test_every_fp8_and_int8_code(fmt, block, fp8_bits, monkeypatch):
    """Every code through the kernel; fp8 NaN codes (0x7F, 0xFF) make their weight column NaN for
    every row of the expert (0 * NaN in the dot), as the reference's GEMM does. ``fp8_bits``: the
    decoder GPUs before sm_89 use (no fp8 conversion instruction), forced here."""
    monkeypatch.setattr(GQ, "FORCE_FP8_BITS", fp8_bits)
    E, N, K = 2, 16, 16
    codes = torch.arange(E * N * K, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(E, N, K)
    g = torch.Generator().manual_seed(2)
    if fmt == "fp8_e4m3":
        q = codes.view(torch.float8_e4m3fn)
        bn, bk = block
        sc = torch.rand(E, -(-N // bn), -(-K // bk), generator=g) + 0.5
    else:
        q = codes.view(torch.int8)
        sc = torch.rand(E, N, generator=g) + 0.5
    a, offs = _one_hot_rows(E, K, torch.float32)
    got = _run(a, q.to(DEVICE), sc.to(DEVICE), offs, fmt, block)
    want = R.grouped_gemm_quantized(a.cpu(), q, sc, offs.cpu(), fmt, *_block(fmt, block))
    _same(got.cpu(), want, f"{fmt} codes")
    if fmt == "fp8_e4m3":
        assert bool(torch.isnan(want).any()) and bool(torch.isfinite(want).any())


def test_bad_arguments_raise_before_any_kernel():
    a, q, sc, offs, fmt, block = _case_inputs(CASES[4], torch.float32)   # mxfp4
    q8, s8 = quant.quantize_experts(make_x(3 * 16, 32, seed=3).reshape(3, 16, 32), "int8")
    qf, sf = quant.quantize_experts(make_x(3 * 16, 32, seed=4).reshape(3, 16, 32), "fp8_e4m3", block_size=(8, 8))
    a32 = make_x(10, 32, seed=5, device=DEVICE)
    o3 = torch.tensor([0, 3, 3, 10], dtype=torch.int32, device=DEVICE)
    gg = moe_ops.grouped_gemm
    before = TK.launch_count()
    with pytest.raises(TypeError, match="dtype"):
        gg(a.double(), q, offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton")
    with pytest.raises(TypeError, match="uint8"):
        gg(a, q.to(torch.int8), offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton")
    with pytest.raises(ValueError, match="scales must be"):
        gg(a, q, offs, trans_b=True, weight_format=fmt, b_scale=sc[:, :, :1], backend="triton")
    with pytest.raises(ValueError, match="K="):       # mxfp4 K is a multiple of 32: a with K=95 cannot match
        gg(a[:, :95], q, offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton")
    with pytest.raises(ValueError, match="trans_b"):
        gg(a, q, offs, weight_format=fmt, b_scale=sc, backend="triton")
    with pytest.raises(ValueError, match="together"):
        gg(a, q, offs, trans_b=True, b_scale=sc, backend="triton")
    with pytest.raises(ValueError, match="per-row scale"):
        gg(a32, q8.to(DEVICE), o3, trans_b=True, weight_format="int8", b_scale=s8[:, :5].to(DEVICE), backend="triton")
    with pytest.raises(ValueError, match="block_size"):
        gg(a32, q8.to(DEVICE), o3, trans_b=True, weight_format="int8", b_scale=s8.to(DEVICE), block_size=(8, 8),
           backend="triton")
    with pytest.raises(ValueError, match="scale_inv"):  # fp8 scale for another block size
        gg(a32, qf.to(DEVICE), o3, trans_b=True, weight_format="fp8_e4m3", b_scale=sf.to(DEVICE), backend="triton")
    with pytest.raises(TypeError, match="float8"):
        gg(a32, q8.to(DEVICE), o3, trans_b=True, weight_format="fp8_e4m3", b_scale=sf.to(DEVICE),
           block_size=(8, 8), backend="triton")
    with pytest.raises(ValueError, match="E\\+1"):
        gg(a32, q8.to(DEVICE), o3[:3], trans_b=True, weight_format="int8", b_scale=s8.to(DEVICE), backend="triton")
    assert TK.launch_count() == before


def test_other_backends_dequantize_then_run_their_gemm():
    """The reference backend through the public function is the oracle itself."""
    a, q, sc, offs, fmt, block = _case_inputs(CASES[1], torch.float32)
    got = moe_ops.grouped_gemm(a.cpu(), q.cpu(), offs.cpu(), trans_b=True, weight_format=fmt, b_scale=sc.cpu(),
                               backend="reference", **_kw(fmt, block))
    _same(got, R.grouped_gemm_quantized(a.cpu(), q.cpu(), sc.cpu(), offs.cpu(), fmt, *block), "reference backend")


LAYER_CASES = [
    # (format, block, T, H, I, E, k, activation, gating extras)
    ("fp8_e4m3", (16, 32), 11, 64, 32, 6, 2, "swiglu", {}),
    ("fp8_e4m3", (128, 128), 9, 80, 48, 4, 2, "geglu", {}),        # partial blocks in both GEMMs
    ("fp8_e4m3", (7, 12), 7, 36, 20, 5, 3, "swiglu", {}),          # per-element scales, gate/up rows split a block
    ("mxfp4", None, 11, 64, 32, 6, 1, "swiglu", {}),               # k = 1: GEMM2 writes out directly
    ("int8", None, 13, 32, 24, 8, 3, "geglu", dict(scoring="sigmoid", renormalize=True, n_group=4, topk_group=2)),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c[0]}-{c[1]}-k{c[6]}-{c[7]}")
def test_moe_forward_runs_the_quantized_triton_gemm(case, monkeypatch):
    """moe_forward(weight_format=..., backend="triton") vs the reference layer on the dequantized
    weights, without the float32 dequantize fallback: dropless through the fused quantized layer
    (7 launches, 6 for k = 1, as the float one), and capacity through the op chain."""
    fmt, block, T, H, I, E, k, act, gating = case
    x, logits, w1, w2 = make_layer(T, H, I, E, seed=seed_for("layer", fmt, str(block)))
    kw = _kw(fmt, block)
    q1, s1 = quant.quantize_experts(w1, fmt, **kw)
    q2, s2 = quant.quantize_experts(w2, fmt, **kw)
    d1, d2 = quant.dequantize_experts(q1, s1, fmt, **kw), quant.dequantize_experts(q2, s2, fmt, **kw)
    xd, lg, a1, b1, a2, b2 = [t.to(DEVICE) for t in (x, logits, q1, s1, q2, s2)]

    def no_fallback(*args, **kwargs):
        raise AssertionError("the float32 dequantize fallback ran")
    monkeypatch.setattr(moe_ops.ops, "_dequantized_weights", no_fallback)
    for cf in (None, 1.0):
        ref = moe_ops.moe_forward(x, logits, d1, d2, k, activation=act, capacity_factor=cf, backend="reference",
                                  **gating)
        for dtype in DTYPES:
            run = lambda: moe_ops.moe_forward(xd.to(dtype), lg, a1, a2, k, weight_format=fmt,  # noqa: E731
                                              w_gate_up_scale=b1, w_down_scale=b2, activation=act,
                                              capacity_factor=cf, backend="triton", **gating, **kw)
            got = run()
            assert got.dtype == dtype and got.shape == (T, H)
            assert _rel_rms(got.cpu(), ref) <= 4 * TOL[dtype], (cf, dtype, _rel_rms(got.cpu(), ref))
            if cf is None and dtype == torch.float32:
                assert TK.last_launch_count() == (6 if k == 1 else 7)
                assert_bitwise_equal(got, run(), "two calls")


def test_fused_quantized_launch_count_independent_of_E():
    counts = []
    for E in (4, 64):
        x, logits, w1, w2 = make_layer(5, 32, 32, E, seed=E)
        q1, s1 = quant.quantize_experts(w1, "mxfp4")
        q2, s2 = quant.quantize_experts(w2, "mxfp4")
        moe_ops.moe_forward(x.to(DEVICE), logits.to(DEVICE), q1.to(DEVICE), q2.to(DEVICE), 2, weight_format="mxfp4",
                            w_gate_up_scale=s1.to(DEVICE), w_down_scale=s2.to(DEVICE), backend="triton")
        counts.append(TK.last_launch_count())
    assert counts == [7, 7]


def test_moe_forward_with_gradient_falls_back():
    """The quantized op has no derivative: a call that needs one dequantizes (autograd through x)."""
    T, H, I, E, k = 5, 32, 16, 3, 2
    x, logits, w1, w2 = make_layer(T, H, I, E, seed=41)
    q1, s1 = quant.quantize_experts(w1, "int8")
    q2, s2 = quant.quantize_experts(w2, "int8")
    x = x.to(DEVICE).requires_grad_(True)
    out = moe_ops.moe_forward(x, logits.to(DEVICE), q1.to(DEVICE), q2.to(DEVICE), k, weight_format="int8",
                              w_gate_up_scale=s1.to(DEVICE), w_down_scale=s2.to(DEVICE), backend="triton")
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_gemm_with_gradient_falls_back():
    """a that needs a gradient: dequantize, then the float grouped GEMM (which has a derivative)."""
    a, q, sc, offs, fmt, block = _case_inputs(CASES[5], torch.float32)   # int8
    a = a.nan_to_num(0.0).requires_grad_(True)
    c = moe_ops.grouped_gemm(a, q, offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton")
    c.pow(2).sum().backward()
    w = quant.dequantize_experts(q.cpu(), sc.cpu(), fmt)
    a0 = a.detach().cpu().requires_grad_(True)
    R.grouped_gemm(a0, w, offs.cpu(), True).pow(2).sum().backward()
    assert _rel_rms(a.grad.cpu(), a0.grad) <= 1e-5


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, s = quant.quantize_experts(torch.randn(3, 20, 64), "mxfp4")
    with FakeTensorMode() as mode:
        a = mode.from_tensor(torch.randn(9, 64))
        out = torch.ops.moe_ops_triton.grouped_gemm_quantized(a, mode.from_tensor(q), mode.from_tensor(s),
                                                              mode.from_tensor(torch.tensor([0, 3, 3, 9], dtype=torch.int32)),
                                                              "mxfp4", 0, 0)
    assert out.shape == (9, 20) and out.dtype == torch.float32


@pytest.mark.skipif(DEVICE != "cuda", reason="torch.compile of user Triton kernels needs a GPU")
def test_torch_compile_fullgraph():
    """The op is a triton_op and the fused layer launches through wrap_triton: no graph break."""
    q, s = quant.quantize_experts(make_x(3 * 32, 64, seed=1).reshape(3, 32, 64), "fp8_e4m3", block_size=(16, 32))
    a = make_x(21, 64, seed=2, dtype=torch.bfloat16, device=DEVICE)
    offs = torch.tensor([1, 8, 8, 20], dtype=torch.int32, device=DEVICE)
    x, logits, w1, w2 = make_layer(9, 32, 16, 4, seed=3)
    q1, s1 = quant.quantize_experts(w1, "int8")
    q2, s2 = quant.quantize_experts(w2, "int8")
    dev = [t.to(DEVICE) for t in (q, s, x.bfloat16(), logits, q1, s1, q2, s2)]

    def f(a, offs, q, s, x, logits, q1, s1, q2, s2):
        c = torch.ops.moe_ops_triton.grouped_gemm_quantized(a, q, s, offs, "fp8_e4m3", 16, 32)
        y = TK.fused_moe_quantized_forward(x, logits, q1, s1, q2, s2, "int8", 0, 0, 2)
        return c, y

    eager = f(a, offs, *dev)
    compiled = torch.compile(f, fullgraph=True)(a, offs, *dev)
    for e, c in zip(eager, compiled):
        assert_bitwise_equal(e, c, "compiled vs eager")
