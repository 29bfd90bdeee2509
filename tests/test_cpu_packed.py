"""The CPU backend's packed-weight path: ``moe_ops::pack_experts`` + ``moe_ops::fused_experts_packed``
(csrc/cpu/fused_moe_packed.cpp, the panel GEMM in csrc/cpu/gemm_panels.cpp), the public
``moe_ops.pack_experts`` / ``moe_forward(..., packed=)`` and ``MoE.pack_for_cpu()``.

* the packed layout, element by element (zero padding included);
* (the fused packed op against the reference pipeline, dropped ids and weights=None are in
  tests/test_cpu.py, parametrized over both fused ops and both packed layouts);
* opcheck, meta shapes, argument errors (thread-count independence: tests/test_cpu.py);
* the public API: stale packing refused, autograd falls back to the differentiable path, the
  layer re-packs after a weight update.
"""
from __future__ import annotations

import os

import pytest
import torch

import moe_ops
from tests.test_cpu import _layer_inputs
from tests.compare import assert_bitwise_equal, assert_close_to_reference
from tests.cpu_isa import avx512_emulation_built, rerun_with_emulated_avx512, vnni_kernel_runs

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.moe_ops, "fused_experts_packed"),
                                reason="moe_ops._C CPU kernels not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ops = torch.ops.moe_ops


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_layout(dtype):
    E, I, H = 3, 21, 35  # neither a multiple of 16: padded panels
    wgu = torch.randn(E, 2 * I, H).to(dtype)
    wd = torch.randn(E, H, I).to(dtype)
    pgu, pd = ops.pack_experts(wgu, wd)
    assert pgu.shape == (E, 2, 2, H, 16) and pd.shape == (E, 3, I, 16)
    assert pgu.dtype == dtype and pd.dtype == dtype
    # expected layouts built with torch: [E, P, 2, K, 16] / [E, P, K, 16]
    g = torch.zeros(E, 2, 32, H, dtype=dtype)
    g[:, 0, :I] = wgu[:, :I]
    g[:, 1, :I] = wgu[:, I:]
    exp_gu = g.reshape(E, 2, 2, 16, H).permute(0, 2, 1, 4, 3)
    d = torch.zeros(E, 48, I, dtype=dtype)
    d[:, :H] = wd
    exp_d = d.reshape(E, 3, 16, I).permute(0, 1, 3, 2)
    assert_bitwise_equal(pgu, exp_gu.contiguous())
    assert_bitwise_equal(pd, exp_d.contiguous())


VNNI_BUILT = vnni_kernel_runs()


def test_pack_layout_vnni():
    """bf16 'vnni' layout: blocks of 32 columns (w_gate_up: the 16 gate | 16 up columns of one
    panel; w_down: 32 columns of H, zero padded) as ceil(K/2) rows of 32 (k even, k odd) pairs,
    zero padded (odd H and I: the pair of the last k holds a zero). H = 35: a last w_down block
    with 3 columns and one all-zero panel."""
    E, I, H = 3, 21, 35
    wgu = torch.randn(E, 2 * I, H).bfloat16()
    wd = torch.randn(E, H, I).bfloat16()
    pgu, pd = ops.pack_experts(wgu, wd, "vnni")
    assert pgu.shape == (E, 2, 18, 2, 16, 2) and pd.shape == (E, 2, 11, 32, 2)
    p16gu, p16d = ops.pack_experts(wgu, wd, "panel16")  # [E, P, 2, K, 16] / [E, P, K, 16]

    def pairs(p, K):  # [..., K, 16] -> [..., ceil(K/2), 16, 2]
        p = torch.cat([p, torch.zeros_like(p[..., :1, :])], dim=-2) if K % 2 else p
        return p.unflatten(-2, (-1, 2)).transpose(-1, -2)
    # w_gate_up: [E, P, 2, K2, 16, 2] -> rows of (gate | up): [E, P, K2, 2, 16, 2]
    assert_bitwise_equal(pgu, pairs(p16gu, H).transpose(2, 3).contiguous())
    # w_down: panels 2b, 2b+1 (a zero panel past the last) interleaved row by row
    pd16 = pairs(p16d, I)  # [E, 3, 11, 16, 2]
    pd16 = torch.cat([pd16, torch.zeros_like(pd16[:, :1])], dim=1)
    assert_bitwise_equal(pd, pd16.unflatten(1, (2, 2)).transpose(2, 3).flatten(3, 4).contiguous())
    # the layout is in the rank: a panel16 tensor is not taken for a vnni one or vice versa
    assert p16gu.dim() == 5 and pgu.dim() == 6
    meta = ops.pack_experts(wgu.to("meta"), wd.to("meta"), "vnni")
    assert meta[0].shape == pgu.shape and meta[1].shape == pd.shape


