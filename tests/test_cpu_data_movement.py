"""CPU data-movement ops: permute, unpermute, capacity_dispatch, capacity_combine.

* Reference comparisons on fresh random inputs, *every output element written*: the ops allocate
  their float outputs from the CPU host cache (csrc/cpu/host_alloc.cpp), so a test first fills
  the cache with a NaN block of the right size (run the op, NaN-fill its output, free it) and then
  checks that the next call reuses that very block (same data_ptr) and matches the reference.
  The cache's size threshold is lowered to 0 for these tests so small outputs go through it too.
* Bitwise equality with ``moe_ops.reference`` for every dtype (float32 accumulation, j order,
  multiply then add, one rounding -- the behaviour of the previous combine code), H not a
  multiple of 8, k in {1, 2, 8}, weights None, dropped ids/rows, T = 0, empty experts, NaN/Inf,
  signed zeros.
* Bitwise identical results with 1 and 2 threads.
* The host cache: block reuse, the cap (evictions, blocks above the cap), disabled mode and the
  env variable (subprocess), results that outlive many later calls, and ordinary tensor
  behaviour (views, clone, pickling, resize_, share_memory_, autograd, torch.compile).
* The portable (non-AVX2) combine, in a subprocess with ``MOE_OPS_CPU_NO_AVX2=1``.
"""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys

import pytest
import torch

import moe_ops
from moe_ops import reference as R
from tests.compare import assert_exact, assert_thread_count_independent
from tests.cpu_isa import avx512_emulation_built, rerun_with_emulated_avx512
from tests.inputs import make_ids, make_x, seed_for
from tests.poison import poison

pytestmark = pytest.mark.skipif("cpu" not in moe_ops.available_backends(device="cpu"),
                                reason="moe_ops._C CPU kernels not built")

ops = torch.ops.moe_ops
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_cache() -> bool:
    try:
        torch.ops.moe_cpu_cache.stats()
        return True
    except (AttributeError, RuntimeError):
        return False


needs_cache = pytest.mark.skipif(not _has_cache(), reason="host cache ops not built")


def _stats():
    s = torch.ops.moe_cpu_cache.stats()
    return dict(zip(("cached", "cap", "min", "hits", "misses", "live", "blocks"), s))


@pytest.fixture
def all_through_cache():
    """Every float output goes through the host cache (threshold 0); restored afterwards."""
    if not _has_cache():
        yield
        return
    c = torch.ops.moe_cpu_cache
    old_cap, old_min = c.configure(-1, 0)
    if old_cap == 0:  # run under MOE_OPS_CPU_CACHE_MB=0: enable a cache for these tests
        c.configure(64 << 20, -1)
    c.clear()
    try:
        yield
    finally:
        c.configure(old_cap, old_min)
        c.clear()


def _poisoned_call(fn, pick):
    """Run fn once, NaN-fill the float output pick(result) and free it; run fn again and check it
    reused the poisoned block (so an element the op fails to write stays NaN). Returns the second
    result."""
    if _has_cache():
        torch.ops.moe_cpu_cache.clear()
    first = fn()
    out = pick(first)
    ptr, nbytes = out.data_ptr(), out.numel() * out.element_size()
    poison(out)
    del first, out
    second = fn()
    if _has_cache() and nbytes > 0:
        assert pick(second).data_ptr() == ptr, "the op did not reuse the poisoned cached block"
    return second


# ------------------------------------------------------------------------------------ permute

PERMUTE_CASES = [  # T, E, k, H, block_m, mode, empty, invalid
    (37, 8, 2, 13, 1, "uniform", 0, 0.0),
    (64, 16, 1, 64, 4, "skew", 3, 0.0),
    (50, 8, 8, 100, 1, "uniform", 0, 0.2),
    (33, 6, 2, 7, 8, "one", 0, 0.1),
    (0, 4, 2, 16, 4, "uniform", 0, 0.0),
    (200, 64, 8, 1000, 1, "skew", 10, 0.05),
]


@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: "T{}E{}k{}H{}bm{}{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_matches_reference(case, dtype, all_through_cache):
    T, E, k, H, bm, mode, empty, invalid = case
    seed = seed_for("permute", case, dtype)
    x = make_x(T, H, seed=seed, dtype=dtype)
    ids = make_ids(T, k, E, seed=seed + 1, mode=mode, empty=empty, invalid=invalid)
    got = _poisoned_call(lambda: ops.permute(x, ids, E, bm), lambda r: r[0])
    ref = R.permute(x, ids, E, bm)
    for name, a, b in zip(("x_sorted", "sorted_slots", "expert_offsets", "slot_rows"), got, ref):
        assert_exact(a, b, name)


