"""The NVRTC-compiled kernels on a GPU (marked ``gpu``: ``make gpu-check`` runs them): every op of
the NVRTC binding against the reference on fresh inputs, with the allocator poisoned so an
unwritten output shows; bitwise equal to the nvcc-built kernels when the extension has them
(the same sources, so the same results); on a side stream; from an empty cache folder."""
import pytest
import torch

from moe_ops import reference as R
from moe_ops.nvrtc import cache, ops, select
from tests.compare import assert_bitwise_equal, assert_close_to_reference, assert_exact, assert_gating_equal, \
    reference_hi
from tests.inputs import make_ids, make_logits, make_x, seed_for
from tests.nvrtc_support import require_nvrtc

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    require_nvrtc()
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE_OPS_CACHE_DIR", str(tmp_path_factory.mktemp("moe_ops_cache")))
    cache.clear_memo()
    yield
    mp.undo()


def _poison():
    """Fill what the caching allocator hands out next with NaN (outputs come from torch.empty)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in (1 << 18, 1 << 22)]
    del blocks


def _nvcc(op):
    """The nvcc-built kernel of ``op`` when the extension has one and NVRTC did not replace it."""
    if select.info()["source"] != "nvcc":
        return None
    return getattr(torch.ops.moe_ops, op)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,grouped", [(8, False), (300, False), (1000, False), (256, True)])
def test_topk_gating(dtype, E, grouped):
    T, k = 77, 8
    logits = make_logits(T, E, seed=seed_for("nvrtc-gate", E, dtype), dtype=dtype, device="cuda", nan_rows=1)
    args = (k, "sigmoid", True, 8, 4, torch.randn(E, device="cuda") * 0.1, 2.5) if grouped else \
        (k, "softmax", False, 0, 0, None, 1.0)
    _poison()
    w, ids = ops.topk_gating(logits, *args)
    assert_gating_equal(w, ids, logits, *args)
    nvcc = _nvcc("topk_gating")
    if nvcc is not None:
        w2, ids2 = nvcc(logits, *args)
        assert_bitwise_equal(w, w2, "weights vs nvcc")
        assert_exact(ids, ids2, "ids vs nvcc")


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("H", [64, 7])
def test_permute_unpermute(dtype, H):
    T, k, E, bm = 300, 2, 8, 16
    x = make_x(T, H, seed=seed_for("nvrtc-perm", H, dtype), dtype=dtype, device="cuda")
    ids = make_ids(T, k, E, seed=seed_for("nvrtc-ids", H), device="cuda", invalid=0.05)
    _poison()
    out = ops.permute(x, ids, E, bm)
    for got, want, name in zip(out, R.permute(x, ids, E, bm), ("x_sorted", "sorted_slots", "offsets", "slot_rows")):
        assert_exact(got, want, name)
    w = torch.rand(T, k, device="cuda")
    y = make_x(out[0].shape[0], H, seed=seed_for("nvrtc-y", H), dtype=dtype, device="cuda")
    _poison()
    back = ops.unpermute(y, out[3], w, k)
    assert_close_to_reference(back, R.unpermute(y, out[3], w, k), reference_hi("unpermute", y, out[3], w, k))
    nvcc = _nvcc("permute")
    if nvcc is not None:
        for a, b in zip(out, nvcc(x, ids, E, bm)):
            assert_bitwise_equal(a, b, "permute vs nvcc")
        assert_bitwise_equal(back, _nvcc("unpermute")(y, out[3], w, k), "unpermute vs nvcc")


@pytest.mark.parametrize("priority", ["kmajor", "token_major"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_capacity(priority, dtype):
    T, k, E, C, H = 200, 2, 8, 40, 96
    x = make_x(T, H, seed=seed_for("nvrtc-cap", dtype), dtype=dtype, device="cuda")
    ids = make_ids(T, k, E, seed=seed_for("nvrtc-cap-ids"), device="cuda", mode="skew", invalid=0.05)
    _poison()
    out = ops.capacity_dispatch(x, ids, E, C, priority)
    for got, want, name in zip(out, R.capacity_dispatch(x, ids, E, C, priority), ("buf", "slot_pos", "demand", "kept")):
        assert_exact(got, want, name)
    w = torch.rand(T, k, device="cuda")
    buf = make_x(E * C, H, seed=seed_for("nvrtc-buf"), dtype=dtype, device="cuda").view(E, C, H)
    _poison()
    comb = ops.capacity_combine(buf, ids, out[1], w)
    assert_close_to_reference(comb, R.capacity_combine(buf, ids, out[1], w),
                              reference_hi("capacity_combine", buf, ids, out[1], w))


def test_wide_k_combine_needs_more_than_48k_smem():
    E, C, H, T, k = 4, 512, 32, 3, 1024
    buf = make_x(E * C, H, seed=seed_for("nvrtc-widek"), device="cuda").view(E, C, H)
    ids = torch.randint(0, E, (T, k), device="cuda", dtype=torch.int32)
    pos = torch.randint(-1, C, (T, k), device="cuda", dtype=torch.int32)
    out = ops.capacity_combine(buf, ids, pos, None)
    assert_close_to_reference(out, R.capacity_combine(buf, ids, pos, None),
                              reference_hi("capacity_combine", buf, ids, pos, None))


def test_side_stream_and_empty_inputs():
    x = make_x(50, 32, seed=seed_for("nvrtc-stream"), device="cuda")
    ids = make_ids(50, 2, 4, seed=seed_for("nvrtc-stream-ids"), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = ops.permute(x, ids, 4, 8)
    torch.cuda.current_stream().wait_stream(s)
    assert_exact(out[0], R.permute(x, ids, 4, 8)[0], "x_sorted on a side stream")
    empty = ops.permute(x[:0], ids[:0], 4, 8)
    assert_exact(empty[2], R.permute(x[:0], ids[:0], 4, 8)[2], "offsets of an empty input")
    w, i = ops.topk_gating(x[:0], 2, "softmax", True, 0, 0, None, 1.0)
    assert w.shape == (0, 2)
    assert any(p.name.endswith(".cubin") for p in __import__("pathlib").Path(cache.cache_dir()).iterdir())


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("gemm", [None, "simt"])  # bf16/fp16: tensor cores, or CUDA cores when forced
def test_grouped_gemm_and_wgrad(dtype, trans_b, gemm, monkeypatch):
    if gemm is not None:
        monkeypatch.setenv("MOE_OPS_CUDA_GEMM", gemm)
    E, K, N = 5, 48, 40
    offs = torch.tensor([3, 3, 70, 71, 140, 190], dtype=torch.int32, device="cuda")  # rows outside, empty experts
    M = 200
    a = make_x(M, K, seed=seed_for("nvrtc-gemm-a", dtype), dtype=dtype, device="cuda")
    b = make_x(E * K, N, seed=seed_for("nvrtc-gemm-b", dtype), dtype=dtype, device="cuda", scale=0.2)
    b = b.view(E, K, N).transpose(1, 2).contiguous() if trans_b else b.view(E, K, N)
    _poison()
    c = ops.grouped_gemm(a, b, offs, trans_b)
    assert_close_to_reference(c, R.grouped_gemm(a, b, offs, trans_b), reference_hi("grouped_gemm", a, b, offs, trans_b))
    dc = make_x(M, N, seed=seed_for("nvrtc-gemm-dc", dtype), dtype=dtype, device="cuda")
    _poison()
    db = ops.grouped_gemm_wgrad(a, dc, offs, E)
    assert_close_to_reference(db, R.grouped_gemm_wgrad(a, dc, offs, E),
                              reference_hi("grouped_gemm_wgrad", a, dc, offs, E))
    if _nvcc("grouped_gemm") is not None and torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::grouped_gemm",
                                                                                             "CUDA"):
        assert_bitwise_equal(c, _nvcc("grouped_gemm")(a, b, offs, trans_b), "grouped_gemm vs nvcc")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_fused_experts(dtype, activation):
    from tests.refop_lib import reference_fused_experts
    T, k, E, H, I = 64, 2, 8, 64, 32
    x = make_x(T, H, seed=seed_for("nvrtc-fused-x", dtype), dtype=dtype, device="cuda")
    ids = make_ids(T, k, E, seed=seed_for("nvrtc-fused-ids"), device="cuda", invalid=0.05)
    w = torch.rand(T, k, device="cuda")
    wgu = make_x(E * 2 * I, H, seed=seed_for("nvrtc-fused-wgu", dtype), dtype=dtype, device="cuda", scale=0.2)
    wd = make_x(E * H, I, seed=seed_for("nvrtc-fused-wd", dtype), dtype=dtype, device="cuda", scale=0.2)
    wgu, wd = wgu.view(E, 2 * I, H), wd.view(E, H, I)
    _poison()
    out = ops.fused_experts(x, ids, w, wgu, wd, activation)
    lowp = reference_fused_experts(x, ids, w, wgu, wd, activation)
    hi = reference_fused_experts(x.double(), ids, w.double(), wgu.double(), wd.double(), activation)
    assert_close_to_reference(out, lowp, hi)
    if _nvcc("grouped_gemm") is not None and hasattr(torch.ops.moe_ops, "fused_experts") and \
            torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::fused_experts", "CUDA"):
        assert_bitwise_equal(out, torch.ops.moe_ops.fused_experts(x, ids, w, wgu, wd, activation), "fused vs nvcc")
