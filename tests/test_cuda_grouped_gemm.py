"""The CUDA grouped GEMM's own cases (csrc/kernels/grouped_gemm*.cuh) on ``cuda_sim`` (the SIMT
emulator, here) and ``cuda`` (a GPU, in the GPU check), beyond the shared op matrix:

* both kernels -- tensor cores (bf16/fp16 with 16-byte aligned rows) and CUDA cores (every
  dtype; ``MOE_OPS_CUDA_GEMM=simt``, and shapes the tensor-core kernel does not take) -- against
  the reference, with the k tail, n tail, several k tiles (the cp.async ring wraps), experts
  spanning several 64-row tiles and empty experts;
* hostile offsets (negative, past M, decreasing): read exactly as the CPU backend reads them;
* the fused expert stage with EP sentinel ids (dropped) and both activations.
A planted ``cp.async.wait_group`` off-by-one or a fragment index error fails these (checked by
hand when the kernels changed; the emulator's own tests pin the primitives).
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from tests.compare import assert_bitwise_equal, assert_close_to_reference, reference_hi
from tests.inputs import make_ids, make_offsets, make_x, seed_for
from tests.poison import poison


def _cuda_backends():
    out = []
    if "cuda_sim" in moe_ops.available_backends("grouped_gemm", "cpu"):
        out.append(("cuda_sim", "cpu"))
    if torch.cuda.is_available() and "cuda" in moe_ops.available_backends("grouped_gemm", "cuda"):
        out.append(("cuda", "cuda"))
    return out


BACKENDS = [pytest.param(b, d, id=b, marks=[pytest.mark.gpu] if d == "cuda" else []) for b, d in _cuda_backends()]
if not BACKENDS:
    BACKENDS = [pytest.param(None, None, marks=pytest.mark.skip(reason="no CUDA kernels here (cuda_sim not built, no GPU)"))]

# (M, K, N, E, trans_b): K/N tails, K over several 32-deep k tiles, experts over several 64-row tiles
SHAPES = [
    (150, 96, 72, 3, True),     # aligned: tensor cores for bf16/fp16; 3 k tiles = the ring wraps
    (150, 96, 72, 3, False),    # k-major B (ldmatrix .trans)
    (40, 40, 24, 5, True),      # K = 40: a partial k tile (zero-filled chunks)
    (33, 12, 10, 4, False),     # K % 8 != 0: the CUDA-core kernel for every dtype
    (70, 16, 130, 2, True),     # N over two 64-column tiles plus a tail
]


# (dtype, kernel choice): float32/float64 run on CUDA cores only; bf16/fp16 on both kernels.
DTYPE_KERNELS = [(torch.float32, "auto"), (torch.float64, "auto"), (torch.float16, "auto"), (torch.bfloat16, "auto"),
                 (torch.float16, "simt"), (torch.bfloat16, "simt")]


def _choose(kernel, monkeypatch):
    if kernel == "simt":
        monkeypatch.setenv("MOE_OPS_CUDA_GEMM", "simt")
    else:
        monkeypatch.delenv("MOE_OPS_CUDA_GEMM", raising=False)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}-E{}-{}".format(*s[:4], "nk" if s[4] else "kn"))
@pytest.mark.parametrize("dtype,gemm_kernel", DTYPE_KERNELS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name,device", BACKENDS)
def test_grouped_gemm_kernels(name, device, dtype, shape, gemm_kernel, monkeypatch):
    _choose(gemm_kernel, monkeypatch)
    M, K, N, E, trans_b = shape
    s = seed_for("cuda_gemm", shape, str(dtype))
    offs = make_offsets(M, E, seed=s, head=2, tail=3, empty=1 if E > 2 else 0, device=device)
    a = make_x(M, K, seed=s + 1, dtype=dtype, device=device)
    a[:2] = float("nan")                                  # rows outside every expert: never read
    a[M - 3:] = float("nan")
    b = make_x(E * K, N, seed=s + 2, dtype=dtype, device=device, scale=K ** -0.5).reshape(E, K, N)
    if trans_b:
        b = b.transpose(1, 2).contiguous()
    got = moe_ops.grouped_gemm(a, b, offs, trans_b=trans_b, backend=name)
    lowp = moe_ops.grouped_gemm(a, b, offs, trans_b=trans_b, backend="reference")
    assert_close_to_reference(got, lowp, reference_hi("grouped_gemm", a, b, offs, trans_b), name=f"{name}/{gemm_kernel}")
    assert_bitwise_equal(got, moe_ops.grouped_gemm(a, b, offs, trans_b=trans_b, backend=name), "determinism")
    dc = make_x(M, N, seed=s + 3, dtype=dtype, device=device)
    dc[:2] = float("nan")
    dc[M - 3:] = float("nan")
    got_w = moe_ops.grouped_gemm_wgrad(a, dc, offs, E, backend=name)
    assert_close_to_reference(got_w, moe_ops.grouped_gemm_wgrad(a, dc, offs, E, backend="reference"),
                              reference_hi("grouped_gemm_wgrad", a, dc, offs, E), name=f"{name} wgrad")


@pytest.mark.parametrize("name,device", BACKENDS)
def test_hostile_offsets_read_like_the_cpu_backend(name, device):
    """Negative, past-M and decreasing offsets never index out of bounds: clamped to [0, M] and
    made non-decreasing on the device, exactly as the CPU backend reads them (the public function
    cannot check values without a host sync; torch.ops.* is what a hostile caller reaches)."""
    M, K, N, E = 30, 16, 8, 5
    a = make_x(M, K, seed=7, device=device)
    b = make_x(E * K, N, seed=8, device=device).reshape(E, K, N)
    for offs in ([-5, 3, 40, 10, 20, 25], [0, 12, 6, 30, 99, -1], [31, 0, 0, 0, 0, 0], [-1] * 6):
        o = torch.tensor(offs, dtype=torch.int32)
        got = getattr(torch.ops, "moe_ops_sim" if name == "cuda_sim" else "moe_ops").grouped_gemm(a, b, o.to(device), False)
        want = torch.ops.moe_ops.grouped_gemm(a.cpu(), b.cpu(), o, False)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5, msg=f"offsets {offs}")


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype,gemm_kernel", [(torch.float32, "auto"), (torch.float64, "auto"), (torch.bfloat16, "auto"),
                                               (torch.bfloat16, "simt")], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("name,device", BACKENDS)
def test_fused_experts_with_sentinels(name, device, dtype, act, gemm_kernel, monkeypatch):
    """The fused stage drops ids outside [0, E) (expert-parallel sentinels) and matches the
    reference expert stage; weights of dropped slots are NaN-poisoned (never read)."""
    _choose(gemm_kernel, monkeypatch)
    T, H, I, E, k = 23, 40, 24, 6, 3
    s = seed_for("cuda_fused", act, str(dtype))
    x = make_x(T, H, seed=s, dtype=dtype, device=device)
    ids = make_ids(T, k, E, seed=s + 1, mode="uniform", invalid=0.2, device=device)
    w = make_x(T, k, seed=s + 2, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32).abs()
    w[(ids < 0) | (ids >= E)] = float("nan")
    w1 = make_x(E * 2 * I, H, seed=s + 3, dtype=dtype, device=device, scale=H ** -0.5).reshape(E, 2 * I, H)
    w2 = make_x(E * H, I, seed=s + 4, dtype=dtype, device=device, scale=I ** -0.5).reshape(E, H, I)
    op = getattr(torch.ops, "moe_ops_sim" if name == "cuda_sim" else "moe_ops").fused_experts
    got = op(x, ids, w, w1, w2, act)
    kw = dict(activation=act, allow_invalid_ids=True, backend="reference")
    lowp = moe_ops.ops.experts_forward(x, w, ids, w1, w2, **kw)
    hi = moe_ops.ops.experts_forward(x.double(), w.double(), ids, w1.double(), w2.double(), **kw)
    assert_close_to_reference(got, lowp, hi, name=f"{name} fused_experts")
    assert_bitwise_equal(got, op(x, ids, w, w1, w2, act), "determinism")


@pytest.mark.parametrize("name,device", BACKENDS)
def test_fused_experts_empty_and_errors(name, device):
    op = getattr(torch.ops, "moe_ops_sim" if name == "cuda_sim" else "moe_ops").fused_experts
    x = make_x(0, 16, seed=1, device=device)
    w1 = make_x(4 * 16, 16, seed=2, device=device).reshape(4, 16, 16)
    w2 = make_x(4 * 16, 8, seed=3, device=device).reshape(4, 16, 8)
    ids = torch.zeros(0, 2, dtype=torch.int32, device=device)
    assert op(x, ids, None, w1, w2, "swiglu").shape == (0, 16)
    x1 = make_x(3, 16, seed=4, device=device)
    ids1 = torch.zeros(3, 2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="activation"):
        op(x1, ids1, None, w1, w2, "relu")
    with pytest.raises(RuntimeError, match="w_down"):
        op(x1, ids1, None, w1, w2.transpose(1, 2).contiguous(), "swiglu")
    with pytest.raises(RuntimeError, match="dtype"):
        op(x1, ids1, None, w1.double(), w2, "swiglu")
    poison(x1)  # NaN input rows flow through as NaN, never as an error
    assert torch.isnan(op(x1, ids1, None, w1, w2, "swiglu")).all()
