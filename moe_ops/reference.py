"""Pure-PyTorch reference of every moe_ops op: the correctness oracle (backend ``reference``).

Each function takes its op's schema arguments positionally, in schema order (``csrc/schemas.h``),
and implements DESIGN.md's semantics literally. They are written to be obviously right *and*

* static-shape and host-sync free (no ``.item()``, ``.tolist()``, ``nonzero`` or boolean-mask
  indexing): selections are stable sorts, ``cumsum``, ``one_hot``, ``scatter``, ``gather`` and
  ``torch.where`` masks, so they run under ``torch.compile(fullgraph=True)`` and CUDA graphs;
* differentiable where the math is (router weights w.r.t. logits, ``x``, ``y_sorted``,
  ``buf_out``, the combine weights, ``a`` and ``b`` of the GEMMs);
* device- and dtype-generic: CPU or CUDA, any float dtype. Arithmetic runs in float32
  (``float64`` inputs stay float64, so ``torch.autograd.gradcheck`` works) and results are cast to
  the dtype DESIGN.md names (router weights float32 -- float64 for float64 logits).

Rows that hold nothing (padding, dropped slots, unused capacity) are produced by gathering from
an appended all-zero row, never by multiplying by zero, so NaN/Inf in unused input rows can not
leak into outputs. Invalid expert ids (outside ``[0, E)``) are dropped by every op.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------ helpers

def _acc_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype accumulates in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rank_order(key: Tensor) -> Tensor:
    """Indices that order the last dim of ``key`` by the moe_ops ranking rule: descending,
    NaN below everything (below -inf), ties to the lower index; ``-0.0 == +0.0``.

    Two stable sorts: by value (NaN treated as -inf), then by "is NaN" so NaNs move behind the
    true -infs without disturbing anyone's relative order."""
    nan = torch.isnan(key)
    v = torch.where(nan, torch.full_like(key, float("-inf")), key)
    v = torch.where(v == 0, torch.zeros_like(v), v)  # -0.0 -> +0.0: a tie, not an order
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices
    nan_last = torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices
    return order.gather(-1, nan_last)


def _with_zero_row(t: Tensor) -> Tensor:
    """``t[R, H]`` -> ``[R + 1, H]`` whose last row is zero (the target of every 'nothing' index)."""
    return torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))], dim=0)


def _valid_ids(ids: Tensor, num_experts: int) -> Tensor:
    return (ids >= 0) & (ids < num_experts)


# ------------------------------------------------------------------------------------ router

def gating_scores(logits: Tensor, scoring: str) -> Tensor:
    """Router probabilities/scores ``[T, E]`` (float32, float64 for float64 logits)."""
    x = logits.to(_acc_dtype(logits))
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"reference.topk_gating: unknown scoring {scoring!r}")


def selection_keys(logits: Tensor, scoring: str, n_group: int, topk_group: int,
                   correction_bias: Optional[Tensor]) -> Tensor:
    """The per-expert key that ``topk_gating`` ranks ``[T, E]``, after group limiting
    (experts outside the kept groups get ``-inf``). Exposed for near-tie aware test comparisons."""
    x = logits.to(_acc_dtype(logits))
    scores = gating_scores(logits, scoring)
    if scoring == "softmax" and correction_bias is None:
        keys = x  # same order as the probabilities, without softmax's rounding ties
    else:
        bias = 0.0 if correction_bias is None else correction_bias.to(x.dtype)
        keys = scores + bias
    if n_group > 0:
        T, E = keys.shape
        G = E // n_group
        grouped = keys.reshape(T, n_group, G)
        top = grouped.gather(-1, rank_order(grouped)[..., : min(2, G)])
        group_score = top[..., 0] + top[..., 1] if top.shape[-1] == 2 else top[..., 0]
        best_groups = rank_order(group_score)[:, :topk_group]
        keep = torch.zeros(T, n_group, dtype=torch.bool, device=keys.device)
        keep = keep.scatter(1, best_groups, torch.ones_like(best_groups, dtype=torch.bool))
        keep = keep.unsqueeze(-1).expand(T, n_group, G).reshape(T, E)
        keys = torch.where(keep, keys, torch.full_like(keys, float("-inf")))
    return keys


def gating_weights(scores: Tensor, ids: Tensor, renormalize: bool, scaling_factor: float) -> Tensor:
    """Router weights of the chosen ``ids``: unbiased scores, optionally renormalised, scaled."""
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling_factor