def test_pack_auto_layout_follows_the_cpu():
    wgu, wd = torch.randn(2, 32, 16), torch.randn(2, 16, 16)
    has = bool(moe_ops.build_info().get("cpu", {}).get("avx512_bf16"))
    assert ops.pack_experts(wgu.bfloat16(), wd.bfloat16(), "auto")[0].dim() == (6 if has else 5)
    assert ops.pack_experts(wgu, wd, "auto")[0].dim() == 5  # vnni is bf16-only
    assert moe_ops.pack_experts(wgu.bfloat16(), wd.bfloat16()).layout == ("vnni" if has else "panel16")
    assert moe_ops.pack_experts(wgu.bfloat16(), wd.bfloat16(), layout="vnni").layout == "vnni"


def test_opcheck():
    x, ids, w, wgu, wd = _layer_inputs(9, 4, 2, 24, 20, torch.float32, 3)
    torch.library.opcheck(ops.pack_experts, (wgu, wd))
    pgu, pd = ops.pack_experts(wgu, wd)
    torch.library.opcheck(ops.fused_experts_packed, (x, ids, w, pgu, pd, "swiglu"))
    torch.library.opcheck(ops.fused_experts_packed, (x, ids, None, pgu, pd, "geglu"))


def test_meta_shapes():
    wgu = torch.empty(4, 2 * 40, 33, device="meta", dtype=torch.bfloat16)
    wd = torch.empty(4, 33, 40, device="meta", dtype=torch.bfloat16)
    pgu, pd = ops.pack_experts(wgu, wd)
    assert pgu.shape == (4, 3, 2, 33, 16) and pd.shape == (4, 3, 40, 16)
    x = torch.empty(5, 33, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(5, 2, device="meta", dtype=torch.int32)
    out = ops.fused_experts_packed(x, ids, None, pgu, pd, "swiglu")
    assert out.shape == (5, 33) and out.device.type == "meta"


@pytest.mark.skipif(not VNNI_BUILT, reason="no AVX512-BF16 and no SIMDe build")
def test_opcheck_vnni():
    x, ids, w, wgu, wd = _layer_inputs(9, 4, 2, 24, 19, torch.bfloat16, 3)
    torch.library.opcheck(ops.pack_experts, (wgu, wd, "vnni"))
    pgu, pd = ops.pack_experts(wgu, wd, "vnni")
    torch.library.opcheck(ops.fused_experts_packed, (x, ids, w, pgu, pd, "swiglu"))


def test_rejects_bad_input():
    x, ids, w, wgu, wd = _layer_inputs(4, 4, 2, 32, 16, torch.float32, 1)
    pgu, pd = ops.pack_experts(wgu, wd)
    with pytest.raises(RuntimeError, match="w_down"):
        ops.pack_experts(wgu, wd[:, :, :8])
    with pytest.raises(RuntimeError, match="w_gate_up_packed"):
        ops.fused_experts_packed(x, ids, w, pgu[:, :, :1], pd, "swiglu")
    with pytest.raises(RuntimeError, match="w_down_packed"):
        ops.fused_experts_packed(x, ids, w, pgu, wd, "swiglu")  # the unpacked weights
    with pytest.raises(RuntimeError, match="dtype"):
        ops.fused_experts_packed(x.bfloat16(), ids, w, pgu, pd, "swiglu")
    with pytest.raises(RuntimeError, match="activation"):
        ops.fused_experts_packed(x, ids, w, pgu, pd, "relu")
    with pytest.raises(RuntimeError, match="int32"):
        ops.fused_experts_packed(x, ids.long(), w, pgu, pd, "swiglu")
    with pytest.raises(ValueError, match="CPU"):
        moe_ops.pack_experts(wgu.to("meta"), wd.to("meta"))
    with pytest.raises(TypeError):
        moe_ops.pack_experts(wgu.double(), wd.double())
    # layouts: unknown names, vnni for non-bf16 weights, the two layouts mixed
    with pytest.raises(RuntimeError, match="layout"):
        ops.pack_experts(wgu, wd, "blocked")
    with pytest.raises(ValueError, match="layout"):
        moe_ops.pack_experts(wgu, wd, layout="blocked")
    with pytest.raises(RuntimeError, match="vnni"):
        ops.pack_experts(wgu, wd, "vnni")
    with pytest.raises(TypeError, match="vnni"):
        moe_ops.pack_experts(wgu, wd, layout="vnni")
    xb, wgub, wdb = x.bfloat16(), wgu.bfloat16(), wd.bfloat16()
    vgu, vd = ops.pack_experts(wgub, wdb, "vnni")
    pgub, pdb = ops.pack_experts(wgub, wdb, "panel16")
    with pytest.raises(RuntimeError, match="w_down_packed"):
        ops.fused_experts_packed(xb, ids, w, vgu, pdb, "swiglu")
    with pytest.raises(RuntimeError, match="w_down_packed"):
        ops.fused_experts_packed(xb, ids, w, pgub, vd, "swiglu")


# ------------------------------------------------------------------------- public API

def _layer_case(dtype=torch.bfloat16, T=24, E=8, k=2, H=64, I=48, seed=5):
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, dtype, seed)
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(seed))
    return x, logits, wgu, wd


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moe_forward_packed_matches_reference(dtype):
    x, logits, wgu, wd = _layer_case(dtype)
    packed = moe_ops.pack_experts(wgu, wd)  # "auto": vnni for bf16 on AVX512-BF16 CPUs
    out = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    lowp = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="reference")
    hi = moe_ops.moe_forward(x.double(), logits.double(), wgu.double(), wd.double(), 2, backend="reference")
    assert_close_to_reference(out, lowp, hi, name="moe_forward(packed)")


