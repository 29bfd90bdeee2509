"""Router: ``topk_gating`` as one Triton kernel, one program per token row.

Dataflow per row: load the E logits as a [n_group, E/n_group] tile (one group when routing is
not group-limited) -> float32 scores (softmax or sigmoid) -> selection keys -> optional group
pruning (group score = sum of its top-2 keys, keep the ``topk_group`` best groups, others -inf)
-> k rounds of "take the max key" -> weights = scores of the picks (renormalised, scaled).

Ranking maps each float key to an order-preserving int64 (NaN below -inf, -0.0 == +0.0,
masked lanes below everything); a pick is "max of that int, then the lowest lane among the
equal ones", so ties go to the lower expert index with no float-compare subtleties. float64
logits are scored, ranked and weighted in float64 (as the reference does); everything else in
float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import cdiv, interpreted, launch, next_pow2

# Below every real key (NaN maps just above it).
_MASKED = tl.constexpr(-9223372036854775807)
_NAN = tl.constexpr(-9223372036854775806)


@triton.jit
def _order(key, valid):
    """Order-preserving int64 of a float32/float64 key; NaN lowest, masked lanes lower still."""
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 ties with +0.0
    if key.dtype == tl.float64:
        bits = key.to(tl.int64, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        bits = key.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    bits = tl.where(key != key, _NAN, bits)
    return tl.where(valid, bits, _MASKED)


@triton.jit
def _max2(v):
    return tl.max(tl.max(v, 2), 1)


@triton.jit
def _min2(v):
    return tl.min(tl.min(v, 2), 1)


@triton.jit
def _sum2(v):
    return tl.sum(tl.sum(v, 2), 1)


@triton.jit
def _topk_gating_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    T, stride_t, E, G, NG, topk_group, scaling_factor,
    K: tl.constexpr, K_PAD: tl.constexpr, NG_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, GROUPED: tl.constexpr,
    COMPUTE: tl.constexpr, SCALE: tl.constexpr,
):
    """BLOCK_T token rows per program; a row is a [NG_PAD, G_PAD] tile (axis 1 = group)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    t3 = t.to(tl.int64)[:, None, None]
    g = tl.arange(0, NG_PAD)[None, :, None]
    i = tl.arange(0, G_PAD)[None, None, :]
    e = g * G + i
    lane = g * G_PAD + i  # increases with e, so "lowest lane" == "lowest expert index"
    lanes = NG_PAD * G_PAD
    valid = (g < NG) & (i < G) & tm[:, None, None]
    x = tl.load(logits_ptr + t3 * stride_t + e, mask=valid, other=0.0).to(COMPUTE)
    isnan = x != x
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-x))
    else:
        m = _max2(tl.where(valid & ~isnan, x, float("-inf")))
        p = tl.where(valid, tl.exp(x - m[:, None, None]), 0.0)
        scores = p / _sum2(p)[:, None, None]
        any_nan = _max2(tl.where(valid & isnan, 1, 0))
        scores = tl.where(any_nan[:, None, None] > 0, float("nan"), scores)  # as torch.softmax
    if HAS_BIAS:
        key = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(COMPUTE)
    elif SIGMOID:
        key = scores
    else:
        key = x  # same order as the probabilities, without their rounding ties
    ordv = _order(key, valid)
    if GROUPED:
        # group score: sum of the group's top-min(2, G) keys (ranked by the same rule)
        best = tl.max(ordv, 2)
        first = tl.min(tl.where(ordv == best[:, :, None], lane, lanes), 2)
        pick1 = lane == first[:, :, None]
        gs = tl.sum(tl.where(pick1, key, 0.0), 2)
        if G_PAD >= 2:
            rest = tl.where(pick1, _MASKED, ordv)
            best2 = tl.max(rest, 2)
            second = tl.min(tl.where((rest == best2[:, :, None]) & valid, lane, lanes), 2)
            gs = gs + tl.sum(tl.where(lane == second[:, :, None], key, 0.0), 2)
        gidx = tl.arange(0, NG_PAD)[None, :]
        gord = _order(gs, gidx < NG)
        keep = gord < _MASKED  # all False, [BLOCK_T, NG_PAD]
        for _ in range(topk_group):
            gbest = tl.max(gord, 1)
            gsel = tl.min(tl.where(gord == gbest[:, None], gidx, NG_PAD), 1)
            keep = keep | (gidx == gsel[:, None])
            gord = tl.where(gidx == gsel[:, None], _MASKED, gord)
        key = tl.where(keep[:, :, None], key, float("-inf"))
        ordv = _order(key, valid)
    col = tl.arange(0, K_PAD)[None, :]
    wv = tl.full([BLOCK_T, K_PAD], 0, COMPUTE)
    iv = tl.full([BLOCK_T, K_PAD], 0, tl.int32)
    for j in tl.static_range(K):
        best = _max2(ordv)
        pick = _min2(tl.where(ordv == best[:, None, None], lane, lanes))
        sel = lane == pick[:, None, None]
        wj = _sum2(tl.where(sel, scores, 0.0))
        ej = _sum2(tl.where(sel, e, 0))
        wv = tl.where(col == j, wj[:, None], wv)
        iv = tl.where(col == j, ej[:, None], iv)
        ordv = tl.where(sel, _MASKED, ordv)
    if RENORM:
        wv = wv / (tl.sum(wv, 1)[:, None] + 1e-20)
    if SCALE:
        wv = wv * scaling_factor
    out = t.to(tl.int64)[:, None] * K + col
    omask = tm[:, None] & (col < K)
    tl.store(w_ptr + out, wv, mask=omask)
    tl.store(ids_ptr + out, iv, mask=omask)


def topk_gating(logits: torch.Tensor, k: int, scoring: str, renormalize: bool, n_group: int,
                topk_group: int, correction_bias: Optional[torch.Tensor],
                scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    wdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    weights = torch.empty((T, k), device=logits.device, dtype=wdtype)
    ids = torch.empty((T, k), device=logits.device, dtype=torch.int32)
    if T == 0:
        return weights, ids
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grouped = n_group > 0
    ng = n_group if grouped else 1
    G = E // ng
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    lanes = next_pow2(ng) * next_pow2(G)
    # rows per program: fill ~4K lanes on a GPU; more under the interpreter (fewer programs)
    budget = 1 << 15 if interpreted() else 1 << 12
    block_t = max(1, min(next_pow2(T), budget // lanes, 64))
    launch(_topk_gating_kernel, (cdiv(T, block_t),), logits, bias, weights, ids,
           T, logits.stride(0), E, G, ng, topk_group if grouped else 0, float(scaling_factor),
           K=k, K_PAD=next_pow2(k), NG_PAD=next_pow2(ng), G_PAD=next_pow2(G), BLOCK_T=block_t,
           SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
           RENORM=bool(renormalize), GROUPED=grouped,
           COMPUTE=tl.float64 if wdtype == torch.float64 else tl.float32,
           SCALE=wdtype == torch.float32, num_warps=4 if block_t * lanes <= 2048 else 8)
    if wdtype == torch.float64 and scaling_factor != 1.0:
        weights.mul_(scaling_factor)  # a float kernel argument would be rounded to float32
    return weights, ids
