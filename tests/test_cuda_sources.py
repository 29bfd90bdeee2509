"""Static rules of the CUDA kernel sources (no build needed).

The emulator can only run what it emulates, and determinism is a contract: these checks keep
the kernel sources inside that subset (DESIGN.md "Rules for kernels", docs/cuda.md).
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "kernels").glob("*.cuh"))
LAUNCHERS = sorted((ROOT / "csrc" / "cuda").glob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.h"))
OURS = [p for p in KERNELS if p.name not in ("portable.cuh", "launch.cuh")] + LAUNCHERS


def _code(path: pathlib.Path) -> str:
    """The source without comments and string literals."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def test_sources_found():
    names = {p.name for p in OURS}
    assert {"topk_gating.cuh", "permute.cuh", "unpermute.cuh", "capacity.cuh", "ops_binding.h"} <= names


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.name)
def test_kernel_subset(path):
    code = _code(path)
    forbidden = {
        "<<<": "launch through moe_ops::launch (launch.cuh), the one place <<<>>> appears",
        "cooperative_groups": "not emulated",
        "cub::": "no CUB: the ranking is written out so it is deterministic and emulated",
        "asm(": "no inline PTX",
        "asm volatile": "no inline PTX",
        "cudaDeviceSynchronize": "no host synchronisation",
        "cudaStreamSynchronize": "no host synchronisation",
        "cudaMemcpy": "no host round trips",
    }
    for needle, why in forbidden.items():
        assert needle not in code, f"{path.name}: '{needle}' -- {why}"
    # float atomics would make results order-dependent; the kernels use no atomics at all
    assert not re.search(r"\batomic\w*\s*\(", code), f"{path.name}: atomics are not used by these kernels"


@pytest.mark.parametrize("path", [p for p in OURS if p.suffix == ".cuh"], ids=lambda p: p.name)
def test_kernel_header_opens_with_dataflow_docstring(path):
    head = path.read_text().lstrip().splitlines()[:3]
    assert head and head[0].startswith("//"), f"{path.name} must open with its dataflow comment"


@pytest.mark.parametrize("path", [p for p in OURS if p.suffix in (".cu", ".cuh")], ids=lambda p: p.name)
def test_kernels_and_launchers_are_torch_free(path):
    code = path.read_text()
    assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", code), f"{path.name} must stay torch-free"
