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
