"""The per-op backend matrix (tests/op_matrix.py) itself, and every backend after a fork.

``test_machinery_catches_broken_backend`` registers deliberately broken backends under a
test-only name and asserts the matrix's comparison fails on each, so the suite provably can fail
(and passes correct implementations with other rounding). ``test_backend_works_in_forked_child``
runs every CPU backend in a child forked after it ran.
"""
from __future__ import annotations


import pytest
import torch

from moe_ops import envs
import moe_ops
from moe_ops import backend as _backend
from moe_ops import reference as R
from tests.backends import backends_for
from tests.compare import assert_exact, assert_gating_equal
from tests.inputs import make_ids, make_logits, make_x
from tests.op_matrix import LOWP_DTYPES, check_op

# ------------------------------------------------------------- the suite provably can fail

FAKE = "broken_test_backend"


def _broken_ops(kind):
    def permute_garbage_padding(x, ids, E, bm):
        xs, ss, offs, rows = R.permute(x, ids, E, bm)
        return torch.where((ss < 0).unsqueeze(1), torch.full_like(xs, 1e-3), xs), ss, offs, rows

    def permute_unstable(x, ids, E, bm):
        xs, ss, offs, rows = R.permute(x, ids.flip(1), E, bm)  # wrong slot order within an expert
        return xs, ss, offs, rows

    def gating_ties_high(logits, k, scoring, renorm, ng, tg, bias, scale):  # mirror image: ties go high
        w, ids = R.topk_gating(logits.flip(1), k, scoring, renorm, ng, tg,
                               None if bias is None else bias.flip(0), scale)
        return w, (logits.shape[1] - 1 - ids).to(torch.int32)

    def gemm_lowp(a, b, offs, trans_b):  # accumulates in the input dtype
        out = R.grouped_gemm(a.to(torch.bfloat16), b.to(torch.bfloat16), offs, trans_b)
        return out.to(a.dtype)

    def gemm_nondeterministic(a, b, offs, trans_b):
        c = R.grouped_gemm(a, b, offs, trans_b)
        if c.numel():
            i = int(torch.randint(0, c.numel(), (1,)))
            c.view(-1)[i] = torch.nextafter(c.view(-1)[i], torch.tensor(float("inf"), dtype=c.dtype))
        return c

    def unpermute_reads_padding(y, rows, w, k):
        return R.unpermute(y, torch.where(rows < 0, torch.zeros_like(rows), rows), w, k)

    def combine_renormalizes(buf, ids, pos, w):
        if w is not None:
            w = torch.where(pos >= 0, w, torch.zeros_like(w))
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return R.capacity_combine(buf, ids, pos, w)

    def dispatch_token_major_always(x, ids, E, C, prio):
        return R.capacity_dispatch(x, ids, E, C, "token_major" if prio == "kmajor" else "kmajor")

    def gemm_split_k(a, b, offs, trans_b):  # legitimately different rounding: two K halves
        h = a.shape[1] // 2
        bb = b.transpose(1, 2) if trans_b else b
        lo = R.grouped_gemm(a[:, :h].float(), bb[:, :h].float(), offs, False)
        hi = R.grouped_gemm(a[:, h:].float(), bb[:, h:].float(), offs, False)
        return (lo + hi).to(a.dtype)

    def gating_own_sigmoid(logits, k, scoring, renorm, ng, tg, bias, scale):
        # a kernel-like router: sigmoid as 1/(1+exp(-x)) (other rounding), sum of weights in
        # reverse order -- legitimately different in the last bits
        if scoring != "sigmoid" or ng:
            return R.topk_gating(logits, k, scoring, renorm, ng, tg, bias, scale)
        x = logits.float()
        keys = 1.0 / (1.0 + torch.exp(-x)) + (0.0 if bias is None else bias.float())
        ids = R.rank_order(keys)[:, :k]
        w = (1.0 / (1.0 + torch.exp(-x))).gather(1, ids)
        if renorm:
            w = w / (w.flip(1).cumsum(1)[:, -1:] + 1e-20)
        return w * scale, ids.to(torch.int32)

    table = {
        "correct": ("permute", R.permute, (64, 8, 100, 8), 1),
        "correct_gating_other_rounding": ("topk_gating", gating_own_sigmoid, (257, 32, 13, 8), 2),
        "correct_gemm_split_k": ("grouped_gemm", gemm_split_k, (7, 3, 13, 200), 0),
        "permute_garbage_padding": ("permute", permute_garbage_padding, (8, 2, 100, 64), 1),
        "permute_unstable": ("permute", permute_unstable, (8, 2, 100, 64), 0),
        "gating_ties_to_higher_index": ("topk_gating", gating_ties_high, (64, 8, 100, 8), 5),
        "gemm_bf16_accumulation": ("grouped_gemm", gemm_lowp, (8, 2, 100, 64), 0),
        "gemm_nondeterministic": ("grouped_gemm", gemm_nondeterministic, (8, 2, 100, 64), 0),
        "unpermute_reads_padding": ("unpermute", unpermute_reads_padding, (7, 3, 13, 200), 4),
        "combine_renormalizes": ("capacity_combine", combine_renormalizes, (8, 2, 100, 64), 0),
        "dispatch_wrong_priority": ("capacity_dispatch", dispatch_token_major_always, (8, 2, 100, 64), 0),
    }
    return table[kind]


