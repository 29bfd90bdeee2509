"""Index build for ``permute`` and ``capacity_dispatch`` (permute.py, capacity.py) and the fused
layer: a stable counting sort of the T*k slots by expert, on the device, with no atomics and no
host sync.

Kernels, in launch order (all with static grids):

1. ``_expert_rank_kernel`` (one program per block of BLOCK slots, taken in *priority order* q):
   each slot's rank among the earlier slots of its block with the same expert (a BLOCK x BLOCK
   compare), and the block's per-expert counts ``counts[b, e]``. It also fills the inverse map
   (row -> slot) with -1, so rows nobody claims read as padding.
2. ``_expert_scan_kernel`` (one program): exclusive prefix of ``counts`` over blocks per expert
   (``base[b, e]``), per-expert totals, and then either the block_m-padded ``expert_offsets``
   (+ optionally the GEMM tile schedule: per-expert M-tile counts and their prefix sum), or
   capacity's ``demand``/``kept``.
3. ``_slot_place_kernel`` (per block): rank = ``base[b, e]`` + in-block rank -> destination row
   (``offsets[e] + rank``, or ``e*C + rank`` if rank < C), written to the slot map and its inverse.
4. ``_gather_rows_kernel``: ``out[row] = x[inv[row] // k]`` or 0 where ``inv[row] == -1``.

Order within an expert is the priority order (slot order for permute), because blocks are
taken in that order and ranks inside a block count only earlier lanes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_pow2
from .grouped_gemm import fill_tile_experts, max_row_tiles, schedule_size, search_steps

BLOCK_S = 128      # slots per rank/place program (the in-block compare is BLOCK_S^2)
BLOCK_E = 64       # experts per step in the count and scan loops
BLOCK_B = 64       # blocks per step of the scan
FILL_BLOCK = 1024


@triton.jit
def _slot_expert(ids_ptr, q, inb, T, E, K: tl.constexpr, KMAJOR: tl.constexpr):
    """The slot at priority position q, its expert id and whether that id is in [0, E)."""
    if KMAJOR:  # priority position q -> slot: (j, t) order
        s = (q % T) * K + q // T
    else:       # (t, j) order = slot order
        s = q
    e = tl.load(ids_ptr + s, mask=inb, other=-1)
    valid = inb & (e >= 0) & (e < E)
    return s, e, valid


@triton.jit
def _expert_rank_kernel(ids_ptr, rank_ptr, counts_ptr, inv_ptr, S, T, E, R, fill_per_prog,
                        K: tl.constexpr, KMAJOR: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_EXP: tl.constexpr, FILL: tl.constexpr):
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    q = pid * BLOCK + lane
    inb = q < S
    s, e, valid = _slot_expert(ids_ptr, q, inb, T, E, K, KMAJOR)
    e = tl.where(valid, e, -1)
    same = (e[:, None] == e[None, :]) & valid[:, None] & (lane[None, :] < lane[:, None])
    tl.store(rank_ptr + q, tl.sum(same.to(tl.int32), 1), mask=inb)
    for e0 in range(0, E, BLOCK_EXP):
        ex = e0 + tl.arange(0, BLOCK_EXP)
        cnt = tl.sum((e[:, None] == ex[None, :]).to(tl.int32), 0)
        tl.store(counts_ptr + pid * E + ex, cnt, mask=ex < E)
    start = pid * fill_per_prog
    stop = tl.minimum(start + fill_per_prog, R)
    for r0 in range(start, stop, FILL):
        r = r0 + tl.arange(0, FILL)
        tl.store(inv_ptr + r, tl.full([FILL], -1, tl.int32), mask=r < stop)


@triton.jit
def _expert_scan_kernel(counts_ptr, base_ptr, out0_ptr, out1_ptr, sched_ptr, nb, E, C, block_m, sched_bm, max_tiles,
                        CAPACITY: tl.constexpr, SCHED: tl.constexpr, BLOCK_EXP: tl.constexpr, BLOCK_BLK: tl.constexpr,
                        SEARCH_STEPS: tl.constexpr):
    """out0/out1: expert_offsets[E+1] (permute) or demand[E]/kept[E] (capacity)."""
    carry = 0
    carry_mt = 0
    for e0 in range(0, E, BLOCK_EXP):
        ex = e0 + tl.arange(0, BLOCK_EXP)
        em = ex < E
        run = tl.full([BLOCK_EXP], 0, tl.int32)
        for b0 in range(0, nb, BLOCK_BLK):
            bb = b0 + tl.arange(0, BLOCK_BLK)
            m2 = (bb[:, None] < nb) & em[None, :]
            p = bb[:, None] * E + ex[None, :]
            cnt = tl.load(counts_ptr + p, mask=m2, other=0)
            tl.store(base_ptr + p, tl.cumsum(cnt, 0) - cnt + run[None, :], mask=m2)
            run += tl.sum(cnt, 0)
        if CAPACITY:
            tl.store(out0_ptr + ex, run, mask=em)
            tl.store(out1_ptr + ex, tl.minimum(run, C), mask=em)
        else:
            padded = (run + block_m - 1) // block_m * block_m
            tl.store(out0_ptr + ex, carry + tl.cumsum(padded, 0) - padded, mask=em)
            carry += tl.sum(padded, 0)
            if SCHED:
                mt = (padded + sched_bm - 1) // sched_bm
                tl.store(sched_ptr + ex, carry_mt + tl.cumsum(mt, 0) - mt, mask=em)
                carry_mt += tl.sum(mt, 0)
    if not CAPACITY:
        tl.store(out0_ptr + E, carry)
        if SCHED:
            tl.store(sched_ptr + E, carry_mt)
            fill_tile_experts(sched_ptr, E, max_tiles, SEARCH_STEPS, 1024)


@triton.jit
def _slot_place_kernel(ids_ptr, rank_ptr, base_ptr, offs_ptr, slotmap_ptr, inv_ptr, S, T, E, C,
                       K: tl.constexpr, KMAJOR: tl.constexpr, CAPACITY: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    q = pid * BLOCK + tl.arange(0, BLOCK)
    inb = q < S
    s, e, valid = _slot_expert(ids_ptr, q, inb, T, E, K, KMAJOR)
    rank = tl.load(rank_ptr + q, mask=valid, other=0) + tl.load(base_ptr + pid * E + e, mask=valid, other=0)
    if CAPACITY:
        kept = valid & (rank < C)
        tl.store(slotmap_ptr + s, tl.where(kept, rank, -1), mask=inb)
        tl.store(inv_ptr + e * C + rank, s, mask=kept)
    else:
        row = tl.load(offs_ptr + e, mask=valid, other=0) + rank
        tl.store(slotmap_ptr + s, tl.where(valid, row, -1), mask=inb)
        tl.store(inv_ptr + row, s, mask=valid)


@triton.jit
def _gather_rows_kernel(x_ptr, inv_ptr, out_ptr, R, H, stride_x, K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    slot = tl.load(inv_ptr + r, mask=r < R, other=-1)
    tok = (slot // K).to(tl.int64)
    hm = h[None, :] < H
    v = tl.load(x_ptr + tok[:, None] * stride_x + h[None, :], mask=(slot >= 0)[:, None] & hm, other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * H + h[None, :], v, mask=(r < R)[:, None] & hm)


def build_index(ids: torch.Tensor, E: int, *, block_m: int = 1, capacity: int = -1, kmajor: bool = False,
                sched_bm: int = 0):
    """Run kernels 1-3. Returns (slot_map[T*k], inv[R], out0, out1, sched).

    permute (capacity < 0): out0 = expert_offsets[E+1], R = T*k + E*(block_m-1);
    sched = the grouped GEMM's tile schedule for tiles of ``sched_bm`` rows when sched_bm > 0.
    capacity: out0 = demand[E], out1 = kept[E], R = E*C, slot_map = slot_pos.
    """
    dev = ids.device
    T, k = ids.shape
    S = T * k
    cap = capacity >= 0
    R = E * capacity if cap else S + E * (block_m - 1)
    ids = ids.contiguous()
    nb = max(1, cdiv(S, BLOCK_S))
    rank = torch.empty(max(S, 1), device=dev, dtype=torch.int32)
    counts = torch.empty(nb * E, device=dev, dtype=torch.int32)
    base = torch.empty(nb * E, device=dev, dtype=torch.int32)
    slot_map = torch.empty(S, device=dev, dtype=torch.int32)
    inv = torch.empty(R, device=dev, dtype=torch.int32)
    if cap:
        out0 = torch.empty(E, device=dev, dtype=torch.int32)
        out1 = torch.empty(E, device=dev, dtype=torch.int32)
    else:
        out0 = torch.empty(E + 1, device=dev, dtype=torch.int32)
        out1 = out0
    sched = (torch.empty(schedule_size(S, E, sched_bm), device=dev, dtype=torch.int32)
             if sched_bm > 0 else out0)
    Tq = max(T, 1)
    launch(_expert_rank_kernel, (nb,), ids, rank, counts, inv, S, Tq, E, R, cdiv(R, nb),
           K=k, KMAJOR=kmajor, BLOCK=BLOCK_S, BLOCK_EXP=BLOCK_E, FILL=FILL_BLOCK)
    launch(_expert_scan_kernel, (1,), counts, base, out0, out1, sched, nb, E, max(capacity, 0), block_m,
           max(sched_bm, 1), max_row_tiles(S, E, max(sched_bm, 1)), CAPACITY=cap, SCHED=sched_bm > 0,
           BLOCK_EXP=BLOCK_E, BLOCK_BLK=BLOCK_B, SEARCH_STEPS=search_steps(E))
    launch(_slot_place_kernel, (nb,), ids, rank, base, out0, slot_map, inv, S, Tq, E, max(capacity, 0),
           K=k, KMAJOR=kmajor, CAPACITY=cap, BLOCK=BLOCK_S)
    return slot_map, inv, out0, out1, sched


def gather_rows(x: torch.Tensor, inv: torch.Tensor, k: int, R: int) -> torch.Tensor:
    H = x.shape[1]
    out = torch.empty((R, H), device=x.device, dtype=x.dtype)
    if R == 0 or H == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    block_h = min(128, next_pow2(H))
    block_r = max(1, min(64, 4096 // block_h))
    launch(_gather_rows_kernel, (cdiv(R, block_r), cdiv(H, block_h)), x, inv, out, R, H, x.stride(0),
           K=k, BLOCK_R=block_r, BLOCK_H=block_h)
    return out

