"""Microbenchmarks (pytest-benchmark): a few op x implementation cases on a small layer.

    pytest bench/test_micro.py --benchmark-only            # every case
    pytest bench/test_micro.py --benchmark-only -k moe_forward

Not part of the test suite (testpaths = tests); no timing is asserted. The callables are the
matrix's own (bench/cases.py), so a case here times exactly what ``python -m bench`` times.
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from bench.cases import Inputs, Point, op_cases
from bench.run import NOT_TIMED, pick_dtype
from bench.shapes import ModelShape

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A small Mixtral-like layer: big enough that the kernels, not Python, dominate on a CPU.
SHAPE = ModelShape("micro", 256, 512, 16, 2, "softmax", True, source="synthetic")
T = 128
# op -> the baselines timed next to the backends
BASELINES = {
    "topk_gating": ["hf_router"],
    "permute": ["copy", "hf_sort_gather"],
    "unpermute": ["copy", "hf_combine"],
    "grouped_gemm": ["torch_grouped_mm", "hf_mm_loop", "dense"],
    "moe_forward": ["hf_eager", "hf_grouped_mm"],
}


def _backends(op):
    names = moe_ops.available_backends(None if op == "moe_forward" else op, DEVICE)
    return [b for b in names if b not in NOT_TIMED and not (b == "triton" and DEVICE == "cpu")]


CASES = [(op, impl) for op, base in BASELINES.items() for impl in _backends(op) + base]


@pytest.fixture(scope="module")
def inputs():
    pt = Point(SHAPE, SHAPE.experts, SHAPE.top_k, T, pick_dtype("auto", DEVICE), DEVICE)
    return Inputs(pt, seed=0)


@pytest.mark.parametrize("op,impl", CASES, ids=[f"{op}-{impl}" for op, impl in CASES])
def test_micro(benchmark, inputs, op, impl):
    ob = op_cases(op, inputs, [impl] if impl in _backends(op) else [], [impl], check=False)
    case = next((c for c in ob.cases if c.impl == impl), None)
    if case is None:
        pytest.skip(f"{impl} does not run here")
    benchmark.group = op
    benchmark.extra_info.update(op=op, impl=impl, E=SHAPE.experts, k=SHAPE.top_k, T=T, H=SHAPE.hidden,
                                I=SHAPE.intermediate, bytes=ob.bytes, flops=ob.flops)
    with torch.inference_mode():
        if DEVICE == "cuda":
            def fn():
                case.fn()
                torch.cuda.synchronize()
            benchmark(fn)
        else:
            benchmark(case.fn)
