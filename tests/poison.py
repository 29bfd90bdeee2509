"""Poisoning: what a kernel must not read, and how unwritten outputs are caught.

``poison(t)`` fills a tensor in place with NaN (float) or -7 (int) and returns it. Use it on
*input regions a kernel must not read* (e.g. ``a`` rows outside ``[offs[0], offs[E])``,
``y_sorted`` padding rows): the result must not change. The ops are functional -- they allocate
their outputs -- so an unwritten output element can't be poisoned beforehand; instead every
test compares *every* output element: integer outputs exactly (padding ``sorted_slots == -1``,
``slot_rows == -1`` for dropped slots), data movement outputs (``x_sorted``, ``buf``) bitwise
including their zero padding, float results with ``tests.compare.assert_close_to_reference``,
which also requires NaN exactly where the float64 reference has NaN. Uninitialised memory (an
``torch.empty`` the kernel forgot to fill) then fails as garbage or NaN.
"""
from __future__ import annotations

import torch


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating) or -7 (integer); returns ``t``."""
    with torch.no_grad():
        t.fill_(float("nan") if t.is_floating_point() else -7)
    return t