def topk_gating(logits: Tensor, k: int, scoring: str, renormalize: bool, n_group: int,
                topk_group: int, correction_bias: Optional[Tensor],
                scaling_factor: float) -> Tuple[Tensor, Tensor]:
    """``logits[T, E]`` -> ``(weights[T, k] float32, ids[T, k] int32)``; columns by rank."""
    keys = selection_keys(logits, scoring, n_group, topk_group, correction_bias)
    ids = rank_order(keys)[:, :k]
    weights = gating_weights(gating_scores(logits, scoring), ids, renormalize, scaling_factor)
    return weights, ids.to(torch.int32)


# ---------------------------------------------------------------------------------- dispatch

def permute(x: Tensor, ids: Tensor, num_experts: int, block_m: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Group token copies by expert: ``(x_sorted[P, H], sorted_slots[P], expert_offsets[E+1],
    slot_rows[T*k])`` with ``P = T*k + E*(block_m - 1)``."""
    T, k = ids.shape
    E, S = num_experts, T * k
    P = S + E * (block_m - 1)
    dev = ids.device
    flat = ids.reshape(-1).long()
    valid = _valid_ids(flat, E)
    expert = torch.where(valid, flat, torch.full_like(flat, E))  # invalid slots sort last
    # Stable sort by expert: within an expert the slots stay in ascending s.
    order = torch.sort(expert, stable=True).indices                  # sorted position -> slot
    sorted_expert = expert.gather(0, order)
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add(0, expert, torch.ones_like(expert))
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    offsets = torch.cat([padded.new_zeros(1), torch.cumsum(padded, 0)])
    first = torch.cumsum(counts, 0) - counts                          # unpadded start per expert
    i = torch.arange(S, device=dev)
    rank_in_expert = i - first.gather(0, sorted_expert)
    row = torch.where(sorted_expert < E,
                      offsets.gather(0, sorted_expert) + rank_in_expert,
                      torch.full_like(i, -1))
    slot_rows = torch.full((S,), -1, dtype=torch.long, device=dev).scatter(0, order, row)
    # Invalid slots write into a dump entry P that is cut off afterwards.
    dest = torch.where(row >= 0, row, torch.full_like(row, P))
    sorted_slots = torch.full((P + 1,), -1, dtype=torch.long, device=dev).scatter(0, dest, order)[:P]
    src_token = torch.where(sorted_slots >= 0, sorted_slots // k, torch.full_like(sorted_slots, T))
    x_sorted = _with_zero_row(x).index_select(0, src_token)
    return x_sorted, sorted_slots.to(torch.int32), offsets.to(torch.int32), slot_rows.to(torch.int32)


def _combine(rows: Tensor, valid: Tensor, weights: Optional[Tensor], src: Tensor) -> Tensor:
    """``out[t] = sum_j w[t,j] * src[rows[t,j]]`` over valid slots, accumulated in j order."""
    T, k = rows.shape
    acc_dtype = _acc_dtype(src)
    table = _with_zero_row(src.to(acc_dtype))
    idx = torch.where(valid, rows.long(), torch.full_like(rows, table.shape[0] - 1, dtype=torch.long))
    picked = table.index_select(0, idx.reshape(-1)).reshape(T, k, src.shape[-1])
    acc = torch.zeros(T, src.shape[-1], dtype=acc_dtype, device=src.device)
    for j in range(k):
        term = picked[:, j] if weights is None else weights[:, j : j + 1].to(acc_dtype) * picked[:, j]
        # A dropped slot contributes nothing, even when its weight is NaN/Inf.
        acc = acc + torch.where(valid[:, j : j + 1], term, torch.zeros_like(term))
    return acc.to(src.dtype)


def unpermute(y_sorted: Tensor, slot_rows: Tensor, weights: Optional[Tensor], k: int) -> Tensor:
    """``out[t] = sum_j w[t,j] * y_sorted[slot_rows[t*k+j]]`` (``-1`` rows contribute nothing)."""
    rows = slot_rows.reshape(-1, k)
    valid = (rows >= 0) & (rows < y_sorted.shape[0])
    return _combine(rows, valid, weights, y_sorted)


def capacity_positions(ids: Tensor, num_experts: int, priority: str) -> Tensor:
    """GShard position of every slot ``[T, k]``: the number of earlier valid slots (in priority
    order) routed to the same expert; -1 for invalid ids. One-hot over experts, cumsum over the
    priority order, read back at the slot's own expert."""
    T, k = ids.shape
    E = num_experts
    if priority == "kmajor":
        ordered = ids.t().reshape(-1)      # (j, t): all first choices, then all second choices ...
    elif priority == "token_major":
        ordered = ids.reshape(-1)          # (t, j)
    else:
        raise ValueError(f"reference.capacity_dispatch: unknown priority {priority!r}")
    ordered = ordered.long()
    valid = _valid_ids(ordered, E)
    expert = torch.where(valid, ordered, torch.full_like(ordered, E))
    mask = torch.nn.functional.one_hot(expert, E + 1)                 # [S, E+1]
    before = torch.cumsum(mask, dim=0) - mask                         # exclusive prefix count
    pos = before.gather(1, expert.unsqueeze(1)).squeeze(1)
    pos = torch.where(valid, pos, torch.full_like(pos, -1))
    return pos.reshape(k, T).t().contiguous() if priority == "kmajor" else pos.reshape(T, k)


def capacity_dispatch(x: Tensor, ids: Tensor, num_experts: int, capacity: int,
                      priority: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(buf[E, C, H], slot_pos[T, k], demand[E], kept[E])``; unused buf rows are zero."""
    T, k = ids.shape
    E, C = num_experts, capacity
    dev = ids.device
    pos = capacity_positions(ids, E, priority)                      # [T, k], -1 = invalid id
    keep = (pos >= 0) & (pos < C)
    slot_pos = torch.where(keep, pos, torch.full_like(pos, -1))
    flat_ids = ids.long()
    dest = torch.where(keep, flat_ids * C + pos, torch.full_like(pos, E * C)).reshape(-1)  # E*C = dump
    token = torch.arange(T, device=dev).unsqueeze(1).expand(T, k).reshape(-1)
    src_token = torch.full((E * C + 1,), T, dtype=torch.long, device=dev).scatter(0, dest, token)[: E * C]
    buf = _with_zero_row(x).index_select(0, src_token).reshape(E, C, x.shape[1])
    valid = _valid_ids(flat_ids, E).reshape(-1)
    expert = torch.where(valid, flat_ids.reshape(-1), torch.full_like(valid, E, dtype=torch.long))
    demand = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add(0, expert, torch.ones_like(expert))[:E]
    kept = torch.clamp(demand, max=C)
    return buf, slot_pos.to(torch.int32), demand.to(torch.int32), kept.to(torch.int32)


def capacity_combine(buf_out: Tensor, ids: Tensor, slot_pos: Tensor, weights: Optional[Tensor]) -> Tensor:
    """``out[t] = sum_j w[t,j] * buf_out[ids[t,j], slot_pos[t,j]]`` over kept slots."""
    E, C, H = buf_out.shape
    ids64, pos = ids.long(), slot_pos.long()
    valid = (pos >= 0) & (pos < C) & _valid_ids(ids64, E)
    return _combine(ids64 * C + pos, valid, weights, buf_out.reshape(E * C, H))


# ----------------------------------------------------------------------------------- experts

def _rows_of_expert(offs: Tensor, r: Tensor, e: int) -> Tensor:
    """``[M, 1]`` bool: row r belongs to expert e iff ``offs[e] <= r < offs[e+1]`` (O(M) memory)."""
    return ((r >= offs[e]) & (r < offs[e + 1])).unsqueeze(1)


def grouped_gemm(a: Tensor, b: Tensor, expert_offsets: Tensor, trans_b: bool) -> Tensor:
    """``c[M, N]``: rows of expert e are ``a[rows] @ b[e]`` (``b[e].T`` when ``trans_b``); other
    rows 0. One full-M matmul per expert, the expert's rows selected by ``where`` (so values in
    other rows never leak), float32 accumulation."""
    acc = _acc_dtype(a)
    E = b.shape[0]
    M = a.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    offs, r = expert_offsets.long(), torch.arange(M, device=a.device)
    af = a.to(acc)
    c = torch.zeros(M, N, dtype=acc, device=a.device)
    for e in range(E):
        be = b[e].to(acc)
        ce = af @ (be.t() if trans_b else be)
        c = torch.where(_rows_of_expert(offs, r, e), ce, c)
    return c.to(a.dtype)


def grouped_gemm_wgrad(a: Tensor, dc: Tensor, expert_offsets: Tensor, num_experts: int) -> Tensor:
    """``db[E, K, N]``: ``db[e] = a[rows e]^T @ dc[rows e]`` (zero for experts with no rows)."""
    acc = _acc_dtype(a)
    M = a.shape[0]
    offs, r = expert_offsets.long(), torch.arange(M, device=a.device)
    af, dcf = a.to(acc), dc.to(acc)
    out = []
    for e in range(num_experts):
        m = _rows_of_expert(offs, r, e)
        ae = torch.where(m, af, torch.zeros_like(af))
        de = torch.where(m, dcf, torch.zeros_like(dcf))
        out.append(ae.t() @ de)
    if not out:
        return a.new_zeros(0, a.shape[1], dc.shape[1])
    return torch.stack(out).to(a.dtype)


# --------------------------------------------------------------------------- quantized weights
# The oracle of the weight-only formats (issue 17). Each returns float32 [..., N, K] from the
# checkpoint's own tensors; DESIGN.md "Quantized experts" has the layouts.

# OCP MX e2m1: sign bit 3, then the eight magnitudes of exponent/mantissa 00.0 .. 11.1.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8_block(q: Tensor, scale_inv: Tensor, block_n: int, block_k: int) -> Tensor:
    """``q[..., N, K]`` float8_e4m3fn times ``scale_inv[..., ceil(N/bn), ceil(K/bk)]`` per block
    (DeepSeek-V3 / Qwen3-FP8 ``weight_scale_inv``; edge blocks partial). fp8 NaN stays NaN."""
    N, K = q.shape[-2:]
    s = scale_inv.to(torch.float32).repeat_interleave(block_n, dim=-2)[..., :N, :]
    s = s.repeat_interleave(block_k, dim=-1)[..., :K]
    return q.to(torch.float32) * s


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """GPT-OSS MXFP4: ``blocks[..., N, K/32, 16]`` uint8 (two e2m1 codes a byte, low nibble
    first), ``scales[..., N, K/32]`` uint8 e8m0 -> ``[..., N, K]`` = value * 2^(scale - 127), as
    ``torch.ldexp`` computes it in float32, which is what transformers' ``convert_moe_packed_tensors``
    does: e8m0 255 is 2^128 (0.5 -> 2^127, larger codes overflow to +-inf, zeros stay 0; the OCP MX
    spec calls 255 NaN), 0 is 2^-127 (a float32 subnormal)."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)  # [..., N, K/32, 32], low nibble first
    vals = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127).unsqueeze(-1))
    return vals.flatten(-2)


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """``q[..., N, K]`` int8 times ``scale[..., N]`` (or ``[..., N, 1]``) per output channel."""
    s = scale.to(torch.float32)
    if s.dim() == q.dim():
        s = s.squeeze(-1)
    return q.to(torch.float32) * s.unsqueeze(-1)