@pytest.mark.skipif(not VNNI_BUILT, reason="no AVX512-BF16 and no SIMDe build")
def test_moe_forward_vnni_matches_reference():
    x, logits, wgu, wd = _layer_case(torch.bfloat16, H=70, I=45)  # odd I: a zero pair pad
    packed = moe_ops.pack_experts(wgu, wd, layout="vnni")
    out = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    lowp = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="reference")
    hi = moe_ops.moe_forward(x.double(), logits.double(), wgu.double(), wd.double(), 2, backend="reference")
    assert_close_to_reference(out, lowp, hi, name="moe_forward(packed vnni)")


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


STORED_VS_PACKED = [(1, 4, 2, 64, 48), (40, 2, 2, 70, 45), (300, 1, 1, 130, 34), (513, 3, 3, 32, 16),
                    (37, 5, 2, 35, 21), (9, 6, 2, 35, 21), (24, 3, 1, 77, 50)]


def _avx512_kernels_on() -> bool:
    return bool(moe_ops.build_info().get("cpu", {}).get("avx512_kernels"))


@pytest.mark.skipif(not _avx512_kernels_on(), reason="AVX512-BF16 kernels off (see the emulated rerun)")
@pytest.mark.parametrize("T,E,k,H,I", STORED_VS_PACKED)
def test_stored_weights_match_packed_vnni_bitwise(T, E, k, H, I):
    """bf16 weights as stored run the packed op's kernels on each block repacked per tile
    (csrc/cpu/vnni_experts.h): the same bits as pack_experts(layout='vnni') + the packed op --
    row counts below, across and above the kernel's row blocks (12) and the tiles' row chunks
    (256), odd H and I (zero pair pads), a last w_down block of <= 16 columns (H = 35, 70) and
    experts with no rows (E = 5, T*k = 74: some empty at this seed)."""
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, torch.bfloat16, seed=T + H)
    pgu, pd = ops.pack_experts(wgu, wd, "vnni")
    packed = ops.fused_experts_packed(x, ids, w, pgu, pd, "swiglu")
    stored = ops.fused_experts(x, ids, w, wgu, wd, "swiglu")
    assert_bitwise_equal(stored, packed, name="fused_experts (as stored) vs fused_experts_packed (vnni)")
    assert torch.isfinite(stored).all()
    geglu = ops.fused_experts(x, ids, None, wgu, wd, "geglu")
    assert_bitwise_equal(geglu, ops.fused_experts_packed(x, ids, None, pgu, pd, "geglu"), name="geglu")


