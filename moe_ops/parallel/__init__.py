"""Expert parallelism on ``torch.distributed``: experts sharded over a process group, tokens
exchanged with ``all_to_all_single`` (NCCL on GPUs, Gloo on CPU). See docs/parallel.md.

* :func:`expert_parallel_forward` -- the functional layer (dropless / capacity / allgather);
* :mod:`.exchange` -- differentiable all-to-all, the count exchange (the one host sync of
  dropless mode) and :func:`sort_chunks_by_index`.
"""
from .exchange import (RowMap, Splits, all_to_all, apply_row_map, chunk_row_map, exchange_counts,
                       expert_major_order, sort_chunks_by_index)
from .functional import DISPATCHES, expert_parallel_forward

__all__ = [
    "DISPATCHES", "RowMap", "Splits", "all_to_all", "apply_row_map", "chunk_row_map", "exchange_counts",
    "expert_major_order", "expert_parallel_forward", "sort_chunks_by_index",
]
