"""Grouped expert GEMM on weight-only quantized experts, dequantized inside the GEMM mainloop.

``c[M, N]``: rows ``offs[e]:offs[e+1]`` of ``a[M, K]`` times ``dequant(b[e]).T``, with ``b`` in the
checkpoint layout ``[E, N, K]`` (``[out, in]``; moe_ops/quant.py has the formats). One persistent
launch for all experts over the same device-built tile schedule as :mod:`.grouped_gemm`
(``build_schedule``); rows outside ``[offs[0], offs[E])`` are written as zeros.

Each B tile ``[BLOCK_K, BLOCK_N]`` is loaded quantized (1 byte a weight, half a byte for mxfp4),
decoded to exact values (an fp8 / e2m1 / int8 value is exact in fp16, bf16 and fp32), converted to
``a``'s dtype for ``tl.dot`` and the scale applied where the format has it constant:

* ``fp8_e4m3`` block scales change along K every ``block_k`` columns: BLOCK_K is chosen to divide
  ``block_k`` so a K tile sits in one scale block, and the tile's partial product (float32) is
  multiplied by the per-column scale vector ``scale_inv[e, n // block_n, k0 // block_k]`` before it
  is added (DeepSeek's per-block accumulation). When ``block_k`` has no power-of-two divisor >= 16
  (a non-default block size such as 100), the tile is dequantized element by element in float32
  instead (scale gathered per weight) and then rounded to ``a``'s dtype: slower, and the weights are
  rounded once, which the per-block form avoids.
* ``mxfp4``: e8m0 scales every 32 K elements, so BLOCK_K <= 32 and the partial product is scaled
  per column by 2^(s-127), applied as two finite powers of two so that s = 255 (2^128) and s = 0
  (2^-127) give what ``torch.ldexp`` gives the reference (0 stays 0, no 0 * inf).
* ``int8``: one scale per output column (weight row n): plain K loop, scale after it.

The kernel has grouped_gemm.py's options too (gather x rows through sorted_slots, the SwiGLU/GeGLU
epilogue over [gate; up] weight rows, router weight + scatter to slot order): the fused layer on
quantized experts (fused_moe.py ``fused_moe_quantized_forward``) runs on it.

fp8 NaN codes (0x7F / 0xFF) are made NaN explicitly: Triton's interpreter converts them to +-480
(the GPU's conversion gives NaN), and the reference propagates NaN.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .configs import get_config
from .grouped_gemm import _clamped_offsets, build_schedule, gated, max_row_tiles, store_rows, tile_position, zero_outside
from .launch import cdiv, dot_precision, launch, num_programs

FORMATS = {"fp8_e4m3": 1, "mxfp4": 2, "int8": 3}
MX_BLOCK = 32
# How the scale meets the dot product.
SCALE_PER_ELEMENT = 0   # dequantize each weight in float32 (fp8 with an odd block_k)
SCALE_PER_K_TILE = 1    # scale the tile's partial product per column (fp8, mxfp4)
SCALE_AFTER_K = 2       # scale the finished accumulator per column (int8)


@triton.jit
def _pow2(x):
    """2^x as float32 for integer x in [-126, 127], exactly (built from the exponent bits)."""
    return ((x + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _quant_b_tile(b_e, s_e, rows_n, nmask, kidx, km, block_n, block_k, stride_bn, stride_bk, stride_bg,
                  stride_sn, stride_sk, FMT: tl.constexpr, SCALE_MODE: tl.constexpr, FP8_BITS: tl.constexpr):
    """The float32 [BLOCK_K, BLOCK_N] tile of weight rows ``rows_n`` and columns ``kidx`` of one expert,
    decoded (and, for SCALE_PER_ELEMENT, scaled); masked elements are 0."""
    bmask = km[:, None] & nmask[None, :]
    b_row = b_e + rows_n.to(tl.int64)[None, :] * stride_bn
    if FMT == 2:
        # byte k // 2 of the row; the low nibble holds the even k
        byte = tl.load(b_row + ((kidx // 32) * stride_bg + ((kidx // 2) % 16) * stride_bk)[:, None],
                       mask=bmask, other=0)
        code = (byte.to(tl.int32) >> ((kidx & 1) * 4)[:, None]) & 0xF
        ex = (code >> 1) & 3
        man = (code & 1).to(tl.float32)
        mag = tl.where(ex == 0, man * 0.5, (1.0 + man * 0.5) * ((ex + 126) << 23).to(tl.float32, bitcast=True))
        w = tl.where(code >= 8, -mag, mag)
    else:
        q = tl.load(b_row + kidx[:, None] * stride_bk, mask=bmask, other=0)
        if FMT == 1:  # fp8 arrives as its uint8 bits (a masked fp8 load cannot take other=0 everywhere)
            if FP8_BITS:  # decoded from the bits: GPUs without fp8 conversions (before sm_89)
                qi = q.to(tl.int32)
                ex = (qi >> 3) & 15
                man = qi & 7
                normal = ((qi & 0x80) << 24) | ((ex + 120) << 23) | (man << 20)
                sub = man.to(tl.float32) * 0.001953125  # 2^-9
                w = tl.where(ex == 0, tl.where(qi >= 0x80, -sub, sub), normal.to(tl.float32, bitcast=True))
            else:
                w = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            w = tl.where((q & 0x7F) == 0x7F, float("nan"), w)
        else:
            w = q.to(tl.float32)
    if SCALE_MODE == 0:
        s = tl.load(s_e + (rows_n // block_n)[None, :] * stride_sn + (kidx // block_k)[:, None] * stride_sk,
                    mask=bmask, other=0.0).to(tl.float32)
        w = w * s
    return w


@triton.jit
def _col_scaled(part, s_e, rows_n, nmask, k0, block_n, block_k, stride_sn, stride_sk, FMT: tl.constexpr):
    """``part`` (float32 [BLOCK_M, BLOCK_N]) times the scale of weight rows ``rows_n``: fp8 of the K
    tile at k0, mxfp4 of the 32-group at k0, int8 of the row."""
    if FMT == 1:
        sc = tl.load(s_e + (rows_n // block_n) * stride_sn + (k0 // block_k) * stride_sk,
                     mask=nmask, other=0.0).to(tl.float32)
        res = part * sc[None, :]
    elif FMT == 2:
        x = tl.load(s_e + rows_n * stride_sn + (k0 // 32) * stride_sk, mask=nmask, other=127).to(tl.int32) - 127
        lo = x >> 1  # floor(x / 2): 2^x = 2^lo * 2^(x - lo), both finite
        res = (part * _pow2(lo)[None, :]) * _pow2(x - lo)[None, :]
    else:
        sc = tl.load(s_e + rows_n * stride_sn, mask=nmask, other=0.0).to(tl.float32)
        res = part * sc[None, :]
    return res


@triton.jit
def _grouped_gemm_quant_kernel(
    a_ptr, b_ptr, s_ptr, c_ptr, offs_ptr, sched_ptr, slots_ptr, w_ptr,
    M, N, K, E, topk, block_n, block_k,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_bg,
    stride_se, stride_sn, stride_sk, stride_cm, stride_cn,
    NUM_PROGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FMT: tl.constexpr, SCALE_MODE: tl.constexpr, PRECISION: tl.constexpr,
    GATHER: tl.constexpr, ACT: tl.constexpr, SCATTER: tl.constexpr, ZERO_OUTSIDE: tl.constexpr,
    FP8_BITS: tl.constexpr,
):
    """c[M, N] (N = I for ACT) from a[., K] and quantized b[E, N(x2 for ACT), K] (mxfp4: bytes
    [E, N, K/32, 16], stride_bg between 32-element groups, stride_bk between bytes). GATHER / ACT /
    SCATTER / ZERO_OUTSIDE as in grouped_gemm.py's kernel."""
    pid = tl.program_id(0)
    out_ty = c_ptr.dtype.element_ty
    dot_ty = a_ptr.dtype.element_ty
    num_mt = tl.load(sched_ptr + E)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    total = num_mt * n_tiles
    for tile in range(pid, total, NUM_PROGS):  # grouped_gemm.py's tile order and epilogue
        e, rows, rmask, amask, arow, cols, nmask = tile_position(tile, num_mt, n_tiles, sched_ptr, offs_ptr, slots_ptr,
                                                                 E, N, topk, GROUP_M, BLOCK_M, BLOCK_N, GATHER)
        kk = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        a_ptrs = a_ptr + arow[:, None] * stride_am + kk[None, :] * stride_ak
        b_e = b_ptr + e64 * stride_be
        s_e = s_ptr + e64 * stride_se
        acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
        if ACT != 0:
            acc_up = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kidx = k0 + kk
            km = kidx < K
            a = tl.load(a_ptrs, mask=amask[:, None] & km[None, :], other=0.0)
            w = _quant_b_tile(b_e, s_e, cols, nmask, kidx, km, block_n, block_k, stride_bn, stride_bk, stride_bg,
                              stride_sn, stride_sk, FMT, SCALE_MODE, FP8_BITS).to(dot_ty)
            if SCALE_MODE == 1:
                part = tl.dot(a, w, input_precision=PRECISION, out_dtype=tl.float32)
                acc += _col_scaled(part, s_e, cols, nmask, k0, block_n, block_k, stride_sn, stride_sk, FMT)
            else:
                acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=tl.float32)
            if ACT != 0:  # the up rows I + n of the same expert, one A tile for both
                wu = _quant_b_tile(b_e, s_e, cols + N, nmask, kidx, km, block_n, block_k, stride_bn, stride_bk,
                                   stride_bg, stride_sn, stride_sk, FMT, SCALE_MODE, FP8_BITS).to(dot_ty)
                if SCALE_MODE == 1:
                    part = tl.dot(a, wu, input_precision=PRECISION, out_dtype=tl.float32)
                    acc_up += _col_scaled(part, s_e, cols + N, nmask, k0, block_n, block_k, stride_sn, stride_sk,
                                          FMT)
                else:
                    acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION, out_dtype=tl.float32)
            a_ptrs += BLOCK_K * stride_ak
        if SCALE_MODE == 2:
            acc = _col_scaled(acc, s_e, cols, nmask, 0, block_n, block_k, stride_sn, stride_sk, FMT)
            if ACT != 0:
                acc_up = _col_scaled(acc_up, s_e, cols + N, nmask, 0, block_n, block_k, stride_sn, stride_sk, FMT)
        if ACT != 0:
            res = gated(acc, acc_up, out_ty, tl.float32, ACT)
        else:
            res = acc
        store_rows(res, rows, rmask, cols, nmask, slots_ptr, w_ptr, c_ptr, stride_cm, stride_cn, tl.float32, SCATTER)
    if ZERO_OUTSIDE:
        zero_outside(pid, offs_ptr, c_ptr, M, N, E, stride_cm, stride_cn, NUM_PROGS, BLOCK_M, BLOCK_N)


