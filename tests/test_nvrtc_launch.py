"""The launch side of the NVRTC path, everything a CPU can check: the Python binding's argument
errors are the C++ binding's (ops_binding.h, run here through the emulator's instantiation), the
launch plans (kernel, grid, block, smem, workspace, arguments) follow csrc/cuda/*.cu, every
launched instantiation is in the manifest with packable arguments, and the choice of where the
CUDA kernels come from. The launches themselves need a GPU: tests/test_nvrtc_gpu.py."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

from moe_ops import backend
from moe_ops.nvrtc import abi, driver, launchers, manifest, ops, select
from tests.nvrtc_support import require_nvrtc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def rec(monkeypatch):
    """The NVRTC binding on CPU tensors, launching into a recorder."""
    r = driver.Recorder()
    monkeypatch.setattr(ops, "device_type", "cpu")
    monkeypatch.setattr(ops, "launcher_for", lambda t: r)
    return r


def _i32(*shape, hi=8):
    return torch.randint(0, hi, shape, dtype=torch.int32)


# ------------------------------------------------------------------ argument errors = the C++ binding's

BAD_CALLS = {
    "logits int": ("topk_gating", lambda: (torch.ones(4, 8, dtype=torch.int32), 2, "softmax", True, 0, 0, None, 1.0)),
    "logits f64": ("topk_gating", lambda: (torch.randn(4, 8, dtype=torch.float64), 2, "softmax", True, 0, 0, None, 1.0)),
    "logits 1-D": ("topk_gating", lambda: (torch.randn(8), 2, "softmax", True, 0, 0, None, 1.0)),
    "k 0": ("topk_gating", lambda: (torch.randn(4, 8), 0, "softmax", True, 0, 0, None, 1.0)),
    "k > E": ("topk_gating", lambda: (torch.randn(4, 8), 9, "softmax", True, 0, 0, None, 1.0)),
    "scoring": ("topk_gating", lambda: (torch.randn(4, 8), 2, "tanh", True, 0, 0, None, 1.0)),
    "n_group < 0": ("topk_gating", lambda: (torch.randn(4, 8), 2, "sigmoid", True, -1, 0, None, 1.0)),
    "E % n_group": ("topk_gating", lambda: (torch.randn(4, 9), 2, "sigmoid", True, 2, 1, None, 1.0)),
    "topk_group": ("topk_gating", lambda: (torch.randn(4, 8), 2, "sigmoid", True, 2, 3, None, 1.0)),
    "group smem": ("topk_gating", lambda: (torch.randn(1, 16384), 2, "sigmoid", True, 2, 1, None, 1.0)),
    "E too big": ("topk_gating", lambda: (torch.randn(1, 16385), 2, "sigmoid", True, 0, 0, None, 1.0)),
    "bias shape": ("topk_gating", lambda: (torch.randn(4, 8), 2, "sigmoid", True, 0, 0, torch.randn(7), 1.0)),
    "ids int64": ("permute", lambda: (torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64), 4, 1)),
    "ids 1-D": ("permute", lambda: (torch.randn(4, 8), _i32(4), 4, 1)),
    "ids rows": ("permute", lambda: (torch.randn(4, 8), _i32(5, 2), 4, 1)),
    "E 0": ("permute", lambda: (torch.randn(4, 8), _i32(4, 2), 0, 1)),
    "block_m 0": ("permute", lambda: (torch.randn(4, 8), _i32(4, 2), 4, 0)),
    "x 1-D": ("permute", lambda: (torch.randn(8), _i32(4, 2), 4, 1)),
    "x int": ("permute", lambda: (torch.ones(4, 8, dtype=torch.int16), _i32(4, 2), 4, 1)),
    "slot_rows i64": ("unpermute", lambda: (torch.randn(8, 4), torch.zeros(8, dtype=torch.int64), None, 2)),
    "unpermute k 0": ("unpermute", lambda: (torch.randn(8, 4), _i32(8), None, 0)),
    "unpermute k 33": ("unpermute", lambda: (torch.randn(66, 4), _i32(66), None, 33)),
    "numel % k": ("unpermute", lambda: (torch.randn(8, 4), _i32(7), None, 2)),
    "weights shape": ("unpermute", lambda: (torch.randn(8, 4), _i32(8), torch.randn(4, 3), 2)),
    "y 1-D": ("unpermute", lambda: (torch.randn(8), _i32(8), None, 2)),
    "C < 0": ("capacity_dispatch", lambda: (torch.randn(4, 8), _i32(4, 2), 4, -1, "kmajor")),
    "priority": ("capacity_dispatch", lambda: (torch.randn(4, 8), _i32(4, 2), 4, 2, "random")),
    "buf 2-D": ("capacity_combine", lambda: (torch.randn(4, 8), _i32(4, 2), _i32(4, 2), None)),
    "slot_pos shape": ("capacity_combine", lambda: (torch.randn(4, 2, 8), _i32(4, 2), _i32(4, 3), None)),
    "k > 1024": ("capacity_combine", lambda: (torch.randn(4, 2, 8), _i32(1, 1025), _i32(1, 1025), None)),
    "combine weights": ("capacity_combine", lambda: (torch.randn(4, 2, 8), _i32(4, 2), _i32(4, 2), torch.randn(4))),
    "gemm a 1-D": ("grouped_gemm", lambda: (torch.randn(8), torch.randn(2, 8, 4), _i32(3), False)),
    "gemm K": ("grouped_gemm", lambda: (torch.randn(6, 8), torch.randn(2, 7, 4), _i32(3), False)),
    "gemm K trans": ("grouped_gemm", lambda: (torch.randn(6, 8), torch.randn(2, 8, 4), _i32(3), True)),
    "gemm dtypes": ("grouped_gemm", lambda: (torch.randn(6, 8), torch.randn(2, 8, 4).double(), _i32(3), False)),
    "gemm offs i64": ("grouped_gemm", lambda: (torch.randn(6, 8), torch.randn(2, 8, 4), torch.zeros(3).long(), False)),
    "gemm offs E+1": ("grouped_gemm", lambda: (torch.randn(6, 8), torch.randn(2, 8, 4), _i32(4), False)),
    "gemm int": ("grouped_gemm", lambda: (torch.ones(6, 8, dtype=torch.int32), torch.ones(2, 8, 4, dtype=torch.int32),
                                          _i32(3), False)),
    "wgrad rows": ("grouped_gemm_wgrad", lambda: (torch.randn(6, 8), torch.randn(5, 4), _i32(3), 2)),
    "wgrad E < 0": ("grouped_gemm_wgrad", lambda: (torch.randn(6, 8), torch.randn(6, 4), _i32(3), -1)),
    "wgrad offs": ("grouped_gemm_wgrad", lambda: (torch.randn(6, 8), torch.randn(6, 4), _i32(2), 2)),
    "fused k 33": ("fused_experts", lambda: (torch.randn(2, 8), _i32(2, 33), None, torch.randn(4, 6, 8),
                                             torch.randn(4, 8, 3), "swiglu")),
    "fused dtypes": ("fused_experts", lambda: (torch.randn(2, 8), _i32(2, 2), None, torch.randn(4, 6, 8).double(),
                                               torch.randn(4, 8, 3), "swiglu")),
    "fused w_gate_up": ("fused_experts", lambda: (torch.randn(2, 8), _i32(2, 2), None, torch.randn(4, 5, 8),
                                                  torch.randn(4, 8, 3), "swiglu")),
    "fused w_down": ("fused_experts", lambda: (torch.randn(2, 8), _i32(2, 2), None, torch.randn(4, 6, 8),
                                               torch.randn(4, 8, 4), "swiglu")),
    "fused act": ("fused_experts", lambda: (torch.randn(2, 8), _i32(2, 2), None, torch.randn(4, 6, 8),
                                            torch.randn(4, 8, 3), "relu")),
    "fused ids rows": ("fused_experts", lambda: (torch.randn(2, 8), _i32(3, 2), None, torch.randn(4, 6, 8),
                                                 torch.randn(4, 8, 3), "geglu")),
}


def _norm(msg: str) -> str:
    return msg.splitlines()[0].replace(ops.NAME, "<backend>").replace("cuda_sim", "<backend>")


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_argument_errors_are_the_cpp_bindings(rec, case):
    if backend._load("cuda_sim") is None:
        pytest.skip(f"the emulator build (the C++ binding on CPU) is not available: {backend.load_errors()}")
    op, make = BAD_CALLS[case]
    args = make()
    with pytest.raises(RuntimeError) as cpp:
        getattr(torch.ops.moe_ops_sim, op)(*args)
    with pytest.raises(RuntimeError) as py:
        ops.IMPLS[op](*args)
    assert _norm(str(py.value)) == _norm(str(cpp.value))
    assert rec.calls == []  # nothing launched


def test_wrong_device_is_refused_before_any_launch(monkeypatch):
    r = driver.Recorder()
    monkeypatch.setattr(ops, "launcher_for", lambda t: r)  # device_type stays "cuda"
    with pytest.raises(RuntimeError, match=r"x must be on CUDA, got cpu"):
        ops.permute(torch.randn(4, 8), _i32(4, 2), 4, 1)
    assert r.calls == []


# ------------------------------------------------------------------------- launch plans (csrc/cuda/*.cu)


@pytest.mark.parametrize("E,kernel,block,grid", [
    (8, "topk_gating_warp_kernel<__nv_bfloat16, 8>", 128, 3),
    (256, "topk_gating_warp_kernel<__nv_bfloat16, 8>", 128, 3),
    (257, "topk_gating_warp_kernel<__nv_bfloat16, 16>", 128, 3),
    (512, "topk_gating_warp_kernel<__nv_bfloat16, 16>", 128, 3),
    (513, "topk_gating_block_kernel<__nv_bfloat16, 16>", 64, 10),
    (1000, "topk_gating_block_kernel<__nv_bfloat16, 16>", 64, 10),
    (16384, "topk_gating_block_kernel<__nv_bfloat16, 16>", 1024, 10),
])
def test_topk_gating_plan(rec, E, kernel, block, grid):
    logits = torch.randn(10, E, dtype=torch.bfloat16)
    bias = torch.randn(E)
    w, ids = ops.topk_gating(logits, 2, "sigmoid", True, 0, 0, bias, 2.5)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (10, 2)
    ((name, g, b, smem, (p,)),) = rec.calls
    assert (name, g, b, smem) == (kernel, (grid, 1, 1), (block, 1, 1), 0)
    assert (p.logits, p.weights, p.ids) == (logits.data_ptr(), w.data_ptr(), ids.data_ptr())
    assert p.bias == bias.data_ptr()  # float32 and contiguous already: passed as is
    assert (p.T, p.E, p.k, p.scoring, p.renormalize, p.n_group, p.topk_group) == (10, E, 2, 1, 1, 0, 0)
    assert p.scaling == pytest.approx(2.5)


def test_topk_gating_grouped_smem_and_empty(rec):
    ops.topk_gating(torch.randn(5, 256), 8, "sigmoid", True, 8, 4, None, 1.0)
    gsm = (256 * 4 + 8 * 5 + 15) // 16 * 16
    assert rec.calls[0][3] == gsm * 4 and rec.calls[0][4][0].bias is None
    ops.topk_gating(torch.randn(3, 4096), 8, "softmax", False, 8, 4, None, 1.0)
    assert rec.calls[1][3] == (4096 * 4 + 40 + 15) // 16 * 16  # block path: one team per block
    n = len(rec.calls)
    w, ids = ops.topk_gating(torch.randn(0, 64), 4, "softmax", True, 0, 0, None, 1.0)
    assert len(rec.calls) == n and w.shape == (0, 4)


def test_rank_plan():
    assert launchers.make_rank_plan(1000, 8) == (256, 4, 3)
    assert launchers.make_rank_plan(0, 1) == (256, 0, 0)
    # counts[nchunks, E] capped at 1M cells: 4096 experts -> at most 256 chunks
    assert launchers.make_rank_plan(1 << 21, 4096) == (8192, 256, 12)
    assert launchers.make_rank_plan(1 << 20, 1 << 21) == (1 << 20, 1, 21)


def test_permute_plan(rec):
    T, k, E, H, bm = 300, 2, 8, 64, 16
    x, ids = torch.randn(T, H), _i32(T, k)
    xs, ss, offs, sr = ops.permute(x, ids, E, bm)
    N, P = T * k, T * k + E * (bm - 1)
    assert xs.shape == (P, H) and ss.shape == (P,) and offs.shape == (E + 1,) and sr.shape == (N,)
    assert rec.kernels() == ["rank_count_kernel", "rank_scan_kernel", "fill_i32_kernel", "permute_place_kernel",
                             "gather_rows_kernel<uint4>"]
    count, scan, fill, place, gather = rec.calls
    assert count[1:4] == ((1, 1, 1), (128, 1, 1), 0)  # ceil(3 chunks / 4 warps)
    seq, n, e, ebits, chunk, nchunks, counts, local_rank = count[4]
    assert (seq.ids, seq.T, seq.k, seq.kmajor, n, e, ebits, chunk, nchunks) == (ids.data_ptr(), T, k, 0, N, E, 3, 256, 3)
    assert local_rank - counts == launchers.align_up(3 * E * 4, 256)
    assert scan[1:4] == ((1, 1, 1), (256, 1, 1), 0)
    assert scan[4] == (counts, 3, E, bm, local_rank + launchers.align_up(N * 4, 256), 0, 0, offs.data_ptr())
    assert fill[1] == (launchers.cdiv(P, 256), 1, 1) and fill[4] == (ss.data_ptr(), P, -1)
    assert place[1] == (3, 1, 1) and place[4][-2:] == (sr.data_ptr(), ss.data_ptr())
    assert gather[1:3] == ((launchers.cdiv(P, 8), 1, 1), (256, 1, 1))
    assert gather[4] == (x.data_ptr(), xs.data_ptr(), P, H * 4, ss.data_ptr(), k)


@pytest.mark.parametrize("H,dtype,word", [(64, torch.float32, "uint4"), (6, torch.float32, "uint2"),
                                          (3, torch.float32, "unsigned int"), (3, torch.float16, "unsigned short"),
                                          (3, torch.uint8, None)])
def test_gather_word(rec, H, dtype, word):
    if word is None:  # odd byte rows: the launcher picks 1-byte words (the binding refuses uint8 data)
        launchers.gather_rows(rec, 1 << 20, 2 << 20, 4, 3, 4096, 1)
        assert rec.kernels() == ["gather_rows_kernel<unsigned char>"]
        return
    ops.capacity_dispatch(torch.randn(5, H).to(dtype), _i32(5, 2, hi=4), 4, 3, "token_major")
    assert rec.kernels()[-1] == f"gather_rows_kernel<{word}>"


def test_capacity_plan(rec):
    T, k, E, C, H = 50, 3, 4, 20, 32
    x, ids = torch.randn(T, H, dtype=torch.float16), _i32(T, k, hi=E)
    buf, pos, demand, kept = ops.capacity_dispatch(x, ids, E, C, "kmajor")
    assert buf.shape == (E, C, H) and pos.shape == (T, k) and demand.shape == kept.shape == (E,)
    assert rec.kernels() == ["rank_count_kernel", "rank_scan_kernel", "fill_i32_kernel", "capacity_place_kernel",
                             "gather_rows_kernel<uint4>"]
    scan = rec.calls[1][4]
    assert scan[4:] == (demand.data_ptr(), kept.data_ptr(), C, 0)
    place = rec.calls[3][4]
    assert place[0].kmajor == 1 and place[1:5] == (T * k, E, C, 256)
    src_slot = rec.calls[2][4][0]
    assert rec.calls[2][4][1] == E * C and place[-1] == src_slot == rec.calls[4][4][4]
    ws_bytes = launchers.capacity_workspace_bytes(T, k, E, C)
    assert ws_bytes == launchers.rank_workspace_bytes(T * k, E) + launchers.align_up(E * C * 4, 256)


@pytest.mark.parametrize("H,dtype,vec", [(64, torch.float32, 4), (6, torch.float32, 1), (16, torch.bfloat16, 8),
                                         (12, torch.float16, 1), (4, torch.float64, 2)])
def test_combine_plan(rec, H, dtype, vec):
    T, k = 9, 2
    y, rows = torch.randn(T * k + 3, H).to(dtype), _i32(T * k, hi=T * k)
    w = torch.rand(T, k)
    out = ops.unpermute(y, rows, w, k)
    elem = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16",
            torch.float64: "double"}[dtype]
    ((name, grid, block, smem, args),) = rec.calls
    assert (name, grid, block, smem) == (f"combine_kernel<{elem}, {vec}>", (3, 1, 1), (128, 1, 1), 4 * k * 16)
    yp, h, src, wp, t, kk, op = args
    assert (yp, h, t, kk, op) == (y.data_ptr(), H, T, k, out.data_ptr())
    assert (src.slot_rows, src.ids, src.slot_pos, src.nrows) == (rows.data_ptr(), None, None, T * k + 3)
    assert wp is not None  # weights converted to the accumulator type (float64 for float64 data)


def test_capacity_combine_large_k_and_empty(rec):
    E, C, H = 4, 300, 8
    ops.capacity_combine(torch.randn(E, C, H), _i32(1, 1024, hi=E), _i32(1, 1024, hi=C), None)
    ((_, _, _, smem, args),) = rec.calls
    assert smem == 64 * 1024 and args[3] is None  # > 48 KiB: the driver raises the limit first
    assert (args[2].ids, args[2].E, args[2].C, args[2].nrows) != (None, 0, 0, 0)
    out = ops.capacity_combine(torch.randn(E, C, H), _i32(3, 0), _i32(3, 0), None)
    assert out.shape == (3, H) and not out.any() and len(rec.calls) == 1


def test_empty_permute_launches_only_what_has_work(rec):
    xs, ss, offs, sr = ops.permute(torch.randn(0, 8), _i32(0, 2), 4, 1)
    assert rec.kernels() == ["rank_scan_kernel"]  # offsets still written; the empty grids return at once
    assert xs.shape == (0, 8) and offs.shape == (5,)


def test_grouped_gemm_plans(rec):
    M, K, E, N = 300, 64, 8, 96
    a, b, offs = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(E, N, K, dtype=torch.bfloat16), _i32(E + 1)
    c = ops.grouped_gemm(a, b, offs, True)
    assert c.shape == (M, N) and c.dtype == torch.bfloat16
    assert rec.kernels() == ["gemm_schedule_kernel", "zero_outside_rows_kernel<__nv_bfloat16>",
                             "grouped_gemm_mma_kernel<__nv_bfloat16, false, false>"]  # tensor cores: n-major B
    sched, zero, gemm = rec.calls
    assert gemm[2:4] == ((128, 1, 1), launchers.mma_smem_bytes(False))
    assert sched[1:4] == ((1, 1, 1), (1024, 1, 1), 0) and sched[4][:4] == (offs.data_ptr(), E, M, 64)
    (p,) = gemm[4]
    assert (p.a, p.b, p.c, p.lda, p.ldc, p.b_expert, p.b_sk, p.b_sn) == (a.data_ptr(), b.data_ptr(), c.data_ptr(), K,
                                                                          N, K * N, 1, K)
    assert (p.offs, p.tiles) == sched[4][4:] and (p.E, p.M, p.N, p.K, p.act, p.a_rows) == (E, M, N, K, 0, None)
    assert gemm[1] == (3, 1, 1)  # the persistent grid without a device to ask: the emulator's cap
    rec.calls.clear()
    db = ops.grouped_gemm_wgrad(a, torch.randn(M, N, dtype=torch.bfloat16), offs, E)
    assert db.shape == (E, K, N)
    assert rec.kernels() == ["gemm_schedule_kernel", "grouped_gemm_wgrad_mma_kernel<__nv_bfloat16>"]
    rec.calls.clear()
    ops.grouped_gemm(a[:, :63], b[:, :, :63], offs, True)  # K % 8 != 0: CUDA cores
    assert rec.kernels()[-1] == "grouped_gemm_simt_kernel<__nv_bfloat16, false>"
    rec.calls.clear()
    assert ops.grouped_gemm(a[:0], b, offs, True).shape == (0, N) and rec.calls == []


def test_fused_experts_plan(rec):
    T, k, E, H, I = 20, 2, 4, 32, 16
    x, ids, w = torch.randn(T, H), _i32(T, k, hi=E), torch.rand(T, k)
    out = ops.fused_experts(x, ids, w, torch.randn(E, 2 * I, H), torch.randn(E, H, I), "geglu")
    assert out.shape == (T, H)
    assert rec.kernels() == ["rank_count_kernel", "rank_scan_kernel", "fill_i32_kernel", "permute_place_kernel",
                             "gemm_schedule_kernel", "grouped_gemm_simt_kernel<float, true>",
                             "grouped_gemm_simt_kernel<float, false>", "combine_kernel<float, 4>"]
    g1, g2 = rec.calls[5][4][0], rec.calls[6][4][0]
    assert (g1.a, g1.a_row_div, g1.act, g1.N, g1.K) == (x.data_ptr(), k, 2, I, H)
    assert g2.a == g1.c and g2.c_rows == g1.a_rows and g2.row_scale is not None and (g2.N, g2.K) == (H, I)
    assert rec.calls[7][4][2].slot_order


def test_every_launchable_instantiation_is_in_the_manifest(rec):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for E in (8, 300, 600):
            ops.topk_gating(torch.randn(2, E).to(dtype), 2, "softmax", True, 0, 0, None, 1.0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for H in (32, 7):
            x = torch.randn(6, H).to(dtype)
            ops.permute(x, _i32(6, 2, hi=4), 4, 1)
            ops.unpermute(x, _i32(6, hi=6), None, 1)
            ops.capacity_dispatch(x, _i32(6, 2, hi=4), 4, 2, "token_major")
            ops.capacity_combine(x.view(2, 3, H), _i32(6, 1, hi=2), _i32(6, 1, hi=3), None)
            for n in (5, 8):
                ops.grouped_gemm(x, torch.randn(2, H, n).to(dtype), torch.tensor([0, 2, 6], dtype=torch.int32), False)
                ops.grouped_gemm(x, torch.randn(2, n, H).to(dtype), torch.tensor([0, 2, 6], dtype=torch.int32), True)
            ops.grouped_gemm_wgrad(x, x, torch.tensor([0, 2, 6], dtype=torch.int32), 2)
            ops.fused_experts(x, _i32(6, 2, hi=4), None, torch.randn(4, 6, H).to(dtype), torch.randn(4, H, 3).to(dtype),
                              "swiglu")
    everything = {e for v in manifest.KERNELS.values() for e in v}
    launched = set(rec.kernels())
    assert launched <= everything
    assert everything - launched <= {f"gather_rows_kernel<{w}>" for w in ("unsigned short", "unsigned char")}


def test_pack_args():
    p = abi.GatingParams(T=3)
    values, ptrs = driver.pack_args("topk_gating_warp_kernel<float, 8>", (p,))
    assert ctypes.cast(ptrs[0], ctypes.POINTER(abi.GatingParams)).contents.T == 3
    values, ptrs = driver.pack_args("fill_i32_kernel", (0x1000, 1 << 40, -1))
    assert ctypes.c_longlong.from_address(ptrs[1]).value == 1 << 40
    assert ctypes.c_int.from_address(ptrs[2]).value == -1
    with pytest.raises(TypeError, match="takes 3 arguments"):
        driver.pack_args("fill_i32_kernel", (0, 1))
    with pytest.raises(ValueError, match="out of range"):
        driver.pack_args("fill_i32_kernel", (0, 1, 1 << 31))
    with pytest.raises(TypeError, match="must be RankSeq"):
        driver.pack_args("rank_count_kernel", (p, 1, 1, 1, 1, 1, 0, 0))
    with pytest.raises(KeyError, match="not in the NVRTC manifest"):
        driver.Recorder()("no_such_kernel", (1, 1, 1), (32, 1, 1), 0)


# --------------------------------------------------------------------- where the CUDA kernels come from

def _never():
    raise AssertionError("NVRTC availability asked although not needed")


def test_decide():
    d = select.decide
    assert d("auto", True, True, _never)["source"] == "nvcc"
    assert d("nvcc", True, True, _never)["source"] == "nvcc"
    r = d("nvcc", True, False, _never)
    assert r["source"] is None and "MOE_OPS_CUDA_KERNELS=nvcc" in r["reason"]
    r = d("auto", True, False, lambda: None)
    assert (r["source"], r["register_nvrtc"]) == ("nvrtc", True)
    r = d("auto", False, False, _never)
    assert r["source"] is None and "no GPU" in r["reason"] and not r["register_nvrtc"]
    r = d("auto", True, False, lambda: "CuPy is missing (pip install cupy-cuda13x)")
    assert r["source"] is None and "cupy-cuda13x" in r["reason"]
    r = d("nvrtc", True, True, lambda: None)
    assert (r["source"], r["register_nvrtc"]) == ("nvrtc", True) and "MOE_OPS_CUDA_KERNELS=nvrtc" in r["reason"]
    r = d("nvrtc", True, True, lambda: "no cupy")
    assert r["source"] == "nvcc" and "no cupy" in r["reason"] and not r["register_nvrtc"]
    r = d("nvrtc", False, False, _never)
    assert r["source"] is None and "no GPU" in r["reason"]
    r = d("bogus", True, True, _never)
    assert r["source"] == "nvcc" and "'bogus'" in r["reason"]


def _run(code: str, **env):
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([p for p in sys.path if "noeditable" in p] + [ROOT]), **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_registration_as_the_cuda_backend_when_chosen():
    # A process that believes it has a GPU and NVRTC: the NVRTC impls become moe_ops' CUDA kernels
    # and the cuda backend; nothing is compiled or launched (no CUDA tensor exists here).
    code = """
