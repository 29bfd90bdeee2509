"""What moe-ops' profiler ranges cost when no profiler runs (docs/profiling.md, "Cost").

    python bench/range_overhead.py            # this checkout
    PYTHONPATH=<older checkout> python bench/range_overhead.py --calls-only   # the same calls before

Times with ``time.thread_time`` (the calling thread's CPU time: other processes on a shared
machine do not count) and keeps the minimum over repeats. Prints the range plumbing alone
(a ``profiled`` call vs a bare call, an empty ``with stage()``, the two flag tests, and what
``record_function`` costs with no profiler) and tiny ``backend="cpu"`` calls on one thread.
Compare the calls across checkouts in alternating processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import timeit

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import moe_ops  # noqa: E402


def _best(stmt, n: int, repeat: int, globals_=None) -> float:
    """Minimum seconds per call."""
    t = timeit.Timer(stmt, globals=globals_, timer=time.thread_time)
    return min(t.repeat(number=n, repeat=repeat)) / n


def plumbing() -> str:
    from moe_ops import _profiling as P

    def f(a, b, *, c=None):
        return a

    def empty():
        pass

    def with_stage():
        with P.stage("router"):
            pass

    def with_rf():
        with torch.autograd.profiler.record_function("moe_ops.x"):
            pass
    g = dict(f=f, g=P.profiled(f), empty=empty, with_stage=with_stage, with_rf=with_rf,
             ic=torch.compiler.is_dynamo_compiling, AP=torch.autograd.profiler)
    ns = {k: _best(s, 200_000, 25, g) * 1e9 for k, s in
          dict(bare="f(1, 2, c=3)", profiled="g(1, 2, c=3)", empty="empty()", stage="with_stage()",
               dyn="ic()", flag="AP._is_profiler_enabled").items()}
    ns["rf"] = _best("with_rf()", 5000, 9, g) * 1e9
    return (f"| {torch.__version__} | +{ns['profiled'] - ns['bare']:.0f} | +{ns['stage'] - ns['empty']:.0f} | "
            f"{ns['dyn']:.0f} | {ns['flag']:.0f} | {ns['rf'] - ns['empty']:.0f} |")


def calls() -> str:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 4, 64, 64, 8, 2
    logits = torch.randn(T, E, generator=g)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    wgu = torch.randn(E, 2 * I, H, generator=g) * 0.1
    wd = torch.randn(E, H, I, generator=g) * 0.1
    cases = {
        "topk_gating": lambda: moe_ops.topk_gating(logits, k, backend="cpu"),
        "permute": lambda: moe_ops.permute(x, ids, E, backend="cpu"),
        "moe_forward": lambda: moe_ops.moe_forward(x, logits, wgu, wd, k, backend="cpu"),
        "moe_forward_capacity": lambda: moe_ops.moe_forward(x, logits, wgu, wd, k, backend="cpu",
                                                            capacity_factor=1.0),
    }
    out = []
    for name, fn in cases.items():
        fn()
        out.append(f"{name}={_best(fn, 1000, 15) * 1e6:.2f}us")
    return " ".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls-only", action="store_true", help="only the op calls (a checkout without the ranges)")
    args = p.parse_args(argv)
    if not args.calls_only:
        print("| torch | profiled call ns | empty `with stage()` ns | is_dynamo_compiling() ns | flag ns | "
              "record_function, no profiler, ns |")
        print(plumbing())
    print(calls())
    return 0


if __name__ == "__main__":
    sys.exit(main())
