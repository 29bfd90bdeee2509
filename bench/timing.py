"""Median-of-repeats timing: CUDA events on GPU, ``time.perf_counter`` on CPU.

The first call is a warmup (allocator, oneDNN primitive creation, autotuning, lazy init) and
is timed to size the rest: further warmups and repeats stop once ``budget_s`` seconds are spent,
with at least ``min_reps`` timed calls (one, for a callable slower than a third of the budget).
The median is what the matrix reports; the minimum and the repeat count are kept so noisy runs
(shared CPUs) can be recognised.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int


def _call_ms(fn, cuda: bool) -> float:
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 20, min_reps: int = 3,
            budget_s: float = 1.0, warm: bool = False) -> Timing:
    """Time ``fn``. ``warm``: the caller already made one untimed call (e.g. a correctness check)."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    budget_ms = budget_s * 1e3
    first = None
    for i in range(max(warmup - int(warm), 0 if warm else 1)):
        ms = _call_ms(fn, cuda)
        first = ms if first is None else min(first, ms)
        if first * (i + 2) > budget_ms:  # a slow callable: its warmup is done
            break
    if first is not None and first > budget_ms / 3:
        min_reps = 1
    times = []
    spent = 0.0
    while len(times) < reps and (len(times) < min_reps or spent < budget_ms):
        times.append(_call_ms(fn, cuda))
        spent += times[-1]
        if len(times) == 1 and times[0] > budget_ms / 3:
            min_reps = 1
    return Timing(statistics.median(times), min(times), len(times))