import torch
torch.cuda.is_available = lambda: True
from moe_ops.nvrtc import select, ops
select.nvrtc_unavailable_reason = lambda: None
import moe_ops
from moe_ops import backend
print(sorted(backend._load("cuda").ops))
print(moe_ops.build_info()["cuda_kernels"]["source"])
print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ops::{o}", "CUDA") for o in ops.IMPLS))
import sys; print("cupy" in sys.modules)
"""
    lines = _run(code, MOE_OPS_CUDA_KERNELS="auto").split("\n")
    if torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::permute", "CUDA"):
        pytest.skip("this extension has nvcc-built CUDA kernels: auto keeps them")
    assert lines[0] == str(sorted(set(ops.IMPLS) & set(backend.OP_NAMES)))
    assert lines[1:4] == ["nvrtc", "True", "False"]  # registering imports no CuPy


@pytest.mark.parametrize("mode,source,registered", [("nvrtc", "nvrtc", True), ("auto", "nvcc", False),
                                                     ("nvcc", "nvcc", False)])
def test_forcing_nvrtc_over_nvcc_kernels(mode, source, registered):
    # as if the extension had nvcc-built kernels: only MOE_OPS_CUDA_KERNELS=nvrtc replaces them
    code = """
import torch
torch.cuda.is_available = lambda: True
from moe_ops.nvrtc import select
select.nvrtc_unavailable_reason = lambda: None
select._nvcc_kernels = lambda names: True
import moe_ops
info = moe_ops.build_info()["cuda_kernels"]
print(info["source"], torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::unpermute", "CUDA"))
"""
    if torch._C._dispatch_has_kernel_for_dispatch_key("moe_ops::permute", "CUDA"):
        pytest.skip("this extension has real nvcc-built CUDA kernels")
    assert _run(code, MOE_OPS_CUDA_KERNELS=mode).split() == [source, str(registered)]


def test_a_plain_import_does_not_touch_cupy():
    out = _run("import sys, moe_ops; i = moe_ops.build_info(); print(i['cuda_kernels']['source'], "
               "any(m.split('.')[0] in ('cupy', 'cupy_backends') for m in sys.modules))")
    assert out.split()[-1] == "False"


def test_missing_cupy_is_a_clear_error():
    out = _run("import sys; sys.modules['cupy_backends'] = None\n"
               "from moe_ops.nvrtc import compile as c, select\n"
               "try:\n    c.nvrtc()\nexcept c.NVRTCUnavailable as e:\n    print('ERR', e)\n"
               "print(select.nvrtc_unavailable_reason())")
    assert "ERR" in out and "pip install cupy-cuda13x" in out


class _FakeDriver:
    """The slice of the CUDA driver driver.Launcher uses, recording instead of touching a GPU."""
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self):
        self.log, self.ctx = [], 0

    def ctxGetCurrent(self):
        return self.ctx

    def ctxGetDevice(self):
        return 0

    def setDevice(self, d):  # the runtime's cudaSetDevice: makes the primary context current
        self.log.append(("setDevice", d))
        self.ctx = 0xC0

    def moduleLoadData(self, image):
        self.log.append(("load", bytes(image[:4])))
        return 0x100 + len(self.log)

    def moduleGetFunction(self, mod, name):
        self.log.append(("get", mod, name))
        return 0x2000 + len(self.log)

    def funcSetAttribute(self, fn, attr, value):
        self.log.append(("attr", fn, attr, value))

    def launchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        p = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        self.log.append(("launch", fn, (gx, gy, gz), (bx, by, bz), smem, stream,
                         ctypes.c_longlong.from_address(p[1]).value, ctypes.c_int.from_address(p[2]).value))


def test_driver_launcher_loads_once_and_packs_the_parameters(monkeypatch, tmp_path):
    require_nvrtc()
    from moe_ops.nvrtc import cache
    monkeypatch.setenv("MOE_OPS_CACHE_DIR", str(tmp_path))
    fake = _FakeDriver()
    monkeypatch.setattr(driver, "_cuda", lambda: (fake, fake))
    monkeypatch.setattr(driver.Launcher, "_modules", {})
    monkeypatch.setattr(driver.Launcher, "_functions", {})
    monkeypatch.setattr(driver.Launcher, "_smem_set", {})
    launch = driver.Launcher(0, "80", 0xABC, 132, 8)
    launch("fill_i32_kernel", (7, 1, 1), (256, 1, 1), 0, 0x1000, 12345, -1)
    launch("rank_scan_kernel", (1, 1, 1), (256, 1, 1), 0, 0x1000, 3, 8, 1, 0x2000, 0, 0, 0x3000)
    launch("fill_i32_kernel", (0, 1, 1), (256, 1, 1), 0, 0x1000, 0, -1)  # empty grid: nothing happens
    kinds = [e[0] for e in fake.log]
    assert kinds == ["setDevice", "load", "get", "launch", "get", "launch"]  # one module for the unit
    unit = cache.get_unit("expert_rank.cuh", "80")
    assert fake.log[2][2] == unit.lowered["fill_i32_kernel"]
    assert fake.log[3][2:] == ((7, 1, 1), (256, 1, 1), 0, 0xABC, 12345, -1)
    big = launchers.combine_smem_bytes(1024)
    src = abi.CombineSource(nrows=4)
    for _ in range(2):
        launch("combine_kernel<float, 4>", (1, 1, 1), (128, 1, 1), big, 0x1000, 64, src, None, 1, 1024, 0x2000)
    attrs = [e for e in fake.log if e[0] == "attr"]
    assert len(attrs) == 1 and attrs[0][2:] == (8, big)  # raised once, above 48 KiB (as moe_ops::launch)
