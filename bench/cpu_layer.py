"""CPU layer forward vs transformers and the roofline, robust to a shared machine.

    PYTHONPATH=. python bench/cpu_layer.py --E 64 --T 512 --H 1024 --I 2048 --k 2 --dtype bf16
    PYTHONPATH=. python bench/cpu_layer.py --decode --E 64 --H 1024 --I 2048 --k 2     # cold-weight decode

Implementations are timed round-robin (rep 1 of every implementation, then rep 2, ...) so
background load hits all of them alike; reported are medians of wall time and of process CPU
time (CPU time excludes time spent descheduled, a proxy for a quiet machine). Implementations:

* ``cpu``: ``moe_forward(..., backend="cpu")`` (router kernel + fused_experts);
* ``cpu_experts``: ``moe_ops::fused_experts`` alone (routing given);
* ``cpu_packed``: ``moe_forward(..., backend="cpu", packed=moe_ops.pack_experts(...))``: the same
  layer on weights repacked once into 16-column panels (the packing time is printed separately:
  a load-time cost); ``cpu_packed_experts``: ``moe_ops::fused_experts_packed`` alone;
* ``hf_grouped_mm`` / ``hf_eager``: transformers' MixtralExperts (default grouped_mm path /
  eager per-expert loop) behind transformers' router math;
* ``hf_block_moe_ops``: a transformers MixtralSparseMoeBlock (its own router, random weights) on
  these expert weights as stored, patched by ``apply_moe_ops`` (what the HF integration runs);
* ``kt_kernel``: KTransformers' kt-kernel bf16 MoE (bench/kt_peer.py; only when installed, bf16)
  behind the same router math as the transformers rows; ``kt_kernel_experts``: its experts alone
  on moe_ops' routing (as ``cpu_experts``). Its worker threads spin for a while after each call, so
  the round-robin sleeps ``bench.kt_peer.SETTLE_S`` (untimed) after each kt-kernel call;
* ``dense``: matmuls with the layer's FLOPs in the layer dtype; ``dense_fp32``: the same in
  float32 (MKL sgemm: on a CPU without native bf16 GEMM this is the real compute ceiling);
* ``weight_read``: one read of the touched experts' weights (amax over an int32 view).

floor = max(min(dense, dense_fp32), weight_read) (``bench.report.floor_ms``, the harness's definition).

``--decode``: cold-weight decode instead (bench/decode.py): T in ``--decode-tokens`` (1,2,4,8),
routing that changes every call, touched bytes / GB/s / % of the stream read bandwidth measured
in the same run; impls from ``cpu,cpu_packed,kt_kernel,weight_read``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import moe_ops

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import decode, kt_peer  # noqa: E402
from bench.report import floor_ms  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def hf_experts(E, H, I, k, wgu, wd, impl):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                        hidden_act="silu")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        ex = MixtralExperts(cfg)
    ex.gate_up_proj = torch.nn.Parameter(wgu, requires_grad=False)
    ex.down_proj = torch.nn.Parameter(wd, requires_grad=False)
    return ex


def hf_block(E, H, I, k, wgu, wd, logits):
    """A transformers MixtralSparseMoeBlock (router + experts) with these weights, patched by
    apply_moe_ops: what a user of the HF integration runs by default (weights as stored). The
    router's weight is chosen so that its logits for ``x`` are ``logits`` would need a solve; it
    is random instead, so the block routes differently from the other rows (same E, k)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from moe_ops.integrations.transformers import apply_moe_ops
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k,
                        hidden_act="silu")
    with torch.device("meta"):
        blk = MixtralSparseMoeBlock(cfg)
    blk.experts.gate_up_proj = torch.nn.Parameter(wgu, requires_grad=False)
    blk.experts.down_proj = torch.nn.Parameter(wd, requires_grad=False)
    g = torch.Generator().manual_seed(1)
    blk.gate.weight = torch.nn.Parameter((torch.randn(E, H, generator=g) * H ** -0.5).to(wgu.dtype),
                                         requires_grad=False)
    apply_moe_ops(blk)
    return blk


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--H", type=int, default=1024)
    p.add_argument("--I", type=int, default=2048)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=sorted(DT))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--impls", default=None,
                   help="comma list (default: cpu,cpu_packed,cpu_experts,cpu_packed_experts,hf_grouped_mm,hf_eager,"
                        "kt_kernel,dense,dense_fp32,weight_read; with --decode: " + ",".join(decode.DEFAULT_IMPLS) + "; also, "
                        "both ways: " + ",".join(decode.QUANT_IMPLS) + ", the layer on int8/fp8/mxfp4 copies of the weights)")
    p.add_argument("--decode", action="store_true", help="cold-weight decode rows (bench/decode.py) instead")
    p.add_argument("--decode-tokens", default="1,2,4,8")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.decode:
        return main_decode(a)
    if a.impls is None:
        a.impls = "cpu,cpu_packed,cpu_experts,cpu_packed_experts,hf_grouped_mm,hf_eager,kt_kernel,dense,dense_fp32," \
                  "weight_read"
    dt = DT[a.dtype]
    E, T, H, I, k = a.E, a.T, a.H, a.I, a.k
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).to(dt)
    logits = torch.randn(T, E, generator=g)
    wgu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dt)
    wd = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dt)
    weights, ids = moe_ops.topk_gating(logits, k)
    hit = int((torch.bincount(ids.reshape(-1).long(), minlength=E) > 0).sum())
    flops = 2 * T * k * 3 * H * I

    impls = {}
    want = a.impls.split(",")
    if "cpu" in want:
        impls["cpu"] = lambda: moe_ops.moe_forward(x, logits, wgu, wd, k, backend="cpu")
    if "cpu_experts" in want:
        impls["cpu_experts"] = lambda: torch.ops.moe_ops.fused_experts(x, ids, weights, wgu, wd, "swiglu")
    if "cpu_packed" in want or "cpu_packed_experts" in want:
        t0 = time.perf_counter()
        packed = moe_ops.pack_experts(wgu, wd)
        print(f"pack_experts (once, at load, layout {packed.layout}): {(time.perf_counter() - t0) * 1e3:.1f} ms")
        if "cpu_packed" in want:
            impls["cpu_packed"] = lambda: moe_ops.moe_forward(x, logits, wgu, wd, k, backend="cpu", packed=packed)
        if "cpu_packed_experts" in want:
            impls["cpu_packed_experts"] = lambda: torch.ops.moe_ops.fused_experts_packed(
                x, ids, weights, packed.w_gate_up, packed.w_down, "swiglu")
    for name, fmt in decode.QUANT_IMPLS.items():  # the same layer on quantized copies of the weights
        if name in want:
            (q1, s1), (q2, s2) = moe_ops.quantize_experts(wgu, fmt), moe_ops.quantize_experts(wd, fmt)
            impls[name] = lambda q1=q1, s1=s1, q2=q2, s2=s2, fmt=fmt: moe_ops.moe_forward(
                x, logits, q1, q2, k, backend="cpu", weight_format=fmt, w_gate_up_scale=s1, w_down_scale=s2)
    for impl in ("grouped_mm", "eager"):
        if f"hf_{impl}" in want:
            ex = hf_experts(E, H, I, k, wgu, wd, impl)

            def hf(ex=ex):
                w, i = torch.topk(torch.softmax(logits, -1), k, dim=-1)
                return ex(x, i, w)
            impls[f"hf_{impl}"] = hf
    if "hf_block_moe_ops" in want:
        blk = hf_block(E, H, I, k, wgu, wd, logits)
        impls["hf_block_moe_ops"] = lambda: blk(x.unsqueeze(0))
    if "kt_kernel" in want or "kt_kernel_experts" in want:
        why = kt_peer.load()[1] or ("" if dt == torch.bfloat16 else "kt-kernel's bf16 MoE needs --dtype bf16")
        if why:
            print(f"kt_kernel skipped: {why}")
        else:
            kt = kt_peer.KTExperts(wgu, wd, k, max_tokens=T)
            print(f"kt_kernel: kt-kernel {kt_peer.variant()} build, {kt.kernel}, {kt.threads} worker threads")
            if "kt_kernel" in want:
                def kt_layer():
                    w, i = torch.topk(torch.softmax(logits, -1), k, dim=-1)
                    return kt(x, i, w)
                impls["kt_kernel"] = kt_layer
            if "kt_kernel_experts" in want:
                impls["kt_kernel_experts"] = lambda: kt(x, ids, weights)
    M = T * k
    for name, ddt in (("dense", dt), ("dense_fp32", torch.float32)):
        if name in want:
            mats = [(torch.randn(M, H).to(ddt), torch.randn(H, 2 * I).to(ddt)),
                    (torch.randn(M, I).to(ddt), torch.randn(I, H).to(ddt))]
            impls[name] = lambda mats=mats: [u @ v for u, v in mats]
    if "weight_read" in want:
        views = [w[:hit].reshape(-1).view(torch.int32) for w in (wgu, wd)]
        impls["weight_read"] = lambda: [torch.amax(v) for v in views]

    with torch.inference_mode():
        ref = moe_ops.moe_forward(x, logits, wgu, wd, k, backend="cpu") if "cpu" in impls else None
        wall = {n: [] for n in impls}
        cpu = {n: [] for n in impls}
        errs = {}
        for n, f in impls.items():  # warm-up, and each layer's output against moe_ops cpu
            out = f()
            if ref is not None and isinstance(out, torch.Tensor) and out.shape == ref.shape and n != "cpu":
                errs[n] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            if n.startswith("kt_kernel"):
                time.sleep(kt_peer.SETTLE_S)
        for _ in range(a.reps):
            for n, f in impls.items():
                c0, t0 = time.process_time(), time.perf_counter()
                f()
                t1, c1 = time.perf_counter(), time.process_time()
                wall[n].append((t1 - t0) * 1e3)
                cpu[n].append((c1 - c0) * 1e3)
                if n.startswith("kt_kernel"):
                    time.sleep(kt_peer.SETTLE_S)
    try:
        load = open("/proc/loadavg").read().split()[0]
    except OSError:
        load = "?"
    med = {n: statistics.median(v) for n, v in wall.items()}
    medc = {n: statistics.median(v) for n, v in cpu.items()}
    floor = floor_ms(med) or float("nan")  # bench/report.py FLOOR_DEFINITION
    print(f"E={E} T={T} H={H} I={I} k={k} {a.dtype} threads={torch.get_num_threads()} touched={hit} "
          f"reps={a.reps} load={load} kernels={moe_ops.build_info().get('cpu')}")
    if errs:
        print("rel err vs cpu: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    print(f"{'impl':18s} {'wall ms':>9s} {'(min..max)':>19s} {'cpu ms':>9s} {'GFLOP/s':>8s} {'vs cpu':>7s}")
    for n in impls:
        v = wall[n]
        rel = med[n] / med["cpu"] if "cpu" in med else float("nan")
        print(f"{n:18s} {med[n]:9.2f} ({min(v):8.2f}..{max(v):8.2f}) {medc[n]:9.2f} "
              f"{flops / med[n] / 1e6:8.1f} {rel:7.2f}")
    for n in ("cpu", "cpu_packed"):
        if n in med:
            print(f"floor {floor:.2f} ms; {n} / floor = {med[n] / floor:.2f}"
                  + "".join(f"; {b} / {n} = {med[b] / med[n]:.2f}" for b in ("hf_grouped_mm", "hf_eager", "kt_kernel")
                            if b in med))


def main_decode(a):
    tokens = [int(t) for t in a.decode_tokens.split(",") if t]
    impls = decode.optional_impls(a.impls)
    dt = DT[a.dtype]
    rows = decode.run(a.E, a.H, a.I, a.k, tokens, dtype=dt, impls=impls, reps=a.reps, log=print)
    try:
        load = open("/proc/loadavg").read().split()[0]
    except OSError:
        load = "?"
    print(decode.table(rows, f"cold-weight decode: E={a.E} H={a.H} I={a.I} k={a.k} {a.dtype} "
                             f"threads={torch.get_num_threads()} reps={a.reps} load={load} LLC "
                             f"{decode.llc_bytes() >> 20} MiB kernels={moe_ops.build_info().get('cpu')}"))
    return rows


if __name__ == "__main__":
    main()
