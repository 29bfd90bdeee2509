"""Autotune the grouped-GEMM block configs on a GPU and write them as JSON (vLLM style).

    python -m moe_ops.triton_kernels.autotune --E 8 --H 4096 --I 14336 --topk 2 --dtype bf16 \
        --tokens 16 64 256 1024 4096

For each token count T: route T random tokens (softmax top-k of random logits), build the
index and tile schedule as the fused layer does, then time every candidate config of
GEMM1 (gather + SwiGLU; N = 2I, K = H) and GEMM2 (weight + scatter; N = H, K = I) with CUDA
events (median over repeats). GEMM2 candidates keep GEMM1's best BLOCK_M, because the fused
layer shares one tile schedule. Each candidate's output is checked against the default
config's before it may win. Results merge into
``configs/E=..,N=..,K=..,device_name=..,dtype=...json`` keyed by M = T*k.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

from . import index_build, topk_gating
from .configs import CONFIG_DIR, DTYPE_NAMES, config_filename, device_name, get_config
from .grouped_gemm import build_schedule, run_gemm

DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def candidates(block_m=None):
    for bm, bn, bk, gm, nw, ns in itertools.product(
            (16, 32, 64, 128) if block_m is None else (block_m,), (32, 64, 128, 256), (32, 64, 128),
            (1, 8), (4, 8), (2, 3, 4, 5)):
        if bm * bn >= 128 * 256 and nw == 4:  # too many accumulator registers per thread
            continue
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": nw, "num_stages": ns}


def _time(fn, repeats):
    fn()  # compile + warm up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tune(E, H, I, topk, dtype, T, repeats=20, verbose=True):
    dev = torch.device("cuda")
    torch.manual_seed(T)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    logits = torch.randn(T, E, device=dev)
    w1 = torch.randn(E, 2 * I, H, device=dev, dtype=dtype) * H ** -0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * I ** -0.5
    weights, ids = topk_gating.topk_gating(logits, topk, "softmax", False, 0, 0, None, 1.0)
    M = T * topk
    _, sorted_slots, offsets, _, _ = index_build.build_index(ids, E, block_m=1)
    h = torch.empty(M, I, device=dev, dtype=dtype)
    y = torch.empty(M, H, device=dev, dtype=dtype)

    def gemm1(cfg, sched):
        run_gemm(x, w1, h, offsets, sched, E, I, H, cfg, rows=M, trans_b=True, slots=sorted_slots, topk=topk, act=1)

    def gemm2(cfg, sched):
        run_gemm(h, w2, y, offsets, sched, E, H, I, cfg, rows=M, trans_b=True, slots=sorted_slots,
                 weights=weights.view(-1), scatter=True)

    best = {}
    for name, fn, out, (N, K), fixed_bm in (("gemm1", gemm1, h, (2 * I, H), None),
                                            ("gemm2", gemm2, y, (H, I), "gemm1")):
        bm = best[fixed_bm][1]["BLOCK_M"] if fixed_bm else None
        default = get_config(E, N, K, dtype, dev, M)
        if bm is not None:
            default = dict(default, BLOCK_M=bm)
        fn(default, build_schedule(offsets, E, default["BLOCK_M"], M))
        want = out.clone()
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        results = []
        for cfg in candidates(bm):
            sched = build_schedule(offsets, E, cfg["BLOCK_M"], M)
            try:
                out.fill_(float("nan"))
                fn(cfg, sched)
                torch.cuda.synchronize()
                if not torch.allclose(out.float(), want.float(), rtol=tol, atol=tol):
                    continue
                results.append((_time(lambda: fn(cfg, sched), repeats), cfg))
            except Exception as e:  # out of shared memory / registers: not a candidate here
                if verbose:
                    print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
        if not results:
            raise RuntimeError(f"autotune: no valid config for {name} at T={T}")
        results.sort(key=lambda r: r[0])
        best[name] = (results[0][0], results[0][1], N, K)
        if verbose:
            ms, cfg = results[0]
            flops = 2 * M * N * K
            print(f"T={T} {name} N={N} K={K}: {ms * 1e3:.1f} us, {flops / ms / 1e9:.1f} TFLOP/s  {cfg}")
    return M, best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--E", type=int, required=True)
    p.add_argument("--H", type=int, required=True)
    p.add_argument("--I", type=int, required=True, help="expert intermediate size (w_gate_up is [E, 2I, H])")
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=CONFIG_DIR, help="directory for the JSON files")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("autotune needs a CUDA GPU (configs are per device)")
    dtype = DTYPES[args.dtype]
    dev = device_name(torch.device("cuda"))
    tables = {}
    for T in args.tokens:
        M, best = tune(args.E, args.H, args.I, args.topk, dtype, T, args.repeats)
        for _, (_, cfg, N, K) in best.items():
            tables.setdefault((N, K), {})[str(M)] = cfg
    os.makedirs(args.out, exist_ok=True)
    for (N, K), table in tables.items():
        path = os.path.join(args.out, config_filename(args.E, N, K, dev, dtype))
        merged = {}
        if os.path.exists(path):
            with open(path) as f:
                merged = json.load(f)
        merged.update(table)
        with open(path, "w") as f:
            json.dump(dict(sorted(merged.items(), key=lambda kv: int(kv[0]))), f, indent=2)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