@pytest.mark.skipif(not _avx512_kernels_on(), reason="AVX512-BF16 kernels off (see the emulated rerun)")
def test_stored_weights_updated_in_place_between_calls():
    """Tiles on the same block reuse a thread's repacked copy within one call (an expert with
    more rows than a tile's chunk of 256); a later call on weights changed in place (same
    storage, same shapes) must repack, never reuse: its result is the packed op's on the new
    weights. One expert with one block per GEMM (I = 16, H = 32) and 600 rows: every thread's
    last block of the first call is the first block of the second."""
    x, ids, w, wgu, wd = _layer_inputs(600, 1, 1, 32, 16, torch.bfloat16, seed=11)
    first = ops.fused_experts(x, ids, w, wgu, wd, "swiglu")
    with torch.no_grad():
        wgu.mul_(-0.5)
        wd[:, :, ::3] = 0.25
    again = ops.fused_experts(x, ids, w, wgu, wd, "swiglu")
    pgu, pd = ops.pack_experts(wgu, wd, "vnni")
    assert_bitwise_equal(again, ops.fused_experts_packed(x, ids, w, pgu, pd, "swiglu"), name="after in-place update")
    assert not torch.equal(again, first)


@pytest.mark.skipif(not avx512_emulation_built(), reason="no SIMDe build")
def test_stored_weights_match_packed_vnni_emulated():
    """The same on the SIMDe-emulated kernels (natively where the CPU has them), in a subprocess:
    CPUs without AVX512-BF16 (CI's Zen 3) run it too."""
    rerun_with_emulated_avx512(os.path.abspath(__file__), "stored_weights_match_packed_vnni_bitwise or in_place")


@pytest.mark.skipif(not moe_ops.build_info().get("cpu", {}).get("avx512_bf16"), reason="no native AVX512-BF16")
@pytest.mark.parametrize("T,E,k,H,I", STORED_VS_PACKED[:4])
def test_vnni_brgemm_and_panel_kernel_agree(T, E, k, H, I, monkeypatch):
    """With MOE_OPS_CPU_BRGEMM=1 the bf16 expert GEMMs run oneDNN's brgemm
    (csrc/cpu/onednn_brgemm.h: the default on AMX CPUs), with 0 moe_ops' panel kernel (the
    default without AMX). Without AMX both are one vdpbf16ps chain per output, pairs ascending:
    the same bits, packed and as stored. With AMX, the two are only close."""
    x, ids, w, wgu, wd = _layer_inputs(T, E, k, H, I, torch.bfloat16, seed=T + H)
    pgu, pd = ops.pack_experts(wgu, wd, "vnni")
    outs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MOE_OPS_CPU_BRGEMM", flag)
        outs[flag] = (ops.fused_experts_packed(x, ids, w, pgu, pd, "swiglu"),
                      ops.fused_experts(x, ids, w, wgu, wd, "swiglu"))
        on = moe_ops.build_info()["cpu"]["onednn_brgemm"]
        if flag == "1" and not on:
            pytest.skip("this torch has no bf16 brgemm ukernel")
        assert on == (flag == "1")
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN off: never brgemm
        monkeypatch.setenv("MOE_OPS_CPU_BRGEMM", "1")
        assert not moe_ops.build_info()["cpu"]["onednn_brgemm"]
    for a, b in zip(outs["1"], outs["0"]):
        if _cpu_has_amx():
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        else:
            assert_bitwise_equal(a, b, name="bf16 experts: brgemm vs panel kernel")
        assert torch.isfinite(a).all()


def test_moe_forward_refuses_stale_packing():
    x, logits, wgu, wd = _layer_case()
    packed = moe_ops.pack_experts(wgu, wd)
    with torch.no_grad():
        wd.mul_(2)
    with pytest.raises(ValueError, match="pack_experts"):
        moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    with pytest.raises(TypeError):
        moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=(wgu, wd))


def _mutations():
    """Ways a user changes weights in place, each invisible to version counters or not."""
    def data_mul(w):
        w.data.mul_(2)

    def inference_mode_add(w):
        with torch.inference_mode():
            w.add_(1)

    def no_grad_one_element(w):
        with torch.no_grad():
            w.view(-1)[-1] += 1

    def set_other_storage(w):
        with torch.no_grad():
            w.set_(w.clone().neg_())

    def numpy_write(w):
        w.detach().numpy().reshape(-1)[0] += 1  # float32 only: numpy has no bfloat16

    return [data_mul, inference_mode_add, no_grad_one_element, set_other_storage, numpy_write]