# Tests set this to run the bit decoder where the conversion instruction exists (None: by device).
FORCE_FP8_BITS = None


def fp8_from_bits(device: torch.device) -> bool:
    """Whether fp8 weights are decoded from their bits: GPUs before sm_89 have no fp8 conversion
    instruction for Triton's float8e4nv (A100 runs DeepSeek/Qwen FP8 checkpoints weight-only too)."""
    if FORCE_FP8_BITS is not None:
        return FORCE_FP8_BITS
    return device.type == "cuda" and _capability(device) < (8, 9)


@functools.lru_cache(maxsize=None)
def _capability_of(index: int):
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device):
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _pow2_divisor(n: int) -> int:
    return n & -n


def plan(format: str, block_k: int, cfg_block_k: int):
    """``(BLOCK_K, scale mode)`` for a format: the K tile must not straddle a scale block."""
    if format == "mxfp4":
        return min(cfg_block_k, MX_BLOCK), SCALE_PER_K_TILE
    if format == "int8":
        return cfg_block_k, SCALE_AFTER_K
    p = min(_pow2_divisor(block_k), cfg_block_k)
    if p >= 16:
        return p, SCALE_PER_K_TILE
    return cfg_block_k, SCALE_PER_ELEMENT


def logical_nk(b: torch.Tensor, format: str):
    """The dequantized ``(E, N, K)`` of ``b``."""
    if format == "mxfp4":
        return b.shape[0], b.shape[1], b.shape[2] * MX_BLOCK
    return b.shape[0], b.shape[1], b.shape[2]


