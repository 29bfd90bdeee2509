"""Scratch micro-benchmark of issue 15 (oneDNN brgemm vs moe_ops' AVX512-BF16 kernels).

One expert's GEMMs, bf16 x bf16 -> f32, one thread, cold weights (R copies rotated, more than
L3): GEMM1 M x 4096 x 1024 and GEMM2 M x 1024 x 2048 for M in {16, 32, 64, 128}.

  brgemm_nbXX   at::native::cpublas::brgemm per column block of XX columns, B in oneDNN's VNNI
                layout ([K/2][XX][2] per block, packed here with torch ops: cpublas::pack needs AMX)
  vnni          moe_ops gemm_panels_vnni (16-column VNNI panels, the pack_experts 'vnni' layout)
  repack        the weights as stored ([N, K]) as fused_experts runs them: each 32-column block
                repacked to VNNI in a cache-resident buffer, then the vnni kernel
  torch_mm      torch.mm(A, W.t()) (oneDNN), 1 thread

  PYTHONPATH=. python bench/cpu_brgemm_micro.py
Needs a CPU with AVX512-BF16 and GCC >= 10.
"""
import argparse
import os
import time

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma", "-mavx2",
         "-DMOE_CPU_AVX512_NS=avx512_native", f"-I{ROOT}/csrc/cpu"]


def build():
    src = [f"{ROOT}/bench/cpu_brgemm_micro.cpp", f"{ROOT}/csrc/cpu/gemm_vnni_avx512.cpp",
           f"{ROOT}/csrc/cpu/pack_vnni_avx512.cpp"]
    return load("moe_brgemm_micro", src, extra_cflags=FLAGS, verbose=False)


def vnni_blocks(w, nb):
    """w[R, N, K] -> [R, N/nb, K/2, nb, 2]: per nb-column block, K/2 rows of nb (k, k+1) pairs."""
    R, N, K = w.shape
    return w.view(R, N // nb, nb, K // 2, 2).permute(0, 1, 3, 2, 4).contiguous()


def check(ext):
    """Is a brgemm output row independent of M, and bitwise the vnni kernel's?"""
    for N, K in ((64, 1024), (64, 2048), (32, 64), (16, 4096)):
        w = torch.randn(1, N, K).bfloat16()
        A = torch.randn(300, K).bfloat16()
        P = vnni_blocks(w, 16)
        full = {}
        for nb in (16, 32, 64):
            if N % nb:
                continue
            Bv = vnni_blocks(w, nb)
            outs = []
            for M in (1, 2, 3, 5, 7, 11, 16, 17, 32, 33, 64, 100, 128, 256, 300):
                C = torch.full((M, N), float("nan"))
                ext.run_brgemm(A[:M].contiguous(), Bv, C, nb, 0)
                outs.append(C)
            full[nb] = outs[-1]
            same_m = all(torch.equal(o, outs[-1][: o.shape[0]]) for o in outs)
            C = torch.full((300, N), float("nan"))
            ext.run_panels(A, P, C, 0)
            print(f"N={N} K={K} nb={nb}: rows independent of M: {same_m}; "
                  f"bitwise == moe_ops vnni kernel: {torch.equal(C, outs[-1])}; "
                  f"max |diff| vs vnni {(C - outs[-1]).abs().max().item():.3g}")
        print(f"  nb-independent: {all(torch.equal(v, full[16]) for v in full.values())}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--Ms", default="16,32,64,128")
    p.add_argument("--nbs", default="16,32,64")
    p.add_argument("--check", action="store_true", help="only the bitwise checks (M dependence, vs vnni)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--R", type=int, default=0, help="weight copies (0: > 96 MB of weights)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ext = build()
    print(f"cpublas::could_pack(bf16) = {ext.could_pack()}")
    if not ext.could_pack():
        try:
            ext.onednn_pack(torch.randn(64, 64).bfloat16())
        except RuntimeError as e:
            print(f"cpublas::pack: {str(e).splitlines()[0]}")
    torch.manual_seed(0)
    if args.check:
        return check(ext)
    nbs = [int(v) for v in args.nbs.split(",")]
    print("| GEMM | M | " + " | ".join([f"brgemm_nb{nb}" for nb in nbs] + ["vnni", "repack", "torch_mm"])
          + " |  (GFLOP/s, 1 thread)")
    for name, N, K in (("GEMM1", 4096, 1024), ("GEMM2", 1024, 2048)):
        R = args.R or max(2, (96 << 20) // (N * K * 2) + 1)
        w = torch.randn(R, N, K).bfloat16()
        t0 = time.perf_counter()
        packs = {nb: vnni_blocks(w, nb) for nb in nbs}
        pack_ms = (time.perf_counter() - t0) * 1e3 / R / len(nbs)
        P = vnni_blocks(w, 16)
        for M in [int(v) for v in args.Ms.split(",")]:
            A = torch.randn(M, K).bfloat16()
            ref = A.float() @ w[0].float().t()
            C = torch.full((M, N), float("nan"))
            row = []
            for nb in nbs:
                ext.run_brgemm(A, packs[nb][:1], C, nb, 1)
                assert torch.allclose(C, ref, rtol=1e-2, atol=1e-1), f"brgemm nb{nb} wrong"
                row.append(ext.run_brgemm(A, packs[nb], C, nb, args.reps))
            ext.run_panels(A, P[:1], C, 1)
            assert torch.allclose(C, ref, rtol=1e-2, atol=1e-1), "vnni wrong"
            row.append(ext.run_panels(A, P, C, args.reps))
            ext.run_repack(A, w[:1], C, 1)
            assert torch.allclose(C, ref, rtol=1e-2, atol=1e-1), "repack wrong"
            row.append(ext.run_repack(A, w, C, args.reps))
            torch.mm(A, w[0].t())
            t0 = time.perf_counter()
            for i in range(args.reps):
                torch.mm(A, w[(i + 1) % R].t())
            row.append((time.perf_counter() - t0) / args.reps)
            flop = 2.0 * M * N * K
            print(f"| {name} {M}x{N}x{K} | {M} | " + " | ".join(f"{flop / s / 1e9:.0f}" for s in row) + " |")
        print(f"VNNI block pack with torch ops (permute+contiguous): {pack_ms:.2f} ms per [{N},{K}] weight")


if __name__ == "__main__":
    main()