@pytest.mark.parametrize("which", ["w_gate_up", "w_down"])
@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("inference_weights", [False, True], ids=["normal", "inference_tensors"])
def test_stale_packing_is_never_used(mutate, which, inference_weights):
    x, logits, wgu, wd = _layer_case(torch.float32)
    if inference_weights:  # weights made under inference_mode have no version counter at all
        with torch.inference_mode():
            wgu, wd = wgu.clone(), wd.clone()
    packed = moe_ops.pack_experts(wgu, wd)
    assert packed.matches(wgu, wd)
    w = wgu if which == "w_gate_up" else wd
    if inference_weights and mutate.__name__ != "inference_mode_add":
        with torch.inference_mode():
            mutate(w)
    else:
        mutate(w)
    assert not packed.matches(wgu, wd)
    with pytest.raises(ValueError, match="pack_experts"):
        moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packing_survives_reads_and_numpy_owned_weights(dtype):
    x, logits, wgu, wd = _layer_case(dtype)
    arr = None
    if dtype == torch.float32:  # memory owned by NumPy cannot be shared copy-on-write: the copy path
        arr = wgu.numpy().copy()
        wgu = torch.from_numpy(arr)
    packed = moe_ops.pack_experts(wgu, wd)
    wgu.data_ptr(), wd.data_ptr()  # mutable pointers: PyTorch breaks the sharing as for a write
    torch.bmm(x.expand(wd.shape[0], -1, -1), wgu.transpose(1, 2))
    assert packed.matches(wgu, wd)  # same bytes: still the packing, and shared again
    assert packed.matches(wgu, wd)
    out = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    lowp = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="reference")
    hi = moe_ops.moe_forward(x.double(), logits.double(), wgu.double(), wd.double(), 2, backend="reference")
    assert_close_to_reference(out, lowp, hi, name="moe_forward(packed, after reads)")
    if arr is not None:  # a write torch never sees
        v = arr[-1, -1, -1].copy()
        arr[-1, -1, -1] = v + 1
        assert not packed.matches(wgu, wd)
        arr[-1, -1, -1] = v  # the very bytes packed again: the packing is valid again
        assert packed.matches(wgu, wd)
    with torch.no_grad():
        wd[0, 0, 0] = wd[0, 0, 0] * 2 + 1
    assert not packed.matches(wgu, wd)


def test_guard_survives_the_as_stored_path():
    """The CPU kernels read weights through const pointers: running the as-stored path on packed
    weights keeps the copy-on-write sharing (a mutable read would copy the weights on every call
    and make the next packed call compare them byte by byte)."""
    x, logits, wgu, wd = _layer_case(torch.bfloat16)
    packed = moe_ops.pack_experts(wgu, wd)
    with torch.no_grad():
        moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu")
        moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    assert torch._C._is_cow_tensor(wgu) and torch._C._is_cow_tensor(wd)


def test_moe_forward_packed_autograd_uses_the_differentiable_path():
    x, logits, wgu, wd = _layer_case(torch.float32)
    wgu.requires_grad_(True)
    packed = moe_ops.pack_experts(wgu, wd)
    out = moe_ops.moe_forward(x, logits, wgu, wd, 2, backend="cpu", packed=packed)
    out.sum().backward()
    ref = wgu.detach().clone().requires_grad_(True)
    moe_ops.moe_forward(x, logits, ref, wd, 2, backend="reference").sum().backward()
    torch.testing.assert_close(wgu.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_layer_pack_for_cpu_tracks_weight_updates():
    torch.manual_seed(0)
    layer = moe_ops.MoE(64, 48, 8, 2, backend="cpu").to(torch.bfloat16).eval()
    x = torch.randn(3, 5, 64).bfloat16()
    with torch.no_grad():
        plain = layer(x)
        layer.pack_for_cpu()
        packed = layer(x)
        first = layer._packed
        assert first is not None
        torch.testing.assert_close(packed.float(), plain.float(), rtol=2e-2, atol=2e-2)
        layer.w_down.mul_(-1)  # an update: the layer re-packs
        flipped = layer(x)
        assert layer._packed is not first
        torch.testing.assert_close(flipped.float(), (-plain).float(), rtol=2e-2, atol=2e-2)
        layer.w_gate_up.data.normal_()  # through .data: no version counter sees it
        changed = layer(x)
        layer.pack_for_cpu(False)
        torch.testing.assert_close(changed.float(), layer(x).float(), rtol=2e-2, atol=2e-2)
        assert layer._current_packing() is None
