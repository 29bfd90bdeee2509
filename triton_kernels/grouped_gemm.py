"""Grouped expert GEMM: all experts in ONE persistent launch over a device-built tile schedule.

Schedule (one fixed-size int32 buffer, built on the device from ``expert_offsets`` by
``_gemm_tile_schedule_kernel``, or by the index build's scan in the fused layer):
``sched[e]`` = number of BLOCK_M row tiles of experts < e (``sched[E]`` = all of them), then
``sched[E+1+t]`` = the expert of row tile t for t < ``cdiv(rows, BLOCK_M) + E`` (a static bound;
filled by a vectorised binary search). Tiles never straddle experts: expert e's tiles start at
``offs[e]`` and the last one is masked at ``offs[e+1]``, so any offsets work (no block_m
padding). The GEMM's grid is static (number of SMs); program p walks tiles p, p+G, ... of
``sched[E] * n_col_tiles`` -- no host sync, and the launch does not depend on E or the routing.

Options (constexpr, so each variant compiles to its own kernel):
* GATHER: A row r is ``x[sorted_slots[r] // topk]`` (0 where the slot is -1): no permuted copy.
* ACT (1 SwiGLU, 2 GeGLU): B = w_gate_up[e] ([2I, H], rows [gate; up]); the tile computes the
  gate and the up columns of its block (two accumulators, one A load) and stores
  ``act(gate) * up`` -> [P, I]. gate/up are rounded to the input dtype first, as the unfused
  path (GEMM output in x's dtype, then the activation in float32, float64 for float64) does.
* SCATTER: the row's result (rounded to the input dtype) times the router weight of its slot is
  stored at row ``slot`` of a [T*k, N] buffer (or of out[T, N] when k == 1): the k-sum that
  follows is a plain deterministic kernel, no float atomics.
* ZERO_OUTSIDE: rows outside ``[offs[0], offs[E])`` are written as zeros (the op contract).

fp32 inputs use IEEE fp32 dot products (no TF32): the contract is float32 math. fp64 inputs
accumulate in fp64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, dot_precision, launch, num_programs
from .configs import get_config


@triton.jit
def fill_tile_experts(sched_ptr, E, max_tiles, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """sched[E+1+t] = the e with sched[e] <= t < sched[e+1] (empty experts are skipped), for every
    t < max_tiles; -1 past the last tile. Call after sched[0..E] is written (same program)."""
    tl.debug_barrier()  # sched[0..E] was written by other threads of this program
    total = tl.load(sched_ptr + E)
    for t0 in range(0, max_tiles, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        lo = tl.full([BLOCK], 0, tl.int32)
        hi = tl.full([BLOCK], 0, tl.int32) + E
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) // 2
            take = tl.load(sched_ptr + mid) <= t
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        tl.store(sched_ptr + E + 1 + t, tl.where(t < total, lo, -1), mask=t < max_tiles)


@triton.jit
def _gemm_tile_schedule_kernel(offs_ptr, sched_ptr, E, max_tiles, BLOCK_M: tl.constexpr, BLOCK_EXP: tl.constexpr,
                               SEARCH_STEPS: tl.constexpr):
    """sched[e] = sum over e' < e of cdiv(offs[e'+1] - offs[e'], BLOCK_M); then the tile map."""
    carry = 0
    for e0 in range(0, E, BLOCK_EXP):
        ex = e0 + tl.arange(0, BLOCK_EXP)
        em = ex < E
        lo = tl.load(offs_ptr + ex, mask=em, other=0)
        hi = tl.load(offs_ptr + ex + 1, mask=em, other=0)
        mt = (tl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
        tl.store(sched_ptr + ex, carry + tl.cumsum(mt, 0) - mt, mask=em)
        carry += tl.sum(mt, 0)
    tl.store(sched_ptr + E, carry)
    fill_tile_experts(sched_ptr, E, max_tiles, SEARCH_STEPS, 1024)


@triton.jit
def tile_position(tile, num_mt, n_tiles, sched_ptr, offs_ptr, slots_ptr, E, N, topk, GROUP_M: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr):
    """Where persistent tile ``tile`` lies: its expert, output rows (and mask), the A rows it reads
    (``arow``/``amask``: the token rows through the slots with GATHER), its columns (and mask).
    GROUP_M row tiles sweep the columns together (B tiles stay in L2). Shared by the float and the
    quantized kernels (grouped_gemm_quant.py)."""
    per_group = GROUP_M * n_tiles
    first_m = (tile // per_group) * GROUP_M
    gm = tl.minimum(num_mt - first_m, GROUP_M)
    mt = first_m + (tile % per_group) % gm
    nt = (tile % per_group) // gm
    e = tl.load(sched_ptr + E + 1 + mt)
    row_end = tl.load(offs_ptr + e + 1)
    rows = tl.load(offs_ptr + e) + (mt - tl.load(sched_ptr + e)) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    if GATHER:
        slot = tl.load(slots_ptr + rows, mask=rmask, other=-1)
        amask = rmask & (slot >= 0)
        arow = (tl.where(amask, slot, 0) // topk).to(tl.int64)
    else:
        amask = rmask
        arow = rows.to(tl.int64)
    cols = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, rows, rmask, amask, arow, cols, cols < N


@triton.jit
def gated(acc, acc_up, out_ty: tl.constexpr, ACC_DTYPE: tl.constexpr, ACT: tl.constexpr):
    """act(gate) * up of the two accumulators, each rounded to the output dtype first (float32, or
    float64 for float64 inputs), as ops.gated_activation. ACT 1: SiLU, 2: GELU (erf)."""
    gate = acc.to(out_ty).to(ACC_DTYPE)
    up = acc_up.to(out_ty).to(ACC_DTYPE)
    if ACT == 1:
        act = gate / (1.0 + tl.exp(-gate))
    else:
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    return act * up


@triton.jit
def store_rows(res, rows, rmask, cols, nmask, slots_ptr, w_ptr, c_ptr, stride_cm, stride_cn, ACC_DTYPE: tl.constexpr,
               SCATTER: tl.constexpr):
    """The tile's result into c: at its rows, or (SCATTER) rounded, times the slot's router weight,
    at its slot's row (rows without a slot are skipped)."""
    out_ty = c_ptr.dtype.element_ty
    if SCATTER:
        slot = tl.load(slots_ptr + rows, mask=rmask, other=-1)
        smask = rmask & (slot >= 0)
        sslot = tl.where(smask, slot, 0)
        w = tl.load(w_ptr + sslot, mask=smask, other=0.0).to(ACC_DTYPE)
        res = res.to(out_ty).to(ACC_DTYPE) * w[:, None]
        crow = sslot.to(tl.int64)
    else:
        smask = rmask
        crow = rows.to(tl.int64)
    c_ptrs = c_ptr + crow[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, res.to(out_ty), mask=smask[:, None] & nmask[None, :])


@triton.jit
def zero_outside(pid, offs_ptr, c_ptr, M, N, E, stride_cm, stride_cn, NUM_PROGS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Rows of c outside [offs[0], offs[E]) are zero (the op contract), spread over the programs."""
    out_ty = c_ptr.dtype.element_ty
    first = tl.load(offs_ptr)
    last = tl.load(offs_ptr + E)
    for mb in range(pid, (M + BLOCK_M - 1) // BLOCK_M, NUM_PROGS):
        if (mb * BLOCK_M < first) | ((mb + 1) * BLOCK_M > last):
            rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            zm = ((rows < first) | (rows >= last)) & (rows < M)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn,
                         tl.full([BLOCK_M, BLOCK_N], 0, out_ty), mask=zm[:, None] & (cols < N)[None, :])


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, sched_ptr, slots_ptr, w_ptr,
    M, N, K, E, topk,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    NUM_PROGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER: tl.constexpr, ACT: tl.constexpr, SCATTER: tl.constexpr, ZERO_OUTSIDE: tl.constexpr,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """c[M, N] (N = I for ACT) from a[., K] and b[E, (K,N) via strides]."""
    pid = tl.program_id(0)
    out_ty = c_ptr.dtype.element_ty
    num_mt = tl.load(sched_ptr + E)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    total = num_mt * n_tiles
    for tile in range(pid, total, NUM_PROGS):
        e, rows, rmask, amask, arow, cols, nmask = tile_position(tile, num_mt, n_tiles, sched_ptr, offs_ptr, slots_ptr,
                                                                 E, N, topk, GROUP_M, BLOCK_M, BLOCK_N, GATHER)
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + arow[:, None] * stride_am + kk[None, :] * stride_ak
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + kk[:, None] * stride_bk + cols[None, :] * stride_bn
        acc = tl.full([BLOCK_M, BLOCK_N], 0, ACC_DTYPE)
        if ACT != 0:
            acc_up = tl.full([BLOCK_M, BLOCK_N], 0, ACC_DTYPE)
            up_off = N * stride_bn
        for k0 in range(0, K, BLOCK_K):
            km = (k0 + kk) < K
            a = tl.load(a_ptrs, mask=amask[:, None] & km[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            if ACT != 0:
                bu = tl.load(b_ptrs + up_off, mask=km[:, None] & nmask[None, :], other=0.0)
                acc_up = tl.dot(a, bu, acc_up, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        if ACT != 0:
            res = gated(acc, acc_up, out_ty, ACC_DTYPE, ACT)
        else:
            res = acc
        store_rows(res, rows, rmask, cols, nmask, slots_ptr, w_ptr, c_ptr, stride_cm, stride_cn, ACC_DTYPE, SCATTER)
    if ZERO_OUTSIDE:
        zero_outside(pid, offs_ptr, c_ptr, M, N, E, stride_cm, stride_cn, NUM_PROGS, BLOCK_M, BLOCK_N)


@triton.jit
def _grouped_gemm_wgrad_kernel(a_ptr, dc_ptr, db_ptr, offs_ptr, E, K, N, stride_am, stride_ak, stride_dm, stride_dn,
                               NUM_PROGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Persistent over the E x K-tiles x N-tiles output tiles: db[e, kt, nt] = sum over expert
    e's rows of a^T dc (zero for an empty expert); the row loop's bounds come from offs."""
    kt_n = (K + BLOCK_K - 1) // BLOCK_K
    nt_n = (N + BLOCK_N - 1) // BLOCK_N
    for tile in range(tl.program_id(0), E * kt_n * nt_n, NUM_PROGS):
        e = tile // (kt_n * nt_n)
        rem = tile % (kt_n * nt_n)
        kc = (rem // nt_n) * BLOCK_K + tl.arange(0, BLOCK_K)
        nc = (rem % nt_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(offs_ptr + e)
        end = tl.load(offs_ptr + e + 1)
        acc = tl.full([BLOCK_K, BLOCK_N], 0, ACC_DTYPE)
        for m0 in range(start, end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rm = rows < end
            r64 = rows.to(tl.int64)
            a = tl.load(a_ptr + r64[:, None] * stride_am + kc[None, :] * stride_ak,
                        mask=rm[:, None] & (kc < K)[None, :], other=0.0)
            d = tl.load(dc_ptr + r64[:, None] * stride_dm + nc[None, :] * stride_dn,
                        mask=rm[:, None] & (nc < N)[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), d, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        out = db_ptr + e.to(tl.int64) * K * N + kc[:, None] * N + nc[None, :]
        tl.store(out, acc.to(db_ptr.dtype.element_ty), mask=(kc < K)[:, None] & (nc < N)[None, :])


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def search_steps(E: int) -> int:
    return max(1, (E).bit_length())


def schedule_size(rows: int, E: int, block_m: int) -> int:
    """Entries of the schedule buffer: E+1 prefix sums + the tile map's static bound."""
    return E + 1 + max_row_tiles(rows, E, block_m)


def max_row_tiles(rows: int, E: int, block_m: int) -> int:
    return cdiv(rows, block_m) + E  # each expert adds at most one partial tile


def build_schedule(offsets: torch.Tensor, E: int, block_m: int, rows: int) -> torch.Tensor:
    sched = torch.empty(schedule_size(rows, E, block_m), device=offsets.device, dtype=torch.int32)
    launch(_gemm_tile_schedule_kernel, (1,), offsets, sched, E, max_row_tiles(rows, E, block_m),
           BLOCK_M=block_m, BLOCK_EXP=128, SEARCH_STEPS=search_steps(E))
    return sched


def run_gemm(a, b, c, offsets, sched, E, N, K, cfg, *, rows, trans_b, slots=None, weights=None, topk=1,
             act=0, scatter=False, zero_outside=False):
    """Launch the persistent grouped GEMM (``sched`` built for ``cfg['BLOCK_M']``); ``rows`` bounds
    the scheduled rows (the rows ``expert_offsets`` indexes), for the static grid size."""
    M = c.shape[0]
    if trans_b:   # b[E, N(, x2 for ACT), K]
        sbn, sbk = b.stride(1), b.stride(2)
    else:         # b[E, K, N]
        sbk, sbn = b.stride(1), b.stride(2)
    max_tiles = max_row_tiles(rows, E, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    grid = max(1, min(num_programs(c.device), max_tiles))
    dummy = offsets
    launch(_grouped_gemm_kernel, (grid,), a, b, c, offsets, sched,
           slots if slots is not None else dummy, weights if weights is not None else dummy,
           M, N, K, E, topk, a.stride(0), a.stride(1), b.stride(0), sbn, sbk, c.stride(0), c.stride(1),
           NUM_PROGS=grid,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
           GATHER=slots is not None and not scatter, ACT=act, SCATTER=scatter, ZERO_OUTSIDE=zero_outside,
           PRECISION=dot_precision(a.dtype), ACC_DTYPE=_acc_dtype(a.dtype),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _clamped_offsets(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """``expert_offsets`` clamped into ``[0, rows]`` and made non-decreasing (as the CPU backend
    reads them), on the device: with value checks off, offsets outside the rows of ``a`` must not
    make a kernel read past them or loop over a huge range."""
    return torch.cummax(offsets.clamp(0, rows), dim=0).values.to(torch.int32)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, trans_b: bool) -> torch.Tensor:
    M, K = a.shape
    E = b.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    cfg = get_config(E, N, K, a.dtype, a.device, M)
    expert_offsets = _clamped_offsets(expert_offsets, M)
    sched = build_schedule(expert_offsets, E, cfg["BLOCK_M"], M)
    run_gemm(a, b, c, expert_offsets, sched, E, N, K, cfg, rows=M, trans_b=trans_b, zero_outside=True)
    return c


def grouped_gemm_wgrad(a: torch.Tensor, dc: torch.Tensor, expert_offsets: torch.Tensor,
                       num_experts: int) -> torch.Tensor:
    M, K = a.shape
    N = dc.shape[1]
    db = torch.empty((num_experts, K, N), device=a.device, dtype=a.dtype)
    if db.numel() == 0:
        return db
    expert_offsets = _clamped_offsets(expert_offsets, M)
    cfg = get_config(num_experts, N, K, a.dtype, a.device, M, wgrad=True)
    grid = max(1, min(num_programs(a.device), num_experts * cdiv(K, cfg["BLOCK_K"]) * cdiv(N, cfg["BLOCK_N"])))
    launch(_grouped_gemm_wgrad_kernel, (grid,), a, dc, db, expert_offsets, num_experts, K, N,
           a.stride(0), a.stride(1), dc.stride(0), dc.stride(1), NUM_PROGS=grid,
           BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
           PRECISION=dot_precision(a.dtype), ACC_DTYPE=_acc_dtype(a.dtype),
           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return db
