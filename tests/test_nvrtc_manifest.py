"""The NVRTC manifest (moe_ops/nvrtc/manifest.py) against the kernel sources: every __global__ of
csrc/kernels has an entry under its header and every entry names a kernel of that header; no
NVRTC unit includes the host-only launch wrapper. No CuPy needed."""
from moe_ops.nvrtc import manifest, sources
from tests.nvrtc_support import KERNEL_DIR, globals_by_header


def manifest_problems(kernels: dict, defined: dict) -> list:
    problems = []
    for header, names in defined.items():
        have = {manifest.base_name(n) for n in kernels.get(header, ())}
        problems += [f"{header}: __global__ {n} has no entry in moe_ops/nvrtc/manifest.py KERNELS" for n in names
                     if n not in have]
    for header, entries in kernels.items():
        problems += [f"{header}: manifest entry {e} is not a __global__ of that header" for e in entries
                     if manifest.base_name(e) not in defined.get(header, ())]
        problems += [f"{header}: {e} has no parameter list in manifest.SIGNATURES" for e in entries
                     if manifest.base_name(e) not in manifest.SIGNATURES]
    return problems


def test_the_header_parse_finds_the_kernels():
    defined = globals_by_header()
    assert defined["topk_gating.cuh"] == ["topk_gating_block_kernel", "topk_gating_warp_kernel"]
    assert defined["expert_rank.cuh"] == ["fill_i32_kernel", "rank_count_kernel", "rank_scan_kernel"]
    assert sum(len(v) for v in defined.values()) >= 9


def test_every_global_has_a_manifest_entry():
    problems = manifest_problems(manifest.KERNELS, globals_by_header())
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_missing_and_a_stale_entry():
    defined = globals_by_header()
    dropped = {h: [e for e in v if not e.startswith("gather_rows_kernel")] for h, v in manifest.KERNELS.items()}
    assert any("gather_rows_kernel has no entry" in p for p in manifest_problems(dropped, defined))
    stale = dict(manifest.KERNELS, **{"permute.cuh": ["permute_place_kernel", "gone_kernel"]})
    assert any("gone_kernel" in p for p in manifest_problems(stale, defined))
    new_header = dict(defined, **{"grouped_gemm.cuh": ["grouped_gemm_kernel"]})
    assert any("grouped_gemm_kernel" in p for p in manifest_problems(manifest.KERNELS, new_header))


def test_units_never_include_the_host_launch_wrapper():
    for header in manifest.KERNELS:
        closure = sources.include_closure(header, KERNEL_DIR)
        assert header in closure and "portable.cuh" in closure
        assert not set(closure) & set(sources.HOST_ONLY_HEADERS), (header, sorted(closure))


def test_include_closure_follows_nested_includes(tmp_path):
    (tmp_path / "portable.cuh").write_text('#pragma once\n#include "../sim/sim.h"\n')
    (tmp_path / "b.cuh").write_text('#include "portable.cuh"\n')
    (tmp_path / "a.cuh").write_text('  #  include "b.cuh"\n#include <stdint.h>\n')
    assert list(sources.include_closure("a.cuh", str(tmp_path))) == ["a.cuh", "b.cuh", "portable.cuh"]


def test_instantiations_are_unique_and_name_expressions_are_qualified():
    everything = [e for v in manifest.KERNELS.values() for e in v]
    assert len(everything) == len(set(everything))
    assert manifest.name_expression("rank_scan_kernel") == "&moe_ops::kern::rank_scan_kernel"
    assert manifest.header_of("combine_kernel<double, 2>") == "row_combine.cuh"
