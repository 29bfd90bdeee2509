"""Expert-parallel MoE forward: :func:`moe_ops.moe_forward` with the experts sharded over a
process group.

Each of the ``world`` ranks holds ``E_l = E / world`` experts (rank r: global experts
``[r*E_l, (r+1)*E_l)``) and its own tokens. Per layer call:

dropless (``capacity_factor=None``, Megatron "alltoall" dispatcher)::

    topk_gating (all E) -> permute by global expert  == grouped by destination rank
    -> exchange_counts (tiny all-to-all + the one host sync: split sizes)
    -> all_to_all rows -> sort_chunks (src, e) -> (e, src) -> grouped GEMMs on local experts
    -> inverse row map -> reverse all_to_all -> unpermute with the router weights

capacity (``capacity_factor=c``, GShard/Tutel)::

    topk_gating -> capacity_dispatch buf[E, C, H] == [world, E_l, C, H]
    -> equal-split all_to_all (static shapes, no host sync) -> [world(src), E_l, C, H]
    -> transpose to [E_l, world*C, H] -> grouped GEMMs over uniform offsets
    -> transpose back -> all_to_all -> capacity_combine

Capacity ``C`` comes from the rank's own token count, and drops are decided per source rank (as in
GShard/DeepSpeed), so every rank's output equals the single-process layer run on that rank's
tokens, in both modes. Capacity mode needs the same T on every rank (equal-split buffers).

allgather (``dispatch="allgather"``, vLLM's naive EP / "allgather-reducescatter"): tokens and
router results are all-gathered, every rank runs its local experts on all tokens via
``permute(..., expert_range=...)`` (other experts' slots dropped), and a reduce-scatter sums the
partial outputs back to their owners. Static shapes, no host sync, ``world`` x more traffic;
for small decode batches. Needs the same T on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .. import backend as _backend
from ..ops import capacity_combine, capacity_dispatch, expert_capacity, gated_activation, grouped_gemm, permute, \
    topk_gating, unpermute
from . import exchange as _x

Tensor = torch.Tensor
DISPATCHES = ("alltoall", "allgather")


def _shard_shapes(x: Tensor, num_experts: int, w_gate_up: Tensor, w_down: Tensor, world: int):
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError("moe_ops.parallel: need x[T, H], w_gate_up[E_l, 2I, H], w_down[E_l, H, I]")
    T, H = x.shape
    E_l, two_i, h2 = w_gate_up.shape
    if num_experts != E_l * world:
        raise ValueError(f"moe_ops.parallel: router has {num_experts} experts but {world} ranks x {E_l} local "
                         f"experts = {E_l * world}")
    if h2 != H or two_i % 2 or tuple(w_down.shape) != (E_l, H, two_i // 2):
        raise ValueError(f"moe_ops.parallel: local experts must be w_gate_up[E_l, 2I, H={H}], "
                         f"w_down[E_l, H, I]; got {tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError("moe_ops.parallel: x, w_gate_up and w_down must share a dtype")
    return T, H, num_experts, E_l


def _experts(x_local: Tensor, w_gate_up: Tensor, w_down: Tensor, offsets: Tensor, activation: str, bk) -> Tensor:
    h = grouped_gemm(x_local, w_gate_up, offsets, trans_b=True, backend=bk("grouped_gemm"))
    return grouped_gemm(gated_activation(h, activation), w_down, offsets, trans_b=True, backend=bk("grouped_gemm"))


def expert_parallel_forward(x: Tensor, router_logits: Tensor, w_gate_up: Tensor, w_down: Tensor, k: int, *,
                            group=None, dispatch: str = "alltoall", activation: str = "swiglu",
                            scoring: str = "softmax", renormalize: bool = False, n_group: Optional[int] = None,
                            topk_group: Optional[int] = None, correction_bias: Optional[Tensor] = None,
                            scaling_factor: float = 1.0, capacity_factor: Optional[float] = None,
                            min_capacity: int = 0, priority: str = "kmajor", backend: Optional[str] = None,
                            stats: Optional[dict] = None) -> Tensor:
    """Expert-parallel :func:`moe_ops.moe_forward`.

    ``x[T, H]`` and ``router_logits[T, E]`` are this rank's tokens; ``w_gate_up[E_l, 2I, H]`` and
    ``w_down[E_l, H, I]`` its experts (global ``[rank*E_l, (rank+1)*E_l)``). Returns ``out[T, H]``,
    equal to ``moe_forward`` on this rank's tokens with the full expert weights. Differentiable
    w.r.t. ``x``, ``router_logits`` and the local weights (the exchange's backward is the reverse
    exchange). ``stats`` (a dict), if given, receives the rows/bytes this rank sent and received.
    """
    if router_logits.dim() != 2 or x.dim() != 2 or router_logits.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ops.parallel: need x[T, H] and router_logits[T, E], got {tuple(x.shape)} and "
                         f"{tuple(router_logits.shape)}")
    _shard_shapes(x, router_logits.shape[1], w_gate_up, w_down, _x.group_size(group))
    weights, ids = topk_gating(router_logits, k, scoring=scoring, renormalize=renormalize, n_group=n_group,
                               topk_group=topk_group, correction_bias=correction_bias,
                               scaling_factor=scaling_factor,
                               backend=_backend.resolved_name("topk_gating", x.device.type, backend, strict=False))
    return expert_parallel_experts(x, weights, ids, w_gate_up, w_down, group=group, dispatch=dispatch,
                                   activation=activation, capacity_factor=capacity_factor,
                                   min_capacity=min_capacity, priority=priority, backend=backend, stats=stats)


def expert_parallel_experts(x: Tensor, weights: Tensor, ids: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                            group=None, dispatch: str = "alltoall", activation: str = "swiglu",
                            capacity_factor: Optional[float] = None, min_capacity: int = 0,
                            priority: str = "kmajor", backend: Optional[str] = None,
                            stats: Optional[dict] = None) -> Tensor:
    """The routed half of the layer for given router output (the expert-parallel
    ``moe_ops.layer.experts_forward``): ``weights[T, k]``, *global* ``ids[T, k]`` in
    ``[0, world*E_l)``, this rank's ``w_gate_up[E_l, 2I, H]`` / ``w_down[E_l, H, I]``."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe_ops.parallel: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if ids.dim() != 2 or weights.shape != ids.shape or ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ops.parallel: need weights and ids [T={x.shape[0]}, k], got "
                         f"{tuple(weights.shape)} and {tuple(ids.shape)}")
    world, rank = _x.group_size(group), _x.group_rank(group)
    T, H, E, E_l = _shard_shapes(x, w_gate_up.shape[0] * world, w_gate_up, w_down, world)
    k = ids.shape[1]

    def bk(op):
        return _backend.resolved_name(op, x.device.type, backend, strict=False)

    if dispatch == "allgather":
        return _allgather(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation,
                          capacity_factor, bk, stats)
    if capacity_factor is None:
        return _dropless(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation, bk, stats)
    return _capacity(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation,
                     expert_capacity(T, k, E, capacity_factor, min_capacity=min_capacity), priority, bk, stats)