@pytest.fixture
def fake_backend(monkeypatch):
    """Registers ``FAKE`` for cpu; removed again after the test."""
    monkeypatch.setitem(_backend._LOADERS, FAKE, None)
    monkeypatch.setattr(_backend, "_LOADED", set(_backend._LOADED) | {FAKE})

    def install(op, fn):
        _backend.register(FAKE, ("cpu",), {op: fn})

    yield install
    _backend._BACKENDS.pop(FAKE, None)


@pytest.mark.parametrize("kind", ["correct", "correct_gemm_split_k", "correct_gating_other_rounding", "permute_garbage_padding", "permute_unstable",
                                  "gating_ties_to_higher_index", "gemm_bf16_accumulation",
                                  "gemm_nondeterministic", "unpermute_reads_padding",
                                  "combine_renormalizes", "dispatch_wrong_priority"])
def test_machinery_catches_broken_backend(fake_backend, kind):
    op, fn, case, idx = _broken_ops(kind)
    fake_backend(op, fn)
    assert FAKE in moe_ops.available_backends(op, "cpu")
    if kind.startswith("correct"):  # controls: the machinery passes correct implementations
        for dtype in LOWP_DTYPES:
            for i in range(idx, idx + 4):
                check_op(op, FAKE, "cpu", dtype, case, i)
        return
    with pytest.raises(AssertionError):
        check_op(op, FAKE, "cpu", torch.float32, case, idx)


def test_fake_backend_is_gone():
    assert FAKE not in moe_ops.available_backends()
    assert FAKE not in _backend._LOADERS


# ------------------------------------------------------------ fork: a child process gets the answer

FORK_TIMEOUT_S = 120


def _forked_child_check(conn, name):
    """In the forked child: gating and permute on ``name``, compared with the reference."""
    import faulthandler
    import sys

    try:
        # a hang shows where before the parent gives up (fd 2: pytest may have replaced sys.stderr)
        faulthandler.dump_traceback_later(FORK_TIMEOUT_S - 30, exit=True, file=sys.__stderr__)
        # GNU OpenMP's team does not survive a fork either, and that is torch's (a plain
        # torch.softmax hangs in the child once the parent ran a parallel region): one intra-op
        # thread, as DataLoader workers do. What is under test is the backends' own threads.
        torch.set_num_threads(1)
        logits = make_logits(13, 64, seed=7)
        w, ids = moe_ops.topk_gating(logits, 4, backend=name)
        assert_gating_equal(w, ids, logits, 4)
        x, ids2 = make_x(13, 8, seed=8), make_ids(13, 2, 8, seed=9)
        for o, r in zip(moe_ops.permute(x, ids2, 8, block_m=4, backend=name), R.permute(x, ids2, 8, 4)):
            assert_exact(o, r)
        conn.send("ok")
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the test
        conn.send(f"{type(e).__name__}: {e}")


@pytest.mark.skipif("libtsan" in (envs.raw("LD_PRELOAD") or ""),
                    reason="TSan does not support threads started after a multi-threaded fork")
@pytest.mark.parametrize("name", backends_for("topk_gating", "cpu"))
def test_backend_works_in_forked_child(name):
    """A process forked after the backend ran (multiprocessing's 'fork' start method, DataLoader
    workers) gets the reference's results, without hanging: thread pools do not survive a fork."""
    import multiprocessing

    logits = make_logits(13, 64, seed=7)
    moe_ops.topk_gating(logits, 4, backend=name)  # the parent has started the backend's threads
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_forked_child_check, args=(send, name))
    child.start()
    send.close()
    child.join(timeout=FORK_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{name}: the forked child did not finish in {FORK_TIMEOUT_S} s (hung)")
    try:
        msg = recv.recv()
    except EOFError:  # the child died without a word
        msg = f"no report, exit code {child.exitcode}"
    assert msg == "ok", f"{name} in a forked child: {msg}"
