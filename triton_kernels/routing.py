"""Router: ``topk_gating`` as one Triton kernel, one program per token row.

Dataflow per row: load the E logits as a [n_group, E/n_group] tile (one group when routing is
not group-limited) -> float32 scores (softmax or sigmoid) -> selection keys -> optional group
pruning (group score = sum of its top-2 keys, keep the ``topk_group`` best groups, others -inf)
-> k rounds of "take the max key" -> weights = scores of the picks (renormalised, scaled).

Ranking uses one int64 per expert: the float key mapped to an order-preserving int32 (NaN below
-inf, -0.0 == +0.0) in the high half and the *reversed* lane index in the low half, so a plain
integer max is "highest key, ties to the lower index" with no float compare subtleties.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch, next_pow2

# Below every real composite key (NaN maps to -2^31+1 in the high half).
_NEG = tl.constexpr(-9223372036854775807)


@triton.jit
def _rank_key(key, lane, valid, LANES: tl.constexpr):
    """Order-preserving int64 of (key, -lane); invalid lanes get the minimum."""
    key = tl.where(key == 0.0, 0.0, key)  # -0.0 ties with +0.0
    bits = key.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    bits = tl.where(key != key, -2147483647, bits)  # NaN ranks below -inf
    comp = (bits << 32) | (LANES - 1 - lane).to(tl.int64)
    return tl.where(valid, comp, _NEG)


@triton.jit
def _topk_gating_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    stride_t, E, G, NG, topk_group, scaling_factor,
    K: tl.constexpr, K_PAD: tl.constexpr, NG_PAD: tl.constexpr, G_PAD: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, GROUPED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG_PAD)[:, None]
    i = tl.arange(0, G_PAD)[None, :]
    e = g * G + i
    valid = (g < NG) & (i < G)
    x = tl.load(logits_ptr + t * stride_t + e, mask=valid, other=0.0).to(tl.float32)
    isnan = x != x
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        m = tl.max(tl.max(tl.where(valid & ~isnan, x, float("-inf")), 1), 0)
        p = tl.where(valid, tl.exp(x - m), 0.0)
        scores = p / tl.sum(tl.sum(p, 1), 0)
        any_nan = tl.max(tl.max(tl.where(valid & isnan, 1, 0), 1), 0)
        scores = tl.where(any_nan > 0, float("nan"), scores)  # as torch.softmax
    if HAS_BIAS:
        key = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    elif SIGMOID:
        key = scores
    else:
        key = x  # same order as the probabilities, without their rounding ties
    lanes = NG_PAD * G_PAD
    lane = g * G_PAD + i
    comp = _rank_key(key, lane, valid, lanes)
    if GROUPED:
        # group score: sum of the group's top-min(2, G) keys
        top1 = tl.max(comp, 1)
        pick1 = comp == top1[:, None]
        gs = tl.sum(tl.where(pick1, key, 0.0), 1)
        if G_PAD >= 2:
            comp2 = tl.where(pick1, _NEG, comp)
            top2 = tl.max(comp2, 1)
            gs = gs + tl.sum(tl.where((comp2 == top2[:, None]) & valid, key, 0.0), 1)
        gidx = tl.arange(0, NG_PAD)
        gcomp = _rank_key(gs, gidx, gidx < NG, NG_PAD)
        keep = gidx < 0
        for _ in range(topk_group):
            best = tl.max(gcomp, 0)
            keep = keep | (gcomp == best)
            gcomp = tl.where(gcomp == best, _NEG, gcomp)
        key = tl.where(keep[:, None], key, float("-inf"))
        comp = _rank_key(key, lane, valid, lanes)
    col = tl.arange(0, K_PAD)
    wv = tl.zeros([K_PAD], dtype=tl.float32)
    iv = tl.zeros([K_PAD], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(tl.max(comp, 1), 0)
        sel = comp == best
        wj = tl.sum(tl.sum(tl.where(sel, scores, 0.0), 1), 0)
        ej = tl.sum(tl.sum(tl.where(sel, e, 0), 1), 0)
        wv = tl.where(col == j, wj, wv)
        iv = tl.where(col == j, ej, iv)
        comp = tl.where(sel, _NEG, comp)
    if RENORM:
        wv = wv / (tl.sum(wv, 0) + 1e-20)
    wv = wv * scaling_factor
    tl.store(w_ptr + t * K + col, wv, mask=col < K)
    tl.store(ids_ptr + t * K + col, iv, mask=col < K)


def topk_gating(logits: torch.Tensor, k: int, scoring: str, renormalize: bool, n_group: int,
                topk_group: int, correction_bias, scaling_factor: float):
    T, E = logits.shape
    weights = torch.empty((T, k), device=logits.device, dtype=torch.float32)
    ids = torch.empty((T, k), device=logits.device, dtype=torch.int32)
    if T == 0:
        return weights, ids
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    grouped = n_group > 0
    ng = n_group if grouped else 1
    G = E // ng
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    launch(_topk_gating_kernel, (T,), logits, bias, weights, ids,
           logits.stride(0), E, G, ng, topk_group if grouped else 0, float(scaling_factor),
           K=k, K_PAD=next_pow2(k), NG_PAD=next_pow2(ng), G_PAD=next_pow2(G),
           SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
           RENORM=bool(renormalize), GROUPED=grouped)
    return weights, ids
