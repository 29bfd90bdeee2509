"""Expert parallelism on ``torch.distributed``: experts sharded over a process group, tokens
exchanged with ``all_to_all_single`` (NCCL on GPUs, Gloo on CPU). See docs/parallel.md.

* :class:`ExpertParallelMoE` -- ``moe_ops.MoE`` with sharded experts (``from_moe`` converts a
  single-process layer; :func:`shard_state_dict` shards a checkpoint);
* :func:`expert_parallel_forward` -- the functional layer (dropless / capacity / allgather);
* :mod:`.exchange` -- differentiable all-to-all, the count exchange (the one host sync of
  dropless mode) and :func:`sort_chunks_by_index`.
"""
from .exchange import (RowMap, Splits, all_to_all, apply_row_map, chunk_row_map, exchange_counts,
                       expert_major_order, sort_chunks_by_index)
from .functional import DISPATCHES, expert_parallel_experts, expert_parallel_forward


def __getattr__(name):
    # The layer needs moe_ops.layer; import it on first use so the functional API works alone.
    if name in ("ExpertParallelMoE", "shard_state_dict"):
        from . import layer
        return getattr(layer, name)
    raise AttributeError(f"module 'moe_ops.parallel' has no attribute {name!r}")


__all__ = [
    "DISPATCHES", "RowMap", "Splits", "all_to_all", "apply_row_map", "chunk_row_map", "exchange_counts",
    "expert_major_order", "expert_parallel_experts", "expert_parallel_forward", "ExpertParallelMoE",
    "shard_state_dict", "sort_chunks_by_index",
]