def dequantize_experts(weight: Tensor, scale: Tensor, fmt: str, block_size: Tuple[int, int] = (128, 128)) -> Tensor:
    """float32 experts from one of the formats: ``fp8_e4m3`` (block-scaled), ``mxfp4`` (weight =
    the blocks, scale = the e8m0 scales), ``int8`` (per output channel)."""
    if fmt == "fp8_e4m3":
        return dequantize_fp8_block(weight, scale, block_size[0], block_size[1])
    if fmt == "mxfp4":
        return dequantize_mxfp4(weight, scale)
    if fmt == "int8":
        return dequantize_int8(weight, scale)
    raise ValueError(f"unknown weight format {fmt!r}")


def grouped_gemm_quantized(a: Tensor, b: Tensor, b_scale: Tensor, expert_offsets: Tensor, fmt: str,
                           block_n: int, block_k: int) -> Tensor:
    """:func:`grouped_gemm` (``trans_b``: ``b`` is the checkpoint's ``[E, N, K]``) on quantized
    experts: the dequantized float32 weights times ``a`` in float32 (float64 for float64 ``a``),
    output in ``a``'s dtype. The oracle of the quantized grouped GEMM kernels."""
    w = dequantize_experts(b, b_scale, fmt, (block_n, block_k))
    acc = _acc_dtype(a)
    return grouped_gemm(a.to(acc), w.to(acc), expert_offsets, True).to(a.dtype)
