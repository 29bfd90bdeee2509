"""The token exchange of expert parallelism: differentiable all-to-all and chunk sorting.

Dataflow (dropless): a rank's routed rows are grouped by *global* expert, hence by destination
rank (rank r owns experts ``[r*E_l, (r+1)*E_l)``).
:func:`exchange_counts` sends every rank the per-expert row counts meant for it (one tiny
all-to-all) and turns them into the python-int split sizes ``all_to_all_single`` needs: that
``.tolist()`` is the one host sync of dropless expert parallelism. :func:`all_to_all` moves the
rows; what arrives is ordered (source rank, local expert, slot), and :func:`sort_chunks_by_index`
reorders it to (local expert, source rank, slot) for the grouped GEMM. The way back applies the
inverse row map and the reverse all-to-all.

Everything here is made of device ops (``cumsum``, ``searchsorted``, ``index_select``,
``scatter``) so it runs on any device and backend (Gloo on CPU, NCCL on CUDA); the only host
reads are the documented split sizes. Row maps are permutations, so both directions are plain
gathers: deterministic, no atomics.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def group_size(group=None) -> int:
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    return dist.get_rank(group)


# ------------------------------------------------------------------------------- all-to-all

class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0; the backward is the reverse exchange (splits swapped).
    ``torch.distributed`` collectives are not differentiable by themselves."""

    @staticmethod
    def forward(ctx, x: Tensor, output_splits: Optional[List[int]], input_splits: Optional[List[int]], group):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        return _all_to_all_raw(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        # Through apply (not the raw call) so double backward works too.
        return _AllToAll.apply(grad, input_splits, output_splits, ctx.group), None, None, None


def _all_to_all_raw(x: Tensor, output_splits, input_splits, group) -> Tensor:
    x = x.contiguous()
    rows = x.shape[0] if output_splits is None else int(sum(output_splits))
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def all_to_all(x: Tensor, output_splits: Optional[Sequence[int]] = None,
               input_splits: Optional[Sequence[int]] = None, group=None) -> Tensor:
    """Differentiable ``all_to_all_single`` over dim 0 of ``x``.

    ``input_splits[r]`` rows of ``x`` go to rank r, ``output_splits[r]`` rows come from rank r
    (python ints; ``None`` means equal splits, ``x.shape[0]`` divisible by the group size).
    The gradient is the reverse all-to-all."""
    if (output_splits is None) != (input_splits is None):
        raise ValueError("moe_ops.parallel: give both output_splits and input_splits, or neither")
    w = group_size(group)
    if output_splits is not None:
        output_splits, input_splits = [int(s) for s in output_splits], [int(s) for s in input_splits]
        if len(output_splits) != w or len(input_splits) != w:
            raise ValueError(f"moe_ops.parallel: splits need {w} entries (group size), got "
                             f"{len(output_splits)} and {len(input_splits)}")
        if sum(input_splits) != x.shape[0]:
            raise ValueError(f"moe_ops.parallel: input_splits sum to {sum(input_splits)} but x has "
                             f"{x.shape[0]} rows")
    elif x.shape[0] % w:
        raise ValueError(f"moe_ops.parallel: equal-split all-to-all needs rows ({x.shape[0]}) "
                         f"divisible by the group size {w}")
    return _AllToAll.apply(x, output_splits, input_splits, group)


class Splits(NamedTuple):
    recv_counts: Tensor       # [world, E_local] on device: rows from rank src for local expert e
    send_splits: List[int]    # rows this rank sends to each rank
    recv_splits: List[int]    # rows this rank receives from each rank


def exchange_counts(counts: Tensor, group=None) -> Splits:
    """Exchange per-expert row counts and read the split sizes on the host.

    ``counts[E]`` (any int dtype, on the data's device) are this rank's rows per *global*
    expert; rank r owns experts ``[r*E_l, (r+1)*E_l)``. Returns the ``[world, E_l]`` counts this
    rank will receive (kept on device, no sync) and both split lists as python ints: the
    ``.tolist()`` here is dropless expert parallelism's one host sync (``all_to_all_single``
    takes its split sizes on the host, as in Megatron-Core and DeepSpeed)."""
    w = group_size(group)
    E = counts.numel()
    if E % w:
        raise ValueError(f"moe_ops.parallel: {E} experts do not split evenly over {w} ranks")
    send = counts.reshape(w, E // w).to(torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    both = torch.stack([send.sum(1), recv.sum(1)])
    send_splits, recv_splits = both.tolist()  # the documented host sync
    return Splits(recv, send_splits, recv_splits)


# ---------------------------------------------------------------------------- chunk sorting

class RowMap(NamedTuple):
    """A permutation of rows and its inverse: ``out = x[forward]``, ``x = out[inverse]``."""
    forward: Tensor   # [N] int64
    inverse: Tensor   # [N] int64


def chunk_row_map(split_sizes: Tensor, sorted_index: Tensor, num_rows: int) -> RowMap:
    """Row map that reorders chunks: the rows of ``x`` form consecutive chunks of
    ``split_sizes[c]`` rows; the result holds chunk ``sorted_index[0]``, then
    ``sorted_index[1]``, ... (Transformer Engine's ``sort_chunks_by_index`` order).

    Rows past ``split_sizes.sum()`` (if ``num_rows`` is larger) stay where they are.
    ``num_rows`` is a python int (the exchange's output size, already on the host), so no sync;
    the map is built with ``cumsum`` + ``searchsorted`` on the device."""
    dev = split_sizes.device
    sizes = split_sizes.reshape(-1).to(torch.int64)
    order = sorted_index.reshape(-1).to(device=dev, dtype=torch.int64)
    n = sizes.numel()
    if order.numel() != n:
        raise ValueError(f"moe_ops.parallel: sorted_index has {order.numel()} entries for {n} chunks")
    starts = torch.cumsum(sizes, 0) - sizes                    # old start of each chunk
    new_sizes = sizes.index_select(0, order)
    new_ends = torch.cumsum(new_sizes, 0)
    new_starts = new_ends - new_sizes
    j = torch.arange(num_rows, device=dev, dtype=torch.int64)
    c = torch.searchsorted(new_ends, j, right=True)            # new chunk of output row j
    inside = c < n
    cc = torch.clamp(c, max=max(n - 1, 0))
    if n == 0:
        forward = j
    else:
        forward = torch.where(inside, starts.index_select(0, order.index_select(0, cc)) + j
                              - new_starts.index_select(0, cc), j)
    inverse = torch.empty_like(forward).scatter_(0, forward, j)
    return RowMap(forward, inverse)


class _GatherRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward gathers with its inverse (no
    index_add, so no atomics and bitwise-deterministic gradients)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor):
        ctx.save_for_backward(index, inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _GatherRows.apply(grad, inverse, index), None, None


def apply_row_map(x: Tensor, row_map: RowMap, *, inverse: bool = False) -> Tensor:
    """Reorder the rows of ``x`` by ``row_map`` (or undo it with ``inverse=True``); differentiable."""
    fwd, inv = (row_map.inverse, row_map.forward) if inverse else (row_map.forward, row_map.inverse)
    if x.shape[0] != fwd.numel():
        raise ValueError(f"moe_ops.parallel: row map for {fwd.numel()} rows applied to {x.shape[0]}")
    return _GatherRows.apply(x, fwd, inv)


def sort_chunks_by_index(x: Tensor, split_sizes: Tensor, sorted_index: Tensor) -> Tuple[Tensor, RowMap]:
    """Reorder consecutive row chunks of ``x`` (sizes ``split_sizes``) into the order
    ``sorted_index`` (like Transformer Engine's op). Returns the result and the :class:`RowMap`
    (undo with ``apply_row_map(y, row_map, inverse=True)``)."""
    row_map = chunk_row_map(split_sizes, sorted_index, x.shape[0])
    return apply_row_map(x, row_map), row_map


def expert_major_order(world: int, experts_per_rank: int, device=None) -> Tensor:
    """Chunk order turning (source rank, local expert) chunks into (local expert, source rank)."""
    return torch.arange(world * experts_per_rank, device=device).reshape(world, experts_per_rank).t().reshape(-1)
