"""Semantics of the SIMT host emulator (csrc/sim), checked with its own test kernels.

The kernels (tests/csrc/simtest_kernels.cuh) are plain CUDA; the ops that run them live in the
``moe_ops_simtest`` namespace of the emulator library. Each result is compared with the same
computation done in torch on fresh random inputs; outputs start poisoned so an unwritten element
fails. Also run by scripts/sanitizers.sh under ASan+UBSan and TSan.
"""
import concurrent.futures
import glob
import os

import pytest
import torch
from moe_ops import envs


def _load_sim():
    path = envs.raw("MOE_OPS_SIM_LIB")
    if not path:
        root = os.path.join(os.path.dirname(__file__), "..", "moe_ops")
        found = sorted(glob.glob(os.path.join(root, "_C_sim*.so")))
        if not found:
            return None
        path = found[0]
    torch.ops.load_library(path)  # same path as moe_ops._register_sim: loading twice is a no-op
    return torch.ops.moe_ops_simtest


sim = _load_sim()
pytestmark = pytest.mark.skipif(sim is None, reason="emulator library _C_sim not built (make build)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _i32(v):
    """Python int (bit pattern in the low 32 bits) -> the int32 value a kernel writes."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


@pytest.mark.parametrize("threads,blocks,n", [(32, 1, 1), (32, 5, 1000), (256, 3, 5000), (1024, 2, 3001)])
def test_block_sum_shared_memory_and_syncthreads(threads, blocks, n):
    x = torch.randn(n, generator=_gen(n))
    out = sim.block_sum(x, threads, blocks)
    # element i is summed by block (i // threads) % blocks
    owner = (torch.arange(n) // threads) % blocks
    ref = torch.zeros(blocks, dtype=torch.float64).index_add_(0, owner, x.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * n ** 0.5)
    assert torch.equal(out, sim.block_sum(x, threads, blocks)), "not bitwise deterministic"


@pytest.mark.parametrize("threads,n", [(32, 32), (64, 128), (256, 256)])
def test_warp_intrinsics(threads, n):
    x = torch.randint(-50, 51, (n,), dtype=torch.int32, generator=_gen(threads + n))
    out = sim.warp_ops(x, threads)
    assert out.shape == (n, 12)
    xs = x.view(-1, 32).long()
    lane = torch.arange(32).expand_as(xs)
    ref = torch.empty(xs.shape + (12,), dtype=torch.long)
    ref[..., 0] = xs.sum(1, keepdim=True).expand_as(xs)
    ref[..., 1] = xs.cumsum(1)
    down = torch.where(lane + 3 < 32, lane + 3, lane)
    ref[..., 2] = xs.gather(1, down)
    ref[..., 3] = xs.gather(1, xs % 32)
    bits = (1 << torch.arange(32)).expand_as(xs)
    ballot = (bits * (xs & 1)).sum(1, keepdim=True).expand_as(xs)
    ref[..., 4] = ballot
    ref[..., 5] = (xs < 0).any(1, keepdim=True).expand_as(xs).long()
    ref[..., 6] = (xs >= 0).all(1, keepdim=True).expand_as(xs).long()
    ref[..., 7] = xs.sum(1, keepdim=True).expand_as(xs)
    ref[..., 8] = xs.max(1, keepdim=True).values.expand_as(xs)
    cls = xs % 4
    same = (cls.unsqueeze(2) == cls.unsqueeze(1)).long()  # [w, lane, other]
    ref[..., 9] = (same * (1 << torch.arange(32))).sum(2)
    rev = 31 - lane
    ref[..., 10] = xs.gather(1, rev) + rev
    ref[..., 11] = xs.view(-1, 4, 8).sum(2, keepdim=True).expand(-1, 4, 8).reshape(xs.shape)
    ref = ref.reshape(n, 12).apply_(_i32).int()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_early_returning_threads_leave_barriers():
    n = 128 * 6
    x = torch.randint(-5, 10, (n,), dtype=torch.int32, generator=_gen(7))
    x[128:256] = -1               # block 1: every thread returns
    x[256 + 32:256 + 64] = -1     # block 2: warp 1 returns entirely
    x[384] = -3                   # block 3: thread 0 returns (it writes the block results)
    x[512:640] = torch.arange(128, dtype=torch.int32) % 7  # block 4: nobody returns
    out, out_lane = sim.early_exit(x)
    xb = x.view(-1, 128).long()
    alive = xb >= 0
    ref = torch.stack([alive.sum(1), (xb * alive).sum(1)], 1)
    ref[~alive[:, 0]] = -7  # thread 0 returned: nothing written
    torch.testing.assert_close(out, ref.int(), rtol=0, atol=0)
    xw = x.view(-1, 32).long()
    aw = xw >= 0
    lane_ref = ((xw * aw).sum(1, keepdim=True) * 64 + aw.sum(1, keepdim=True)).expand_as(xw).clone()
    lane_ref[~aw] = -7
    torch.testing.assert_close(out_lane, lane_ref.reshape(-1).int(), rtol=0, atol=0)


@pytest.mark.parametrize("nbins,blocks,threads,n", [(1, 1, 32, 50), (7, 3, 64, 1000), (64, 4, 256, 4096), (1000, 2, 128, 3000)])
def test_int_atomics_histogram(nbins, blocks, threads, n):
    ids = torch.randint(-2, nbins + 2, (n,), dtype=torch.int32, generator=_gen(nbins * 31 + n))
    hist = sim.histogram(ids, nbins, blocks, threads)
    valid = ids[(ids >= 0) & (ids < nbins)].long()
    ref = torch.bincount(valid, minlength=nbins).int()
    torch.testing.assert_close(hist, ref, rtol=0, atol=0)


@pytest.mark.parametrize("n_per,threads,blocks", [(1, 32, 3), (100, 64, 3), (1000, 96, 2), (4096, 1024, 2)])
def test_dynamic_shared_memory(n_per, threads, blocks):
    x = torch.randn(n_per * blocks, generator=_gen(n_per))
    out = sim.block_reverse(x, n_per, threads)
    ref = x.view(blocks, n_per).flip(1).reshape(-1)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("grid,block", [((2, 3, 2), (4, 2, 3)), ((5, 1, 1), (33, 1, 1)), ((1, 2, 3), (8, 8, 2))])
def test_thread_and_block_coordinates(grid, block):
    out = sim.thread_coords(list(grid), list(block))
    gz, gy, gx = torch.meshgrid(*(torch.arange(g) for g in reversed(grid)), indexing="ij")
    tz, ty, tx = torch.meshgrid(*(torch.arange(b) for b in reversed(block)), indexing="ij")
    nb, nt = gx.numel(), tx.numel()
    bcoord = torch.stack([gx.reshape(-1), gy.reshape(-1), gz.reshape(-1)], 1)  # blocks, x fastest
    tcoord = torch.stack([tx.reshape(-1), ty.reshape(-1), tz.reshape(-1)], 1)  # threads, x fastest
    ref = torch.cat([
        tcoord.repeat(nb, 1),
        bcoord.repeat_interleave(nt, 0),
        torch.tensor(block).expand(nb * nt, 3),
        torch.tensor(grid).expand(nb * nt, 3),
    ], 1).int()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("what,threads,message", [
    ("bad_shuffle", 32, "reads lane 5, which is not taking part"),
    ("bad_shuffle", 64, "reads lane 5, which is not taking part"),
    ("deadlock", 64, "deadlocked"),
    ("trap", 64, "__trap() called"),
    ("trap", 256, "__trap() called"),
    ("smem_too_big", 32, "exceed the 227 KiB"),
    ("bad_block", 32, "invalid launch configuration"),
])
def test_kernel_errors_raise_and_do_not_hang(what, threads, message):
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sim.misuse(what, threads)
    # the emulator is usable afterwards
    x = torch.randn(300, generator=_gen(1))
    torch.testing.assert_close(sim.block_sum(x, 32, 1).double(), x.double().sum().reshape(1), rtol=1e-5, atol=1e-4)


def test_zero_size_grid_is_a_no_op():
    assert sim.block_sum(torch.randn(10), 32, 0).numel() == 0
    assert sim.warp_ops(torch.empty(0, dtype=torch.int32), 32).shape == (0, 12)


def test_launches_from_several_threads():
    xs = [torch.randn(700, generator=_gen(i)) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda x: sim.block_sum(x, 32, 2), xs))
    for x, out in zip(xs, outs):
        owner = (torch.arange(x.numel()) // 32) % 2
        ref = torch.zeros(2, dtype=torch.float64).index_add_(0, owner, x.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_block_order_setting(monkeypatch):
    """Blocks run in blockIdx.x order; MOE_OPS_SIM_BLOCK_ORDER=reverse runs them backwards."""
    monkeypatch.delenv("MOE_OPS_SIM_BLOCK_ORDER", raising=False)
    assert sim.block_ticket(9).tolist() == list(range(9))
    monkeypatch.setenv("MOE_OPS_SIM_BLOCK_ORDER", "reverse")
    assert sim.block_ticket(9).tolist() == list(range(8, -1, -1))


def test_reverse_block_order_gives_the_same_results(monkeypatch):
    """MOE_OPS_SIM_BLOCK_ORDER=reverse runs blocks backwards: order-independent kernels must agree."""
    x = torch.randn(3000, generator=_gen(5))
    ids = torch.randint(-1, 40, (2000,), dtype=torch.int32, generator=_gen(6))
    fwd = sim.block_sum(x, 32, 7), sim.histogram(ids, 37, 5, 64), sim.thread_coords([3, 2, 1], [8, 1, 1])
    monkeypatch.setenv("MOE_OPS_SIM_BLOCK_ORDER", "reverse")
    rev = sim.block_sum(x, 32, 7), sim.histogram(ids, 37, 5, 64), sim.thread_coords([3, 2, 1], [8, 1, 1])
    for a, b in zip(fwd, rev):
        assert torch.equal(a, b)


FORK_THREADS = (32, 256, 1024)


# ThreadSanitizer kills a child of a multi-threaded process that starts threads (die_after_fork).
UNDER_TSAN = "libtsan" in (envs.raw("LD_PRELOAD") or "")


def _fork_child(conn, x, want):
    import faulthandler
    import sys

    try:
        # a hang shows where before the parent gives up (fd 2: pytest may have replaced sys.stderr)
        faulthandler.dump_traceback_later(90, exit=True, file=sys.__stderr__)
        torch.set_num_threads(1)  # torch's own OpenMP team does not survive a fork either
        for t in FORK_THREADS:  # larger blocks than the parent's running launches: the pool grows
            assert torch.equal(sim.block_sum(x, t, 3), want[t]), f"{t} threads: wrong sums"
        conn.send("ok")
    except BaseException as e:  # noqa: BLE001 -- reported to the parent
        conn.send(f"{type(e).__name__}: {e}")


@pytest.mark.skipif(UNDER_TSAN, reason="TSan does not support threads started after a multi-threaded fork")
def test_forked_child_builds_its_own_pool():
    """Threads do not survive fork(): a child must not hand its launches to the parent's workers
    (it hung forever, with no thread at a barrier for the deadlock detector to see). A fork while
    another thread is in a launch waits for it, so the child never inherits a held launch lock;
    the parent's pool keeps working after the fork."""
    import multiprocessing
    import threading

    x = torch.randn(5000, generator=_gen(11))
    want = {t: sim.block_sum(x, t, 3) for t in FORK_THREADS}
    stop = threading.Event()

    def launch_until_stopped():
        while not stop.is_set():
            sim.block_sum(x, 256, 3)

    busy = threading.Thread(target=launch_until_stopped)
    busy.start()
    try:
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_fork_child, args=(send, x, want))
        child.start()
        send.close()
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail("the forked child hung in its first launch")
    finally:
        stop.set()
        busy.join()
    try:
        msg = recv.recv()
    except EOFError:  # the child died without a word
        msg = f"no report, exit code {child.exitcode}"
    assert msg == "ok", msg
    for t in FORK_THREADS:
        assert torch.equal(sim.block_sum(x, t, 3), want[t])