def _record(stats, rows_sent, rows_recv, dispatch_row_bytes, combine_row_bytes, **extra):
    """Remote traffic of one forward (rows to/from *other* ranks; the backward moves as much
    again in reverse): dispatch rows, and bytes of dispatch + combine."""
    if stats is not None:
        stats.update(rows_sent=rows_sent, rows_recv=rows_recv,
                     bytes_sent=rows_sent * (dispatch_row_bytes + combine_row_bytes),
                     bytes_recv=rows_recv * (dispatch_row_bytes + combine_row_bytes), **extra)


def _dropless(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation, bk, stats):
    H = x.shape[1]
    # Rows grouped by global expert, i.e. by destination rank then local expert.
    x_sorted, _, offsets, slot_rows = permute(x, ids, E, backend=bk("permute"))
    splits = _x.exchange_counts(offsets[1:] - offsets[:-1], group)            # the host sync
    x_recv = _x.all_to_all(x_sorted, splits.recv_splits, splits.send_splits, group)
    # Arrived as (source rank, local expert); the grouped GEMM wants (local expert, source rank).
    order = _x.expert_major_order(world, E_l, device=x.device)
    x_local, row_map = _x.sort_chunks_by_index(x_recv, splits.recv_counts, order)
    per_expert = splits.recv_counts.sum(0)
    local_offsets = torch.cat([per_expert.new_zeros(1), torch.cumsum(per_expert, 0)]).to(torch.int32)
    y_local = _experts(x_local, w_gate_up, w_down, local_offsets, activation, bk)
    y_recv = _x.apply_row_map(y_local, row_map, inverse=True)
    y_sorted = _x.all_to_all(y_recv, splits.send_splits, splits.recv_splits, group)
    row = H * x.element_size()
    _record(stats, sum(splits.send_splits) - splits.send_splits[rank],
            sum(splits.recv_splits) - splits.recv_splits[rank], row, row,
            send_splits=splits.send_splits, recv_splits=splits.recv_splits)
    return unpermute(y_sorted, slot_rows, weights, k=k, backend=bk("unpermute"))


