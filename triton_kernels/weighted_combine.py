"""The weighted k-sum behind ``unpermute`` (permute.py), ``capacity_combine`` (capacity.py) and the
fused layer's combine: one kernel.

One program per (block of tokens, H block): for j = 0..k-1 in order, look up the row holding slot
``t*k+j`` (``slot_rows`` / ``ids*C + slot_pos`` / the slot itself for the fused layer's
slot-ordered buffer), and ``acc += w * row`` in float32 (float64 for float64 data, as the reference); rows of -1 contribute nothing (not even
a NaN weight). A fixed j order and no atomics make the sum bitwise deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreted, launch, next_pow2

MODE_ROWS = 0      # y_sorted[slot_rows[s]]           (unpermute)
MODE_CAPACITY = 1  # buf_out[ids[s] * C + slot_pos[s]] (capacity_combine)
MODE_SLOT = 2      # y[s]                              (fused layer: already weighted, slot order)


@triton.jit
def _combine_kernel(y_ptr, map_ptr, ids_ptr, w_ptr, out_ptr, T, H, E, C, R, stride_y,
                    K: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t = t.to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h[None, :] < H
    acc = tl.full([BLOCK_T, BLOCK_H], 0, ACC)
    for j in tl.static_range(K):
        s = t * K + j
        if MODE == 2:
            row = s
            ok = tm
        else:
            r = tl.load(map_ptr + s, mask=tm, other=-1)
            # out-of-range indices (value checks off) contribute nothing, as -1 does: never a
            # read outside y (the CUDA/CPU kernels drop them the same way)
            if MODE == 1:
                e = tl.load(ids_ptr + s, mask=tm, other=-1)
                ok = (r >= 0) & (r < C) & (e >= 0) & (e < E)
                row = e.to(tl.int64) * C + r
            else:
                ok = (r >= 0) & (r < R)
                row = r.to(tl.int64)
        row = tl.where(ok, row, 0)
        y = tl.load(y_ptr + row[:, None] * stride_y + h[None, :], mask=hm & ok[:, None], other=0.0).to(ACC)
        if HAS_W:
            y = tl.load(w_ptr + s, mask=ok, other=0.0).to(ACC)[:, None] * y
        acc = tl.where(ok[:, None], acc + y, acc)
    tl.store(out_ptr + t[:, None] * H + h[None, :], acc.to(out_ptr.dtype.element_ty), mask=tm[:, None] & hm)


def combine(y: torch.Tensor, T: int, k: int, mode: int, slot_map=None, ids=None, weights=None,
            E: int = 1, C: int = 1) -> torch.Tensor:
    H = y.shape[-1]
    out = torch.empty((T, H), device=y.device, dtype=y.dtype)
    if T == 0 or H == 0:
        return out
    y2 = y.reshape(-1, H)
    y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    dummy = out
    block_h = min(256, next_pow2(H))
    block_t = max(1, min(next_pow2(T), (8192 if interpreted() else 1024) // block_h))
    launch(_combine_kernel, (cdiv(T, block_t), cdiv(H, block_h)), y2,
           slot_map.contiguous() if slot_map is not None else dummy,
           ids.contiguous() if ids is not None else dummy,
           weights.contiguous() if weights is not None else dummy,
           out, T, H, E, C, y2.shape[0], y2.stride(0), K=k, MODE=mode, HAS_W=weights is not None,
           BLOCK_T=block_t, BLOCK_H=block_h,
           ACC=tl.float64 if y.dtype == torch.float64 else tl.float32)
    return out