# ---- tensor-core and async-copy models (csrc/kernels/mma.cuh, csrc/sim/warp_matrix.cpp) -------
# The expected lane -> element maps below are written from the PTX ISA text, independently of the
# C++ model, so that a layout error cannot hide in both.


def _ptx_mma_m16n8k16_a(lane):
    """PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type", A (.f16/.bf16):
    (row, col) of a_0..a_7; a_{2r}, a_{2r+1} are the low / high half of register r."""
    group, tig = lane >> 2, lane % 4
    out = []
    for i in range(8):
        row = group if (0 <= i < 2 or 4 <= i < 6) else group + 8
        col = tig * 2 + (i & 0x1) if i < 4 else tig * 2 + (i & 0x1) + 8
        out.append((row, col))
    return out


def _ptx_mma_m16n8k16_b(lane):
    """Same section, B (.f16/.bf16, 16x8 = k x n): (row, col) of b_0..b_3."""
    group, tig = lane >> 2, lane % 4
    return [(tig * 2 + (i & 0x1) if i < 2 else tig * 2 + (i & 0x1) + 8, group) for i in range(4)]


def _ptx_mma_m16n8k16_c(lane):
    """Same section, accumulators C/D (.f32, 16x8): (row, col) of c_0..c_3."""
    group, tig = lane >> 2, lane % 4
    return [(group if i < 2 else group + 8, tig * 2 + (i & 0x1)) for i in range(4)]