def _capacity(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation, C, priority, bk, stats):
    H = x.shape[1]
    buf, slot_pos, demand, kept = capacity_dispatch(x, ids, E, C, priority=priority,
                                                    backend=bk("capacity_dispatch"))
    recv = _x.all_to_all(buf.reshape(E * C, H), group=group)                   # [src, E_l, C, H]
    # Uniform chunks: sorting (src, e) -> (e, src) is a transpose (its backward is one too).
    x_local = recv.reshape(world, E_l, C, H).transpose(0, 1).reshape(E_l * world * C, H)
    offsets = torch.arange(E_l + 1, device=x.device, dtype=torch.int32) * (world * C)
    y_local = _experts(x_local, w_gate_up, w_down, offsets, activation, bk)
    y_recv = y_local.reshape(E_l, world, C, H).transpose(0, 1).reshape(E * C, H)
    y_buf = _x.all_to_all(y_recv, group=group).reshape(E, C, H)
    row = H * x.element_size()
    # dropped_slots stays a device tensor: reading it is the caller's choice (and sync).
    _record(stats, (E - E_l) * C, (E - E_l) * C, row, row, capacity=C,
            dropped_slots=(demand.sum() - kept.sum()).detach())
    return capacity_combine(y_buf, ids, slot_pos, weights, backend=bk("capacity_combine"))


# torch >= 2.10 names these *_single; older releases only have the *_tensor spelling.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 (equal rows per rank); backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = _x.group_size(group)
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _ReduceScatter.apply(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    """Sum over ranks, rank r keeps rows block r; backward: all_gather of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = _x.group_size(group)
        out = x.new_empty((x.shape[0] // world,) + tuple(x.shape[1:]))
        _reduce_scatter(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group), None


def _allgather(x, weights, ids, w_gate_up, w_down, k, E, E_l, world, rank, group, activation,
               capacity_factor, bk, stats):
    if capacity_factor is not None:
        raise ValueError("moe_ops.parallel: dispatch='allgather' is dropless (capacity_factor=None)")
    T, H = x.shape
    x_all = _AllGather.apply(x, group)
    w_all = _AllGather.apply(weights, group)
    ids_all = ids.new_empty((world * T, k))
    _all_gather(ids_all, ids.contiguous(), group=group)
    # vLLM's expert map: only this rank's experts stay, as local ids; other slots are dropped.
    x_sorted, _, offsets, slot_rows = permute(x_all, ids_all, E, expert_range=(rank * E_l, E_l),
                                              backend=bk("permute"))
    y_sorted = _experts(x_sorted, w_gate_up, w_down, offsets, activation, bk)
    partial = unpermute(y_sorted, slot_rows, w_all, k=k, backend=bk("unpermute"))
    out = _ReduceScatter.apply(partial, group)
    row = H * x.element_size()
    _record(stats, T * (world - 1), T * (world - 1), row + k * (weights.element_size() + 4), row)
    return out
