"""What a hostile user tries, on every backend that runs here (issue: nothing silently wrong).

* Value checks off (``MOE_OPS_VALUE_CHECKS=0``, the default for CUDA tensors): indices past the
  end (``slot_rows >= P``, ``slot_pos >= C``, offsets outside ``[0, M]``) must never make a
  kernel read out of bounds or loop: out-of-range rows are dropped like -1, offsets are clamped
  into ``[0, M]`` and made non-decreasing (the CPU backend's reading of them). The answer is
  compared with the same call on sanitized indices, computed by the reference.
* H = 0 through every combine and the capacity layer.
* Several Python threads calling ops at once (the Triton interpreter patches module state).
"""
from __future__ import annotations

import threading

import pytest
import torch

import moe_ops
from moe_ops import reference as R

from tests.compare import assert_bitwise_equal


def _backends(op):
    return [b for b in moe_ops.available_backends(op, "cpu") if b != "reference"]


@pytest.fixture
def checks_off(monkeypatch):
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", "0")


def _sane(v, lo, hi):
    return torch.where((v >= lo) & (v < hi), v, torch.full_like(v, -1))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", _backends("unpermute"))
def test_unpermute_rows_past_the_end_are_dropped(backend, checks_off):
    g = torch.Generator().manual_seed(1)
    T, k, P, H = 9, 2, 12, 20
    y = torch.randn(P, H, generator=g)
    rows = torch.randint(0, P, (T * k,), generator=g, dtype=torch.int32)
    rows[[1, 4, 7, 11]] = torch.tensor([P, P + 1000, 2**31 - 1, -2**31], dtype=torch.int32)
    w = torch.rand(T, k, generator=g)
    got = moe_ops.unpermute(y, rows, w, backend=backend)
    want = R.unpermute(y, _sane(rows, -1, P), w, k)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", _backends("capacity_combine"))
def test_capacity_combine_positions_past_capacity_are_dropped(backend, checks_off):
    g = torch.Generator().manual_seed(2)
    E, C, T, k, H = 4, 3, 8, 2, 16
    buf = torch.randn(E, C, H, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    pos = torch.randint(0, C, (T, k), generator=g, dtype=torch.int32)
    pos[0, 1], pos[3, 0], pos[5, 1] = C, C + 7, 2**31 - 1  # the next expert's rows, or far away
    ids[6, 0] = E + 3
    w = torch.rand(T, k, generator=g)
    got = moe_ops.capacity_combine(buf, ids, pos, w, backend=backend)
    sane_pos = torch.where((pos < C) & (ids >= 0) & (ids < E), pos, torch.full_like(pos, -1))
    want = R.capacity_combine(buf, ids, sane_pos, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _clamped(offs, M):
    return torch.cummax(offs.long().clamp(0, M), 0).values.to(torch.int32)


BAD_OFFSETS = [[-5, 3, 2**30, 7], [0, 2**31 - 1, 2, 9], [9, 4, 0, -2**31], [0, 3, 5, 9]]


def _gemm_cases():
    return [pytest.param(op, b, id=f"{op}-{b}") for op in ("grouped_gemm", "grouped_gemm_wgrad") for b in _backends(op)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("offs", BAD_OFFSETS, ids=str)
@pytest.mark.parametrize("op,backend", _gemm_cases())
def test_gemm_offsets_outside_the_rows_are_clamped(op, backend, offs, checks_off):
    g = torch.Generator().manual_seed(3)
    M, K, N = 9, 8, 16
    a, b, dc = torch.randn(M, K, generator=g), torch.randn(3, K, N, generator=g), torch.randn(M, N, generator=g)
    o = torch.tensor(offs, dtype=torch.int32)
    if op == "grouped_gemm":
        got, want = moe_ops.grouped_gemm(a, b, o, backend=backend), R.grouped_gemm(a, b, _clamped(o, M), False)
    else:
        got, want = moe_ops.grouped_gemm_wgrad(a, dc, o, 3, backend=backend), R.grouped_gemm_wgrad(a, dc, _clamped(o, M), 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", moe_ops.available_backends(device="cpu"))
def test_zero_hidden_size(backend):
    T, k, E, C = 5, 2, 4, 3
    ids = torch.randint(0, E, (T, k), dtype=torch.int32)
    w = torch.rand(T, k)
    r = moe_ops.permute(torch.randn(T, 0), ids, E, backend=backend)
    assert r.x_sorted.shape == (T * k, 0)
    assert moe_ops.unpermute(r.x_sorted, r.slot_rows, w, backend=backend).shape == (T, 0)
    d = moe_ops.capacity_dispatch(torch.randn(T, 0), ids, E, C, backend=backend)
    assert d.buf.shape == (E, C, 0)
    assert moe_ops.capacity_combine(d.buf, ids, d.slot_pos, w, backend=backend).shape == (T, 0)
    wgu, wd = torch.randn(E, 6, 0), torch.randn(E, 0, 3)
    for cf in (None, 1.0):
        out = moe_ops.moe_forward(torch.randn(T, 0), torch.randn(T, E), wgu, wd, k, capacity_factor=cf,
                                  backend=backend)
        assert out.shape == (T, 0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", moe_ops.available_backends("permute", "cpu"))
def test_threads_calling_ops_at_once(backend):
    """Four threads, each its own inputs: every result is the reference's, bitwise."""
    T, k, E, H = 16, 2, 8, 32
    inputs = []
    for i in range(4):
        g = torch.Generator().manual_seed(10 + i)
        inputs.append((torch.randn(T, H, generator=g), torch.randint(0, E, (T, k), generator=g, dtype=torch.int32),
                       torch.rand(T, k, generator=g)))
    results, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            x, ids, w = inputs[i]
            barrier.wait()
            for _ in range(3):
                r = moe_ops.permute(x, ids, E, backend=backend)
                out = moe_ops.unpermute(r.x_sorted, r.slot_rows, w, backend=backend)
            results[i] = (r, out)
        except BaseException as e:  # surfaced below with the thread's index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (x, ids, w), (r, out) in zip(inputs, results):
        want = R.permute(x, ids, E, 1)
        for a, b in zip(r, want):
            assert_bitwise_equal(a, b, f"permute[{backend}] in a thread")
        torch.testing.assert_close(out, R.unpermute(want[0], want[3], w, k), rtol=1e-6, atol=1e-6)
