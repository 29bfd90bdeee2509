"""The CPU benchmarks of issue 15 on tiny shapes, with and without kt-kernel installed.

kt-kernel is an optional peer (bench/kt_peer.py): every path runs twice, once as installed here
(skipped where it is not) and once with the package hidden (``no_kt``), where the ``kt_kernel``
baseline must become a note or ``skip`` rows, never an error. No timing is judged.
"""
import csv
import os

import pytest
import torch

import moe_ops
from bench import decode, kt_peer
from tests.poison import poison

pytest.importorskip("transformers")

from bench import run as bench_run  # noqa: E402


@pytest.fixture(params=["installed", "absent"])
def kt(request, monkeypatch):
    """``"installed"`` (skipped when kt-kernel is not) or ``"absent"`` (the package hidden)."""
    if request.param == "absent":
        monkeypatch.setattr(kt_peer, "_EXT", None)
        monkeypatch.setattr(kt_peer, "_ERROR", "")
        monkeypatch.setattr(kt_peer, "_find", lambda: None)
    elif not kt_peer.available():
        pytest.skip(f"kt-kernel: {kt_peer.load()[1]}")
    return request.param


def _rows(out_dir):
    with open(os.path.join(out_dir, "results.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _layer(E, H, I, T, k, seed):  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).bfloat16()
    wgu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).bfloat16()
    wd = (torch.randn(E, H, I, generator=g) * I ** -0.5).bfloat16()
    logits = torch.randn(T, E, generator=g)
    return x, wgu, wd, logits


@pytest.mark.parametrize("E,H,I,k,T", [(8, 64, 128, 2, 5), (16, 96, 64, 4, 1), (4, 128, 96, 4, 16)])
def test_kt_peer_matches_reference(E, H, I, k, T):  # noqa: E741
    if not kt_peer.available():
        pytest.skip(f"kt-kernel: {kt_peer.load()[1]}")
    x, wgu, wd, logits = _layer(E, H, I, T, k, seed=E + H + T)
    w, ids = moe_ops.topk_gating(logits, k, renormalize=True)
    ex = kt_peer.KTExperts(wgu, wd, k, max_tokens=T, threads=2)
    poison(ex._out)  # its output buffer: every row must be written
    out = ex(x, ids, w).float()
    ref = moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True, backend="reference").float()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    with pytest.raises(ValueError, match="max_tokens"):
        ex(torch.randn(T + 1, H).bfloat16(), ids.repeat(2, 1)[:T + 1], w.repeat(2, 1)[:T + 1])


def test_kt_peer_shared_reuses_only_equal_weights():
    if not kt_peer.available():
        pytest.skip(f"kt-kernel: {kt_peer.load()[1]}")
    x, wgu, wd, logits = _layer(8, 64, 128, 4, 2, seed=1)
    a = kt_peer.shared(wgu, wd, 2, max_tokens=4)
    assert kt_peer.shared(wgu.clone(), wd.clone(), 2, max_tokens=4) is a  # same values: kt-kernel's copy reused
    assert kt_peer.shared(wgu, wd, 2, max_tokens=8) is not a              # more tokens than its buffers
    b = kt_peer.shared(wgu, wd.neg(), 2, max_tokens=4)
    assert b is not a and b.max_tokens == 4
    w, ids = moe_ops.topk_gating(logits, 2)
    ref = moe_ops.moe_forward(x, logits, wgu, wd.neg(), 2, backend="reference").float()
    assert ((b(x, ids, w).float() - ref).norm() / ref.norm()).item() < 2e-2


def test_kt_peer_absent_says_why(monkeypatch):
    monkeypatch.setattr(kt_peer, "_EXT", None)
    monkeypatch.setattr(kt_peer, "_ERROR", "")
    monkeypatch.setattr(kt_peer, "_find", lambda: None)
    assert not kt_peer.available() and "pip install --no-deps kt-kernel" in kt_peer.load()[1]
    with pytest.raises(RuntimeError, match="kt-kernel not installed"):
        kt_peer.KTExperts(torch.zeros(2, 4, 4).bfloat16(), torch.zeros(2, 4, 2).bfloat16(), 1, 1)


def test_cpu_matrix_point_has_peers_dense_and_floor(tmp_path, kt):
    assert bench_run.main(["--preset", "cpu", "--models", "tiny", "--experts", "8", "--tokens", "1,16",
                           "--device", "cpu", "--dtype", "bf16", "--threads", "1", "--reps", "1", "--warmup", "1",
                           "--out-dir", str(tmp_path), "--quiet"]) == 0
    rows = _rows(tmp_path)
    assert {r["op"] for r in rows} == {"moe_forward", "permute", "unpermute"}
    layer = [r for r in rows if r["op"] == "moe_forward"]
    by_t = {}
    for r in layer:
        by_t.setdefault(r["T"], {})[r["backend"]] = r
    assert set(by_t) == {"1", "16"}
    for t, by in by_t.items():
        assert {"cpu", "cpu_packed", "hf_eager", "hf_grouped_mm", "dense", "weight_read", "floor"} <= set(by), t
        assert "reference" not in by  # the preset's own backend list
        assert ("kt_kernel" in by) == (kt == "installed")
        for name in ("cpu", "cpu_packed", "hf_grouped_mm", "kt_kernel"):
            if name in by:
                assert by[name]["status"] == "ok" and by[name]["check"] == "ok", by[name]
        if kt == "installed":
            assert float(by["cpu"]["speedup_vs_kt_kernel"]) > 0
    md = open(tmp_path / "latest.md").read()
    assert ("Note: baseline kt_kernel: kt-kernel not installed" in md) == (kt == "absent")


