"""permute / unpermute bandwidth on CPU vs `Tensor.copy_` (the issue's baseline) and vs `clone()`.

GB/s counts bytes read + written, the same way as `python -m bench` (bench/cases.py):
  permute    2 * T*k*H * e       (each routed slot reads its token row and writes one x_sorted row)
  unpermute  (T*k*H + T*H) * e   (reads T*k rows of y_sorted, writes T rows)
The baselines move the same number of bytes: `dst.copy_(src)` into a preallocated tensor of
T*k*H (permute) or (T*k*H + T*H)/2 (unpermute) elements, and `src.clone()` of the same tensor (an
allocating copy: what an op that returns a fresh tensor pays at best with the default allocator).
ratio = op GB/s / baseline GB/s = baseline time / op time.

1 thread: process CPU time (robust on a shared machine); 2 threads: wall time. Medians of --reps,
implementations timed round-robin (rep i of each before rep i+1); each timed call directly follows
an untimed call of the same function, so every implementation is timed in its own steady state
(its buffers as warm as repeated calls leave them), not in whatever the previous function left in
the caches. Prints a markdown table.

    PYTHONPATH=. python bench/cpu_permute.py                       # the full matrix
    PYTHONPATH=. python bench/cpu_permute.py --T 4096 --k 8 --dtypes bf16 --threads 1
    PYTHONPATH=. python bench/cpu_permute.py --capacity 1.25      # + capacity_dispatch / combine
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_ops  # noqa: E402
import moe_ops._C  # noqa: E402,F401
from moe_ops import envs

ops = torch.ops.moe_ops
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure(fns, reps, threads):
    """Median seconds per function; process time for 1 thread, wall time otherwise."""
    clock = time.process_time if threads == 1 else time.perf_counter
    res = {n: [] for n in fns}
    for f in fns.values():  # warm-up (also fills the host cache)
        f()
        f()
    for _ in range(reps):
        for n, f in fns.items():
            f()  # untimed: each timed call follows a call of the same function (steady state)
            t0 = clock()
            f()
            res[n].append(clock() - t0)
    return {n: statistics.median(v) for n, v in res.items()}


def run_point(T, E, k, H, dtype, threads, reps):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.topk(torch.randn(T, E, generator=g), k).indices.int()
    w = torch.rand(T, k, generator=g)
    p = ops.permute(x, ids, E, 1)
    y = torch.randn(p[0].shape, generator=g).to(dtype)
    S, e = T * k, x.element_size()
    perm_bytes = 2 * S * H * e
    unp_bytes = (S * H + T * H) * e
    cp_src = torch.randn(S * H, generator=g).to(dtype)
    cp_dst = torch.empty_like(cp_src)
    cu_src = torch.randn((S * H + T * H) // 2, generator=g).to(dtype)
    cu_dst = torch.empty_like(cu_src)
    fns = {
        "permute": lambda: ops.permute(x, ids, E, 1),
        "unpermute": lambda: ops.unpermute(y, p[3], w, k),
        "copy_p": lambda: cp_dst.copy_(cp_src),
        "clone_p": lambda: cp_src.clone(),
        "copy_u": lambda: cu_dst.copy_(cu_src),
        "clone_u": lambda: cu_src.clone(),
    }
    t = measure(fns, reps, threads)
    gb = lambda n, b: b / t[n] / 1e9  # noqa: E731
    return {
        "perm_ms": t["permute"] * 1e3, "perm_gbs": gb("permute", perm_bytes),
        "unp_ms": t["unpermute"] * 1e3, "unp_gbs": gb("unpermute", unp_bytes),
        "copy_p": gb("copy_p", perm_bytes), "clone_p": gb("clone_p", perm_bytes),
        "copy_u": gb("copy_u", unp_bytes), "clone_u": gb("clone_u", unp_bytes),
    }


def run_capacity_point(T, E, k, H, dtype, threads, reps, factor):
    """capacity_dispatch / capacity_combine (kmajor, capacity = ceil(factor * T*k / E)) vs copy_
    of the same bytes: dispatch reads the kept rows and writes all E*C rows of buf (unused rows
    zero-filled); combine reads the kept rows and writes T rows."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.topk(torch.randn(T, E, generator=g), k).indices.int()
    w = torch.rand(T, k, generator=g)
    C = -(-int(factor * T * k) // E)
    buf, pos = ops.capacity_dispatch(x, ids, E, C, "kmajor")[:2]
    kept, e = int((pos >= 0).sum()), x.element_size()
    d_bytes, c_bytes = (kept + E * C) * H * e, (kept + T) * H * e
    srcs = {n: torch.randn(b // e // 2, generator=g).to(dtype) for n, b in (("d", d_bytes), ("c", c_bytes))}
    dsts = {n: torch.empty_like(v) for n, v in srcs.items()}
    t = measure({
        "dispatch": lambda: ops.capacity_dispatch(x, ids, E, C, "kmajor"),
        "combine": lambda: ops.capacity_combine(buf, ids, pos, w),
        "copy_d": lambda: dsts["d"].copy_(srcs["d"]),
        "copy_c": lambda: dsts["c"].copy_(srcs["c"]),
    }, reps, threads)
    return C, {"d_ms": t["dispatch"] * 1e3, "d_gbs": d_bytes / t["dispatch"] / 1e9, "d_ratio": t["copy_d"] / t["dispatch"],
               "c_ms": t["combine"] * 1e3, "c_gbs": c_bytes / t["combine"] / 1e9, "c_ratio": t["copy_c"] / t["combine"]}


def _points(a):
    """(dtype name, T, k, threads) of every point the arguments ask for, in table order."""
    for dn in a.dtypes.split(","):
        for T in (int(v) for v in a.T.split(",")):
            for k in (int(v) for v in a.k.split(",")):
                for th in (int(v) for v in a.threads.split(",")):
                    yield dn, T, k, th


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="512,4096")
    ap.add_argument("--k", default="2,8")
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--H", type=int, default=1024)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--capacity", type=float, default=0.0,
                    help="also time capacity_dispatch/combine with this capacity factor (e.g. 1.25)")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, load {open('/proc/loadavg').read().split()[0]}, "
          f"MOE_OPS_CPU_CACHE_MB={envs.raw('MOE_OPS_CPU_CACHE_MB') or '(default)'}, "
          f"E={a.E}, H={a.H}, medians of {a.reps}, kernels {moe_ops.build_info().get('cpu')}\n")
    print("| dtype | T | k | threads (clock) | permute ms | GB/s | / copy_ | / clone | "
          "unpermute ms | GB/s | / copy_ | / clone | copy_ GB/s (p / u) | clone GB/s (p / u) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dn, T, k, th in _points(a):
        r = run_point(T, a.E, k, a.H, DTYPES[dn], th, a.reps)
        clock = "cpu" if th == 1 else "wall"
        print(f"| {dn} | {T} | {k} | {th} ({clock}) | {r['perm_ms']:.3f} | {r['perm_gbs']:.1f} | "
              f"**{r['perm_gbs'] / r['copy_p']:.2f}** | {r['perm_gbs'] / r['clone_p']:.2f} | "
              f"{r['unp_ms']:.3f} | {r['unp_gbs']:.1f} | **{r['unp_gbs'] / r['copy_u']:.2f}** | "
              f"{r['unp_gbs'] / r['clone_u']:.2f} | {r['copy_p']:.1f} / {r['copy_u']:.1f} | "
              f"{r['clone_p']:.1f} / {r['clone_u']:.1f} |", flush=True)
    if a.capacity > 0:
        print("\n| dtype | T | k | threads (clock) | C | capacity_dispatch ms | GB/s | / copy_ | "
              "capacity_combine ms | GB/s | / copy_ |")
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for dn, T, k, th in _points(a):
            C, r = run_capacity_point(T, a.E, k, a.H, DTYPES[dn], th, a.reps, a.capacity)
            clock = "cpu" if th == 1 else "wall"
            print(f"| {dn} | {T} | {k} | {th} ({clock}) | {C} | {r['d_ms']:.3f} | {r['d_gbs']:.1f} | "
                  f"**{r['d_ratio']:.2f}** | {r['c_ms']:.3f} | {r['c_gbs']:.1f} | **{r['c_ratio']:.2f}** |",
                  flush=True)
    try:  # absent in builds without csrc/cpu/host_alloc.cpp
        s = torch.ops.moe_cpu_cache.stats()
        print(f"\nhost cache: cached {s[0] / 2**20:.0f} MiB (cap {s[1] / 2**20:.0f} MiB), "
              f"hits {s[3]}, misses {s[4]}")
    except (AttributeError, RuntimeError):
        pass


if __name__ == "__main__":
    main()