# ---------------------------------------------------------------------------------- unpermute

@pytest.mark.parametrize("H", [1, 7, 8, 33, 64, 100, 1000], ids=lambda h: f"H{h}")
@pytest.mark.parametrize("k", [1, 2, 8], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("weighted", [True, False], ids=["w", "now"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unpermute_matches_reference_bitwise(H, k, weighted, dtype, all_through_cache):
    T, E = 45, 8
    seed = seed_for("unpermute", H, k, weighted, dtype)
    ids = make_ids(T, k, E, seed=seed, mode="dup", invalid=0.15)
    _, _, _, slot_rows = R.permute(make_x(T, 1, seed=seed), ids, E, 2)
    P = T * k + E
    y = make_x(P, H, seed=seed + 1, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 2)
    w = (torch.rand(T, k, generator=g) * 2 - 0.5) if weighted else None
    if w is not None and dtype == torch.float64:
        w = w.double()
    # rows out of range are dropped like -1
    slot_rows = slot_rows.clone()
    if slot_rows.numel() > 3:
        slot_rows[1] = P
        slot_rows[2] = P + 100
    got = _poisoned_call(lambda: ops.unpermute(y, slot_rows, w, k), lambda r: r)
    assert_exact(got, R.unpermute(y, slot_rows, w, k), "unpermute")


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
def test_unpermute_nan_inf_and_signed_zero(dtype, all_through_cache):
    """NaN/Inf propagate like the reference (bf16 NaN -> the canonical 0x7FC0 via the rare path);
    a sum of -0.0 products is +0.0 (the accumulator starts at +0.0); denormal sums round like
    c10 (the AVX-512 bf16 convert would flush them: its rare path)."""
    T, k, H = 6, 2, 70
    y = make_x(T * k, H, seed=1, dtype=dtype)
    y[0, 3] = float("nan")
    y[2, 5] = float("inf")
    y[3, 5] = float("-inf")         # token 1: inf + -inf = NaN
    y[4, 9] = -float("nan")
    y[6].zero_()                    # token 3: w * (+0) with w < 0 -> -0.0 products
    y[7].zero_()
    y[8, 10], y[9, 10] = 1e-39, 0.0  # token 4: a denormal sum (float32, bfloat16; 0 in float16)
    y[10, 40], y[11, 40] = 2e-38, -1e-38  # token 5: normal values, denormal products and sum
    rows = torch.arange(T * k, dtype=torch.int32)
    w = torch.rand(T, k) + 0.1
    w[3] = -w[3]
    for weights in (w, None):
        got = _poisoned_call(lambda: ops.unpermute(y, rows, weights, k), lambda r: r)
        ref = R.unpermute(y, rows, weights, k)
        assert_exact(got, ref, "unpermute")
        if weights is not None:
            assert (got[3].view(torch.int16 if dtype != torch.float32 else torch.int32) == 0).all(), \
                "-0.0 products must sum to +0.0"
        if dtype == torch.bfloat16:  # NaN stored as c10::BFloat16(NaN) = 0x7FC0 (as before)
            assert got.isnan().any() and (got.view(torch.int16)[got.isnan()] == 0x7FC0).all()


def test_unpermute_zero_tokens_and_all_dropped(all_through_cache):
    y = make_x(10, 16, seed=2, dtype=torch.bfloat16)
    out = ops.unpermute(y, torch.zeros(0, dtype=torch.int32), None, 2)
    assert out.shape == (0, 16)
    rows = torch.full((8,), -1, dtype=torch.int32)
    got = _poisoned_call(lambda: ops.unpermute(y, rows, torch.rand(4, 2), 2), lambda r: r)
    assert_exact(got, torch.zeros(4, 16, dtype=torch.bfloat16), "all dropped")


# --------------------------------------------------------------------------------- capacity

CAPACITY_CASES = [  # T, E, k, H, C, priority, invalid
    (40, 8, 2, 13, 7, "kmajor", 0.0),
    (64, 4, 1, 64, 100, "token_major", 0.1),
    (50, 8, 8, 100, 20, "kmajor", 0.2),
    (30, 6, 2, 16, 0, "kmajor", 0.0),
    (0, 4, 2, 9, 5, "token_major", 0.0),
]


@pytest.mark.parametrize("case", CAPACITY_CASES, ids=lambda c: "T{}E{}k{}H{}C{}{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_capacity_dispatch_and_combine_match_reference(case, dtype, all_through_cache):
    T, E, k, H, C, pr, invalid = case
    seed = seed_for("capacity", case, dtype)
    x = make_x(T, H, seed=seed, dtype=dtype)
    ids = make_ids(T, k, E, seed=seed + 1, mode="skew", invalid=invalid)
    got = _poisoned_call(lambda: ops.capacity_dispatch(x, ids, E, C, pr), lambda r: r[0])
    ref = R.capacity_dispatch(x, ids, E, C, pr)
    for name, a, b in zip(("buf", "slot_pos", "demand", "kept"), got, ref):
        assert_exact(a, b, name)
    buf_out = make_x(E * C, H, seed=seed + 2, dtype=dtype).reshape(E, C, H)
    g = torch.Generator().manual_seed(seed + 3)
    for w in (torch.rand(T, k, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32), None):
        out = _poisoned_call(lambda: ops.capacity_combine(buf_out, ids, got[1], w), lambda r: r)
        assert_exact(out, R.capacity_combine(buf_out, ids, got[1], w), "capacity_combine")


# ---------------------------------------------------------------------------- determinism

def _run_data_ops(dtype):
    T, E, k, H = 300, 16, 4, 1000
    x = make_x(T, H, seed=11, dtype=dtype)
    ids = make_ids(T, k, E, seed=12, invalid=0.05)
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(13))
    p = ops.permute(x, ids, E, 4)
    y = make_x(p[0].shape[0], H, seed=14, dtype=dtype)
    d = ops.capacity_dispatch(x, ids, E, 60, "kmajor")
    buf = make_x(E * 60, H, seed=15, dtype=dtype).reshape(E, 60, H)
    return [*p, ops.unpermute(y, p[3], w, k), ops.unpermute(y, p[3], None, k), *d,
            ops.capacity_combine(buf, ids, d[1], w)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_independent_of_thread_count(dtype):
    assert_thread_count_independent(lambda: _run_data_ops(dtype), "data movement ops")


# ------------------------------------------------------------------------------- host cache

@needs_cache
def test_cache_reuses_freed_blocks_and_results_outlive_later_calls():
    c = torch.ops.moe_cpu_cache
    c.clear()
    T, E, k, H = 256, 8, 2, 1024          # x_sorted: 512 x 1024 fp32 = 2 MiB (>= 1 MiB threshold)
    x = make_x(T, H, seed=21)
    ids = make_ids(T, k, E, seed=22)
    held = ops.permute(x, ids, E, 1)[0]
    keep = held.clone()
    s0 = _stats()
    ptrs = set()
    for i in range(10):
        xi = make_x(T, H, seed=100 + i)
        r = ops.permute(xi, ids, E, 1)[0]
        ptrs.add(r.data_ptr())
        assert_exact(r, R.permute(xi, ids, E, 1)[0], f"call {i}")
        del r
    s1 = _stats()
    assert held.data_ptr() not in ptrs, "a live result's block was handed out again"
    assert_exact(held, keep, "held result after 10 more calls")
    assert len(ptrs) == 1, "steady state should reuse one block"
    assert s1["hits"] - s0["hits"] >= 9


@needs_cache
def test_cache_cap_is_respected():
    c = torch.ops.moe_cpu_cache
    old_cap, old_min = c.configure(5 << 20, -1)   # 5 MiB: two 2 MiB blocks fit, not three
    try:
        c.clear()
        x = make_x(256, 1024, seed=31)                        # 1 MiB rows -> x_sorted 2 MiB (k=2)
        ids = make_ids(256, 2, 8, seed=32)
        outs = [ops.permute(x, ids, 8, 1)[0] for _ in range(4)]
        del outs
        s = _stats()
        assert s["cap"] == 5 << 20
        assert 0 < s["cached"] <= 5 << 20 and s["blocks"] == 2, s
        big = make_x(1024, 1024, seed=33)                     # x_sorted 8 MiB > cap: freed, not cached
        r = ops.permute(big, make_ids(1024, 2, 8, seed=34), 8, 1)[0]
        del r
        s = _stats()
        assert s["cached"] <= 5 << 20 and s["blocks"] == 2, s
        c.configure(2 << 20, -1)                  # lowering the cap trims the cache
        assert _stats()["cached"] <= 2 << 20
    finally:
        c.configure(old_cap, old_min)
        c.clear()


_SUBPROCESS_SCRIPT = r"""
import torch, moe_ops
from moe_ops import reference as R
from moe_ops import _C  # noqa
s = torch.ops.moe_cpu_cache.stats()
want = WANT_CAP_MB << 20
assert s[1] == want, (s, want)
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 1024, generator=g)
ids = torch.randint(0, 8, (512, 2), generator=g, dtype=torch.int32)
for _ in range(3):
    p = torch.ops.moe_ops.permute(x, ids, 8, 1)
    assert torch.equal(p[0], R.permute(x, ids, 8, 1)[0])
    u = torch.ops.moe_ops.unpermute(p[0], p[3], None, 2)
    assert torch.equal(u, R.unpermute(p[0], p[3], None, 2))
    del p, u
s = torch.ops.moe_cpu_cache.stats()
assert s[0] <= want, s
if want == 0:
    assert s[0] == 0 and s[3] == 0 and s[5] == 0, s   # nothing cached, nothing served from it
print("ok")
"""


@needs_cache
@pytest.mark.parametrize("env,cap_mb", [("0", 0), ("3", 3), ("junk", 512)], ids=["disabled", "3MB", "invalid"])
def test_cache_env_variable(env, cap_mb):
    e = dict(os.environ, MOE_OPS_CPU_CACHE_MB=env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", f"WANT_CAP_MB = {cap_mb}\n" + _SUBPROCESS_SCRIPT], env=e, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@needs_cache
def test_cached_tensors_behave_like_tensors():
    T, E, k, H = 256, 8, 2, 1024
    x = make_x(T, H, seed=41)
    ids = make_ids(T, k, E, seed=42)
    xs = ops.permute(x, ids, E, 1)[0]
    ref = R.permute(x, ids, E, 1)[0]
    assert_exact(xs[3:7, 5:9].contiguous(), ref[3:7, 5:9])        # views
    assert_exact(xs.t().contiguous().t(), ref)
    cl = xs.clone()
    assert cl.data_ptr() != xs.data_ptr()
    assert_exact(cl, ref)
    buf = io.BytesIO()
    torch.save(xs, buf)                                              # torch.save / pickle
    buf.seek(0)
    assert_exact(torch.load(buf), ref)
    assert_exact(pickle.loads(pickle.dumps(xs)), ref)
    big = ops.permute(x, ids, E, 1)[0]
    big.resize_(2 * big.shape[0], H)                                  # grows past the block
    assert_exact(big[: ref.shape[0]], ref)
    big.resize_(3, H)
    assert_exact(big, ref[:3])
    sh = ops.permute(x, ids, E, 1)[0].share_memory_()
    assert sh.is_shared()
    assert_exact(sh, ref)


@needs_cache
def test_cached_outputs_autograd_and_compile():
    T, E, k, H = 64, 4, 2, 4096                    # unpermute out 64 x 4096 fp32 = 1 MiB: cached
    x = make_x(T, H, seed=51).requires_grad_()
    ids = make_ids(T, k, E, seed=52)
    w = torch.rand(T, k, generator=torch.Generator().manual_seed(53)).requires_grad_()

    def f(x, w, backend):
        p = moe_ops.permute(x, ids, E, backend=backend)
        return moe_ops.unpermute(p.x_sorted * 2.0, p.slot_rows, w, backend=backend)

    out = f(x, w, "cpu")
    out.square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = f(x, w, "reference")
    ref.square().sum().backward()
    assert_exact(out.detach(), ref.detach(), "forward")
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
    comp = torch.compile(lambda a, b: f(a, b, "cpu"), backend="eager", fullgraph=False)
    assert_exact(comp(x.detach(), w.detach()), ref.detach(), "torch.compile(backend=eager)")


# ------------------------------------------------------------------------ portable kernels

_PORTABLE_SCRIPT = r"""
import torch, moe_ops
from moe_ops import reference as R
from moe_ops import _C  # noqa
g = torch.Generator().manual_seed(0)
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for H in (1, 7, 70, 130):
        for k in (1, 2, 8):
            T, P = 20, 20 * k + 5
            y = torch.randn(P, H, generator=g).to(dt)
            y[0, 0] = float("nan")
            rows = torch.randint(-1, P + 2, (T * k,), generator=g, dtype=torch.int32)
            w = torch.rand(T, k, generator=g) - 0.3
            for ww in (w, None):
                a, b = torch.ops.moe_ops.unpermute(y, rows, ww, k), R.unpermute(y, rows, ww, k)
                assert torch.equal(a.isnan(), b.isnan()), (dt, H, k)
                assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), (dt, H, k)
print("ok")
"""


@pytest.mark.skipif(not avx512_emulation_built(),
                    reason="no SIMDe build: no emulated AVX-512 kernels")
def test_avx512_combine_emulated():
    """The AVX-512 bf16 combine (vcvtne2ps2bf16 + the c10 rare path), emulated through SIMDe: the
    unpermute, capacity and thread-count tests of this file again with the AVX512-BF16 kernels on
    (CPUs with AVX512-BF16 run them natively in the tests above)."""
    rerun_with_emulated_avx512(os.path.abspath(__file__), "unpermute or capacity or thread_count")


def test_portable_combine_without_avx2():
    e = dict(os.environ, MOE_OPS_CPU_NO_AVX2="1")
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT], env=e, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