def _bits16(x):
    return x.contiguous().view(torch.int16).long() & 0xFFFF


def _pack_halves(bits, positions):
    """[rows, cols] 16-bit patterns -> one int32 register per element pair (low half first)."""
    regs = []
    for r in range(len(positions) // 2):
        (r0, c0), (r1, c1) = positions[2 * r], positions[2 * r + 1]
        regs.append(_i32(int(bits[r0, c0]) | int(bits[r1, c1]) << 16))
    return regs


def _mma_registers(a, b, c):
    """Per-lane registers of one m16n8k16 from A [16,16], B [16,8] (16-bit) and C [16,8] (f32)."""
    ab, bb = _bits16(a), _bits16(b)
    ra = torch.tensor([_pack_halves(ab, _ptx_mma_m16n8k16_a(lane)) for lane in range(32)], dtype=torch.int32)
    rb = torch.tensor([_pack_halves(bb, _ptx_mma_m16n8k16_b(lane)) for lane in range(32)], dtype=torch.int32)
    rc = torch.tensor([[float(c[p]) for p in _ptx_mma_m16n8k16_c(lane)] for lane in range(32)], dtype=torch.float32)
    return ra, rb, rc


def _mma_gather_d(d):
    """[32, 4] per-lane D registers -> D [16, 8] by the accumulator layout (every element once)."""
    out = torch.full((16, 8), float("nan"), dtype=torch.float64)
    seen = set()
    for lane in range(32):
        for i, p in enumerate(_ptx_mma_m16n8k16_c(lane)):
            out[p] = float(d[lane, i])
            seen.add(p)
    assert len(seen) == 128
    return out


def _run_mma(problems, dtype):
    regs = [_mma_registers(a, b, c) for a, b, c in problems]
    ra, rb, rc = (torch.stack([r[i] for r in regs]) for i in range(3))
    d = sim.mma(ra, rb, rc, str(dtype).removeprefix("torch."))
    return [_mma_gather_d(d[w]) for w in range(len(problems))]


MMA_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", MMA_DTYPES)
def test_mma_m16n8k16_positions(dtype):
    """Every (i, k, j) lands where the PTX layout says: row i of A has the single value i + 1, at
    k = (i + s) % 16 (16 shifts s cover every A position), B and C hold distinct integers, so
    D[i][j] must equal (i + 1) * B[(i + s) % 16][j] + C[i][j] exactly; a misplaced A, B, C or D
    element changes some D. (With 1 for every row's value a quadrant swap of A, e.g. a[1] <-> a[2],
    maps these cyclic patterns onto themselves and would pass.)"""
    b = (1 + torch.arange(128, dtype=torch.float32)).reshape(16, 8).to(dtype)
    c = 1000 * (1 + torch.arange(128, dtype=torch.float32)).reshape(16, 8)
    rows, value = torch.arange(16), 1 + torch.arange(16, dtype=torch.float32)
    problems = []
    for s in range(16):
        a = torch.zeros(16, 16)
        a[rows, (rows + s) % 16] = value
        problems.append((a.to(dtype), b, c))
    for s, d in enumerate(_run_mma(problems, dtype)):
        ref = value.double()[:, None] * b.double()[(rows + s) % 16] + c.double()
        assert torch.equal(d, ref), f"shift {s}: {(d != ref).nonzero().tolist()[:8]}"


@pytest.mark.parametrize("dtype", MMA_DTYPES)
def test_mma_m16n8k16_random_values(dtype):
    g = _gen(3 if dtype == torch.bfloat16 else 4)
    problems = [(torch.randn(16, 16, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype),
                 torch.randn(16, 8, generator=g)) for _ in range(3)]
    for (a, b, c), d in zip(problems, _run_mma(problems, dtype)):
        ref = a.double() @ b.double() + c.double()
        torch.testing.assert_close(d, ref, rtol=1e-5, atol=1e-5)


def _ptx_ldmatrix(m, lane, trans):
    """PTX ISA, ldmatrix .m8n8 .b16: lane l = 4*group + tig holds elements (group, 2*tig + i),
    i = 0, 1 (low, high half) of the matrix; with .trans, of its transpose."""
    group, tig = lane >> 2, lane % 4
    elems = [m[2 * tig + i][group] if trans else m[group][2 * tig + i] for i in range(2)]
    return _i32(int(elems[0]) | int(elems[1]) << 16)


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_fragments(num, trans):
    """Distinct values everywhere; rows at shuffled, padded shared-memory slots, lane 8j + r giving
    row r of matrix j (PTX: threads 0-7 matrix 0, 8-15 matrix 1, ...); the lanes past 8*num give a
    misaligned address that ldmatrix must ignore."""
    src = (1 + torch.arange(num * 64)).to(torch.int16)
    slot = torch.randperm(num * 8, generator=_gen(num + 10 * trans)).int()
    out = sim.ldmatrix(src, slot, num, trans)
    mats = src.long().reshape(num, 8, 8)
    ref = torch.tensor([[_ptx_ldmatrix(mats[j], lane, trans) for j in range(num)] for lane in range(32)],
                       dtype=torch.int32)
    assert torch.equal(out, ref), f"lanes differ: {(out != ref).nonzero().tolist()[:8]}"


def test_cp_async_zero_fill_and_groups():
    """src-size zero-fill; wait_group 1 leaves the newest committed group pending; wait_group 0
    completes every committed group but not an uncommitted copy; copies left pending at the end of
    a block are dropped, not performed in the next block (region 4 stays poison in both)."""
    blocks, region = 2, 32 * 16
    src = torch.randint(1, 255, (blocks, 5 * region), dtype=torch.uint8, generator=_gen(21))  # no 0x00 / 0xff
    sizes = torch.randint(0, 17, (32,), dtype=torch.int32, generator=_gen(22))
    sizes[:3] = torch.tensor([0, 5, 16], dtype=torch.int32)
    out = sim.cp_async(src, sizes)
    poison = torch.full((region,), 0xFF, dtype=torch.uint8)
    for b in range(blocks):
        regions = src[b].view(5, 32, 16)
        filled = regions[0].clone()
        for t in range(32):
            filled[t, int(sizes[t]):] = 0
        snap0, snap1 = out[b, 0].view(5, region), out[b, 1].view(5, region)
        assert torch.equal(snap0[0], filled.reshape(-1)), "zero-fill past src-size"
        assert torch.equal(snap0[1], regions[1].reshape(-1)) and torch.equal(snap0[2], regions[2].reshape(-1))
        assert torch.equal(snap0[3], poison), "wait_group 1 completed the newest group"
        assert torch.equal(snap0[4], poison)
        assert torch.equal(snap1[:3], snap0[:3])
        assert torch.equal(snap1[3], regions[3].reshape(-1)), "wait_group 0 left a committed group pending"
        assert torch.equal(snap1[4], poison), "an uncommitted (or a previous block's) copy was performed"


def test_cp_async_8_and_4_byte_forms():
    src = torch.randint(1, 255, (384,), dtype=torch.uint8, generator=_gen(23))
    sizes8 = torch.arange(32, dtype=torch.int32) % 9
    sizes4 = torch.arange(32, dtype=torch.int32).flip(0) % 5
    out = sim.cp_async_small(src, sizes8, sizes4)
    ref = src.clone()
    for t in range(32):
        ref[t * 8 + int(sizes8[t]):(t + 1) * 8] = 0
        ref[256 + t * 4 + int(sizes4[t]):256 + (t + 1) * 4] = 0
    assert torch.equal(out, ref)


@pytest.mark.parametrize("what,threads,message", [
    (0, 32, r"ldmatrix.x4: all 32 lanes of the warp must execute it, but lanes 0x20 did not"),
    (1, 32, r"ldmatrix: lane 3 gives row address .* not 16-byte aligned"),
    (2, 32, r"divergent warp collectives: lane \d+ calls ldmatrix.x"),
    (3, 32, r"mma.sync.m16n8k16.bf16: all 32 lanes .* lanes 0x80000000 did not"),
    (4, 32, r"cp.async: src-size 17 outside \[0, 16\]"),
    (5, 32, r"cp.async: 16-byte copy .* must be 16-byte aligned"),
    (6, 48, r"ldmatrix.x4: needs a full warp of 32 threads, this one has 16"),
])
def test_warp_matrix_misuse_raises(what, threads, message):
    with pytest.raises(RuntimeError, match=message):
        sim.warp_matrix_misuse(what, threads)
    assert sim.warp_matrix_misuse(6, 64).shape == (64,)  # the correct use works, and afterwards


GEMM_BUGS = {"none": 0, "no_wait": 1, "swapped_fragment": 2}


@pytest.mark.parametrize("bug", list(GEMM_BUGS))
@pytest.mark.parametrize("dtype", MMA_DTYPES)
def test_tiled_gemm_planted_bugs_are_caught(dtype, bug):
    """A cp.async + ldmatrix + mma GEMM (tests/csrc/planted_bugs.cuh) matches a float64 matmul;
    its planted variants (no cp.async.wait_group; a[1] / a[2] swapped) must not."""
    g = _gen(31)
    a = torch.randn(32, 64, generator=g).to(dtype)
    b = torch.randn(48, 64, generator=g).to(dtype)
    out = sim.tiled_gemm(a, b, GEMM_BUGS[bug])
    ref = a.double() @ b.double().T

    def check():
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)

    if bug == "none":
        check()
    else:
        with pytest.raises(AssertionError):
            check()
    if bug == "no_wait":
        assert out.isnan().any(), "the missing wait should read the NaN poison"
