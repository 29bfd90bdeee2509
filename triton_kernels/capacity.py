"""``capacity_dispatch`` and ``capacity_combine``: the capacity-limited (GShard) dispatch and combine.

``capacity_dispatch`` is the index build in priority order with a capacity cut (index_build.py)
followed by a row gather into ``buf[E, C, H]``; ``capacity_combine`` is the weighted k-sum
(weighted_combine.py) reading row ``ids * C + slot_pos`` of the experts' output.
"""
from __future__ import annotations

from typing import Optional

import torch

from .index_build import build_index, gather_rows
from .weighted_combine import MODE_CAPACITY, combine


def capacity_dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int, capacity: int,
                      priority: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, k = ids.shape
    H = x.shape[1]
    slot_pos, inv, demand, kept, _ = build_index(ids, num_experts, capacity=capacity,
                                                 kmajor=priority == "kmajor")
    buf = gather_rows(x, inv, k, num_experts * capacity).view(num_experts, capacity, H)
    return buf, slot_pos.view(T, k), demand, kept


def capacity_combine(buf_out: torch.Tensor, ids: torch.Tensor, slot_pos: torch.Tensor,
                     weights: Optional[torch.Tensor]) -> torch.Tensor:
    E, C, _ = buf_out.shape
    T, k = ids.shape
    return combine(buf_out, T, k, MODE_CAPACITY, slot_map=slot_pos, ids=ids, weights=weights, E=E, C=C)
