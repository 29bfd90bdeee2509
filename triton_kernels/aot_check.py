"""Compile every Triton kernel variant of this backend for a GPU architecture, without a GPU.

    python -c "import moe_ops._register_triton; from moe_ops.triton_kernels import aot_check; aot_check.main()" --arch 90

Catches what the CPU interpreter cannot: code that does not lower to PTX/SASS (type errors in
loop-carried values, unsupported ops, register spills). Arguments are specialised the way the
runtime JIT does it (unit strides as constants, pointers and sizes divisible by 16), so the
reported shared memory and instruction choice (wgmma, cp.async pipelining) are what a launch
would get. Needs TRITON_INTERPRET unset (the interpreter replaces triton.jit).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys

import triton
import triton.language as tl

P = "*"


def _compile(fn, ptrs, consts, ones=(), div=(), arch=90, num_warps=4, num_stages=3):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    consts = dict(consts, **{n: 1 for n in ones})
    sig = {p: "constexpr" if p in consts else ptrs.get(p, "i32") for p in params}
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n in list(ptrs) + list(div) if n in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def variants():
    """(name, kernel, pointer types, constexprs, unit-stride args, divisible args, warps, stages)."""
    from . import grouped_gemm as GG, index_build as IX, topk_gating as RT, weighted_combine as CB
    out = []
    gemm_div = ("N", "K", "stride_am", "stride_be", "stride_bn", "stride_cm")
    for dt, acc, prec, (bm, bn, bk, nw, ns) in (
            ("bf16", tl.float32, "tf32", (128, 128, 64, 8, 4)), ("fp16", tl.float32, "tf32", (64, 128, 64, 4, 4)),
            ("fp32", tl.float32, "ieee", (64, 64, 32, 4, 3)), ("fp64", tl.float64, "ieee", (32, 32, 16, 4, 2))):
        wt = "*fp64" if dt == "fp64" else "*fp32"
        ptrs = dict(a_ptr=P + dt, b_ptr=P + dt, c_ptr=P + dt, offs_ptr="*i32", sched_ptr="*i32", slots_ptr="*i32", w_ptr=wt)
        for act, gather, scatter, zero in ((0, False, False, True), (1, True, False, False),
                                           (2, True, False, False), (0, False, True, False)):
            consts = dict(NUM_PROGS=132, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, GATHER=gather, ACT=act,
                          SCATTER=scatter, ZERO_OUTSIDE=zero, PRECISION=prec, ACC_DTYPE=acc)
            out.append((f"grouped_gemm {dt} act={act} gather={gather} scatter={scatter}", GG._grouped_gemm_kernel,
                        ptrs, consts, ("stride_ak", "stride_bk", "stride_cn"), gemm_div, nw, ns))
        out.append((f"wgrad {dt}", GG._grouped_gemm_wgrad_kernel, dict(a_ptr=P + dt, dc_ptr=P + dt, db_ptr=P + dt, offs_ptr="*i32"),
                    dict(NUM_PROGS=132, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, PRECISION=prec, ACC_DTYPE=acc),
                    ("stride_ak", "stride_dn"), ("K", "N", "stride_am", "stride_dm"), 4, 3))
    i32 = "*i32"
    out.append(("schedule", GG._gemm_tile_schedule_kernel, dict(offs_ptr=i32, sched_ptr=i32),
                dict(BLOCK_M=64, BLOCK_EXP=128, SEARCH_STEPS=9), (), (), 4, 1))
    for km in (False, True):
        out.append((f"rank kmajor={km}", IX._expert_rank_kernel, dict(ids_ptr=i32, rank_ptr=i32, counts_ptr=i32, inv_ptr=i32),
                    dict(K=8, KMAJOR=km, BLOCK=IX.BLOCK_S, BLOCK_EXP=IX.BLOCK_E, FILL=IX.FILL_BLOCK), (), (), 4, 1))
        out.append((f"place capacity={km}", IX._slot_place_kernel,
                    dict(ids_ptr=i32, rank_ptr=i32, base_ptr=i32, offs_ptr=i32, slotmap_ptr=i32, inv_ptr=i32),
                    dict(K=8, KMAJOR=km, CAPACITY=km, BLOCK=IX.BLOCK_S), (), (), 4, 1))
    for cap, sched in ((False, True), (True, False)):
        out.append((f"scan capacity={cap} sched={sched}", IX._expert_scan_kernel,
                    dict(counts_ptr=i32, base_ptr=i32, out0_ptr=i32, out1_ptr=i32, sched_ptr=i32),
                    dict(CAPACITY=cap, SCHED=sched, BLOCK_EXP=IX.BLOCK_E, BLOCK_BLK=IX.BLOCK_B, SEARCH_STEPS=9),
                    (), (), 4, 1))
    out.append(("gather_rows bf16", IX._gather_rows_kernel, dict(x_ptr="*bf16", inv_ptr=i32, out_ptr="*bf16"),
                dict(K=2, BLOCK_R=32, BLOCK_H=128), (), ("H", "stride_x"), 4, 1))
    for mode in (0, 1, 2):
        out.append((f"combine mode={mode}", CB._combine_kernel,
                    dict(y_ptr="*bf16", map_ptr=i32, ids_ptr=i32, w_ptr="*fp32", out_ptr="*bf16"),
                    dict(K=8, MODE=mode, HAS_W=mode != 2, BLOCK_T=4, BLOCK_H=256, ACC=tl.float32), (), ("H",), 4, 1))
    for ng, g, grouped, sig, comp, bt, nw in ((1, 256, False, False, tl.float32, 8, 4), (8, 32, True, True, tl.float32, 8, 4),
                                              (1, 4096, False, False, tl.float32, 1, 8), (1, 8, False, True, tl.float64, 16, 4)):
        out.append((f"topk_gating E={ng * g} grouped={grouped} {comp}", RT._topk_gating_kernel,
                    dict(logits_ptr="*bf16", bias_ptr="*fp32", w_ptr="*fp64" if comp == tl.float64 else "*fp32",
                         ids_ptr=i32, scaling_factor="fp32"),
                    dict(K=8, K_PAD=8, NG_PAD=ng, G_PAD=g, BLOCK_T=bt, SIGMOID=sig, HAS_BIAS=sig, RENORM=True,
                         GROUPED=grouped, COMPUTE=comp, SCALE=True), (), (), nw, 1))
    return out


def check(arch: int, verbose: bool = True):
    """Compile every variant for sm_<arch>; returns a list of failure strings (empty = all OK)."""
    failures = []
    for name, fn, ptrs, consts, ones, div, nw, ns in variants():
        try:
            k = _compile(fn, ptrs, consts, ones, div, arch, nw, ns)
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures.append(f"sm_{arch} {name}: {type(e).__name__}: {str(e)[:500]}")
            continue
        ptx = k.asm["ptx"]
        spills = [int(n) for n in re.findall(r"\.local \.align \d+ \.b8 \S+\[(\d+)\]", ptx)]
        notes = [w for w in ("wgmma", "mma.sync", "cp.async") if w in ptx]
        if spills:
            failures.append(f"sm_{arch} {name}: {sum(spills)} bytes of local memory (register spills)")
        if verbose:
            print(f"sm_{arch} {name}: shared {k.metadata.shared} B {' '.join(notes)}")
    return failures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    args = p.parse_args(argv)
    failures = []
    for arch in args.arch or [90]:
        failures += check(arch)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