def run_quantized_gemm(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, expert_offsets: torch.Tensor,
                       format: str, block_n: int, block_k: int, out: torch.Tensor) -> torch.Tensor:
    """The op: fill ``out[M, N]`` (every element written) and return it; arguments already checked."""
    M = a.shape[0]
    E, N, K = logical_nk(b, format)
    if M == 0 or N == 0:
        return out
    if K == 0 or E == 0:
        return out.zero_()
    cfg = get_config(E, N, K, a.dtype, a.device, M)
    offs = _clamped_offsets(expert_offsets, M)
    sched = build_schedule(offs, E, cfg["BLOCK_M"], M)
    launch_quantized_gemm(a, b, b_scale, out, offs, sched, format, block_n, block_k, cfg, N=N, K=K, rows=M,
                          zero_outside=True)
    return out


def launch_quantized_gemm(a, b, b_scale, c, offsets, sched, format, block_n, block_k, cfg, *, N, K, rows,
                          slots=None, weights=None, topk=1, act=0, scatter=False, zero_outside=False):
    """One launch of the quantized grouped GEMM (``sched`` built for ``cfg['BLOCK_M']``; ``rows``
    bounds the scheduled rows); options as ``grouped_gemm.run_gemm``'s. ``N`` is the output width
    (I with ``act``: b then holds 2I rows, [gate; up])."""
    E = b.shape[0]
    bk_tile, mode = plan(format, block_k, cfg["BLOCK_K"])
    if format == "mxfp4":
        sbe, sbn, sbg, sbk = b.stride(0), b.stride(1), b.stride(2), b.stride(3)
    else:
        if format == "fp8_e4m3":
            b = b.view(torch.uint8)
        sbe, sbn, sbk, sbg = b.stride(0), b.stride(1), b.stride(2), 0
    sse, ssn = b_scale.stride(0), b_scale.stride(1)
    ssk = b_scale.stride(2) if b_scale.dim() > 2 else 0
    grid = max(1, min(num_programs(c.device), max_row_tiles(rows, E, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])))
    launch(_grouped_gemm_quant_kernel, (grid,), a, b, b_scale, c, offsets, sched,
           slots if slots is not None else offsets, weights if weights is not None else offsets,
           c.shape[0], N, K, E, topk, max(block_n, 1), max(block_k, 1),
           a.stride(0), a.stride(1), sbe, sbn, sbk, sbg, sse, ssn, ssk, c.stride(0), c.stride(1),
           NUM_PROGS=grid, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk_tile,
           GROUP_M=cfg["GROUP_M"], FMT=FORMATS[format], SCALE_MODE=mode, PRECISION=dot_precision(a.dtype),
           GATHER=slots is not None and not scatter, ACT=act, SCATTER=scatter, ZERO_OUTSIDE=zero_outside,
           FP8_BITS=format == "fp8_e4m3" and fp8_from_bits(c.device),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def grouped_gemm_quantized(a: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, expert_offsets: torch.Tensor,
                           format: str, block_n: int, block_k: int) -> torch.Tensor:
    """The ``moe_ops_triton::grouped_gemm_quantized`` op body (also its own shape function: on fake
    tensors nothing launches)."""
    _, N, _ = logical_nk(b, format)
    out = torch.empty((a.shape[0], N), device=a.device, dtype=a.dtype)
    return run_quantized_gemm(a, b, b_scale, expert_offsets, format, block_n, block_k, out)


SCHEMA = ("(Tensor a, Tensor b, Tensor b_scale, Tensor expert_offsets, str format, SymInt block_n, "
          "SymInt block_k) -> Tensor")
