"""``permute`` and ``unpermute``: the dropless dispatch and combine.

``permute`` is the index build (index_build.py: a stable counting sort of the slots by expert)
followed by a row gather; ``unpermute`` is the weighted k-sum (weighted_combine.py) reading each
slot's row through ``slot_rows``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .index_build import build_index, gather_rows
from .weighted_combine import MODE_ROWS, combine


def permute(x: torch.Tensor, ids: torch.Tensor, num_experts: int,
            block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, k = ids.shape
    slot_rows, sorted_slots, offsets, _, _ = build_index(ids, num_experts, block_m=block_m)
    x_sorted = gather_rows(x, sorted_slots, k, sorted_slots.shape[0])
    return x_sorted, sorted_slots, offsets, slot_rows


def unpermute(y_sorted: torch.Tensor, slot_rows: torch.Tensor, weights: Optional[torch.Tensor],
              k: int) -> torch.Tensor:
    T = slot_rows.numel() // k
    return combine(y_sorted, T, k, MODE_ROWS, slot_map=slot_rows, weights=weights)