def test_cpu_decode_preset_rows(tmp_path, kt):
    assert bench_run.main(["--preset", "cpu_decode", "--models", "tiny", "--experts", "16", "--tokens", "1,4",
                           "--dtype", "bf16", "--threads", "1", "--reps", "2", "--out-dir", str(tmp_path),
                           "--quiet"]) == 0
    rows = _rows(tmp_path)
    assert {r["op"] for r in rows} == {decode.OP}
    for t in ("1", "4"):
        by = {r["backend"]: r for r in rows if r["T"] == t}
        assert set(by) == {"cpu", "cpu_packed", "kt_kernel", "weight_read", "stream_read", "floor"}
        for name in ("cpu", "cpu_packed") + (("kt_kernel",) if kt == "installed" else ()):
            r = by[name]
            assert r["status"] == "ok" and r["check"] == "ok", r
            assert float(r["gbps"]) > 0 and int(r["bytes"]) > 0 and "% of stream read" in r["note"]
            assert float(r["speedup_vs_floor"]) > 0
        if kt == "absent":
            assert by["kt_kernel"]["status"].startswith("skip: kt-kernel not installed")
        # touched experts: T*k ids at most, and E * the tiny shape's bytes per expert at most
        assert int(by["cpu"]["bytes"]) <= min(int(t) * 2, 16) * 3 * 64 * 128 * 2
        assert "not cold" in by["cpu"]["note"]  # the tiny layer fits in any LLC: said so
    md = open(tmp_path / "latest.md").read()
    assert "% of stream read" in md and "| 4 | cpu_packed |" in md


def test_cold_routing_never_repeats_recent_experts():
    r = decode.ColdRouting(E=64, expert_bytes=10, llc=30, seed=0)  # masks the last >= 60 bytes = 6 experts
    prev = []
    for _ in range(50):
        got = set(torch.topk(r.next(2, 2), 2, dim=-1).indices.reshape(-1).tolist())
        seen, masked = 0, set()  # the calls before this one, back to 60 bytes of experts
        for s in reversed(prev):
            if seen >= 60:
                break
            masked |= s
            seen += len(s) * 10
        assert not got & masked, (got, masked)
        prev.append(got)
    assert not r.partly_warm
    small = decode.ColdRouting(E=4, expert_bytes=10, llc=1000, seed=0)
    for _ in range(5):
        small.next(1, 2)
    assert small.partly_warm  # half the experts must stay eligible: the cap is reported


def test_cpu_layer_script_with_kt_and_decode(capsys, kt):
    from bench import cpu_layer
    cpu_layer.main(["--E", "8", "--T", "4", "--H", "64", "--I", "128", "--k", "2", "--reps", "1", "--threads", "1",
                    "--impls", "cpu,cpu_packed,kt_kernel,kt_kernel_experts,dense,dense_fp32,weight_read"])
    out = capsys.readouterr().out
    assert "floor" in out and "\ndense " in out
    if kt == "installed":
        assert "\nkt_kernel " in out and "kt_kernel / cpu" in out
    else:
        assert "kt_kernel skipped: kt-kernel not installed" in out
    rows = cpu_layer.main(["--decode", "--E", "16", "--H", "64", "--I", "128", "--k", "2", "--reps", "1",
                           "--threads", "1", "--decode-tokens", "1,2"])
    assert {r["T"] for r in rows} == {1, 2}
    ok = {(r["T"], r["impl"]) for r in rows if r["status"] == "ok"}
    assert (1, "cpu") in ok and (2, "cpu_packed") in ok and ((1, "kt_kernel") in ok) == (kt == "installed")
    assert "% of stream read" in capsys.readouterr().out


def test_plot_vs_floor(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plot
    bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet", "--threads", "1",
                    "--ops", "moe_forward", "--tokens", "2,8", "--baselines", "dense,weight_read,floor"])
    assert plot.main(["--csv", str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "plots"),
                      "--vs-floor"]) == 0
    pngs = os.listdir(tmp_path / "plots")
    assert pngs == [p for p in pngs if p.startswith("moe_forward__tiny__E8_k2") and p.endswith("__vs_floor.png")]
    assert len(pngs) == 1 and (tmp_path / "plots" / pngs[0]).stat().st_size > 1000


def test_decode_quantized_impls_rows():
    """The quantized decode rows run, check against their own dequantized reference, and count
    the quantized bytes (fewer than the bf16 row's)."""
    rows = decode.run(E=4, H=64, I=32, k=2, tokens=[2], impls=("cpu", "cpu_int8", "cpu_fp8", "cpu_mxfp4"), reps=2)
    by = {r["impl"]: r for r in rows}
    for n in ("cpu_int8", "cpu_fp8", "cpu_mxfp4"):
        assert by[n]["status"] == "ok" and by[n]["check"] == "ok", by[n]
    assert by["cpu_mxfp4"]["bytes"] < by["cpu_int8"]["bytes"] < by["cpu"]["bytes"]
