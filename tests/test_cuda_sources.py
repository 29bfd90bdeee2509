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


# Op families: csrc/kernels/<stem>.cuh (the kernels) + csrc/cuda/<stem>.cu (their launchers),
# the same stem as csrc/cpu/, triton_kernels/ and the tests use.
OP_FAMILIES = ("topk_gating", "permute", "capacity", "grouped_gemm")


def test_sources_found():
    names = {p.name for p in OURS}
    assert {"row_combine.cuh", "row_gather.cuh", "expert_rank.cuh", "ops_binding.h", "launcher_api.h"} <= names


@pytest.mark.parametrize("stem", OP_FAMILIES)
def test_one_stem_per_op_family(stem):
    assert (ROOT / "csrc" / "kernels" / f"{stem}.cuh").is_file()
    assert (ROOT / "csrc" / "cuda" / f"{stem}.cu").is_file()


def test_launcher_files_are_op_families():
    """Every .cu is an op family; shared code sits in role-named headers, never a grab bag."""
    assert {p.stem for p in (ROOT / "csrc" / "cuda").glob("*.cu")} == set(OP_FAMILIES)
    for p in KERNELS + LAUNCHERS:
        assert not re.search(r"(^|_)(common|kernels|utils)($|_)", p.stem), f"{p.name}: name it for its role"


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.name)
def test_kernel_subset(path):
    code = _code(path)
    forbidden = {
        "<<<": "launch through moe_ops::launch (launch.cuh), the one place <<<>>> appears",
        "cooperative_groups": "not emulated",
        "cub::": "no CUB: the ranking is written out so it is deterministic and emulated",
        "asm(": "no inline PTX outside mma.cuh",
        "asm volatile": "no inline PTX outside mma.cuh",
        "cudaDeviceSynchronize": "no host synchronisation",
        "cudaStreamSynchronize": "no host synchronisation",
        "cudaMemcpy": "no host round trips",
    }
    if path.name == "mma.cuh":  # the one home of inline PTX, each instruction with its emulator model
        forbidden = {n: w for n, w in forbidden.items() if not n.startswith("asm")}
    for needle, why in forbidden.items():
        assert needle not in code, f"{path.name}: '{needle}' -- {why}"
    # float atomics would make results order-dependent; the kernels use no atomics at all
    assert not re.search(r"\batomic\w*\s*\(", code), f"{path.name}: atomics are not used by these kernels"


@pytest.mark.parametrize("path", OURS, ids=lambda p: p.name)
def test_source_opens_with_dataflow_docstring(path):
    head = path.read_text().lstrip().splitlines()[:3]
    assert head and head[0].startswith("//"), f"{path.name} must open with its dataflow / role comment"


@pytest.mark.parametrize("path", [p for p in OURS if p.suffix in (".cu", ".cuh")], ids=lambda p: p.name)
def test_kernels_and_launchers_are_torch_free(path):
    code = path.read_text()
    assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", code), f"{path.name} must stay torch-free"


def test_test_only_kernels_live_under_tests():
    """The emulator self-tests and the planted bugs are compiled from tests/csrc, not the product tree."""
    product = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    offenders = [str(p.relative_to(ROOT)) for p in product if re.search(r"planted_|moe_ops_simtest", _code(p))]
    assert not offenders, f"test-only kernels in the product tree: {offenders}"
    assert (ROOT / "tests" / "csrc" / "planted_bugs.cuh").is_file()
    assert (ROOT / "tests" / "csrc" / "simtest_ops.cpp").is_file()
