"""Every ``__global__`` instantiation the launchers (csrc/cuda/*.cu) launch, as NVRTC name
expressions, grouped by the header that defines the kernel (one NVRTC unit per header), and each
kernel's parameter types (how :mod:`.driver` packs the arguments).

tests/test_nvrtc_manifest.py parses csrc/kernels and fails when a ``__global__`` has no entry
here (or an entry names no kernel of its header), and checks the parameter types below against
the mangled names NVRTC returns -- so this list cannot drift from the sources silently.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

NAMESPACE = "moe_ops::kern::"

# kernel element types: the router's (no float64, DESIGN.md) and the data movement's
GATING_TYPES = ("float", "__half", "__nv_bfloat16")
DATA_TYPES = ("float", "__half", "__nv_bfloat16", "double")
MMA_TYPES = ("__half", "__nv_bfloat16")  # the tensor-core GEMM's operand types
ELEM_BYTES = {"float": 4, "__half": 2, "__nv_bfloat16": 2, "double": 8}
# gather words, widest first (row_gather_launch.h): 16/8/4/2/1 bytes
GATHER_WORDS = ("uint4", "uint2", "unsigned int", "unsigned short", "unsigned char")
GATING_WARP_VPT = (8, 16)   # E <= 256, E <= 512 (topk_gating.cu)
GATING_BLOCK_VPT = 16       # E > 512


def combine_vecs(t: str) -> Tuple[int, int]:
    """combine_kernel's VEC choices for element type t: 16-byte vectors, or scalar columns."""
    return (16 // ELEM_BYTES[t], 1)


# header -> kernel instantiations (without the namespace). A new kernel header adds its entry
# here with every instantiation its launcher launches.
KERNELS: Dict[str, List[str]] = {
    "topk_gating.cuh": [f"topk_gating_warp_kernel<{t}, {v}>" for t in GATING_TYPES for v in GATING_WARP_VPT]
    + [f"topk_gating_block_kernel<{t}, {GATING_BLOCK_VPT}>" for t in GATING_TYPES],
    "expert_rank.cuh": ["rank_count_kernel", "rank_scan_kernel", "fill_i32_kernel"],
    "row_gather.cuh": [f"gather_rows_kernel<{w}>" for w in GATHER_WORDS],
    "row_combine.cuh": [f"combine_kernel<{t}, {v}>" for t in DATA_TYPES for v in combine_vecs(t)],
    "permute.cuh": ["permute_place_kernel"],
    "capacity.cuh": ["capacity_place_kernel"],
    "grouped_gemm_schedule.cuh": ["gemm_schedule_kernel"] + [f"zero_outside_rows_kernel<{t}>" for t in DATA_TYPES],
    "grouped_gemm_simt.cuh": [f"grouped_gemm_simt_kernel<{t}, {g}>" for t in DATA_TYPES for g in ("false", "true")]
    + [f"grouped_gemm_wgrad_kernel<{t}>" for t in DATA_TYPES],
    # tensor cores, bf16/fp16 only: <T, GATED, B_KMAJOR> as grouped_gemm_launch.h instantiates them
    "grouped_gemm_mma.cuh": [f"grouped_gemm_mma_kernel<{t}, {g}, {km}>" for t in MMA_TYPES
                             for g, km in (("false", "true"), ("true", "false"), ("false", "false"))]
    + [f"grouped_gemm_wgrad_mma_kernel<{t}>" for t in MMA_TYPES],
    # A new kernel header adds its instantiations here and their SIGNATURES below; its Python
    # launcher goes in launchers.py (mirroring csrc/cuda).
}

# Parameter types per kernel (base name): "i32" int, "i64" long long, "f32" float, "ptr" any
# pointer, or the name of a by-value struct of :mod:`.abi`.
SIGNATURES: Dict[str, Tuple[str, ...]] = {
    "topk_gating_warp_kernel": ("GatingParams",),
    "topk_gating_block_kernel": ("GatingParams",),
    "rank_count_kernel": ("RankSeq", "i64", "i32", "i32", "i32", "i32", "ptr", "ptr"),
    "rank_scan_kernel": ("ptr", "i32", "i32", "i32", "ptr", "ptr", "i32", "ptr"),
    "fill_i32_kernel": ("ptr", "i64", "i32"),
    "gather_rows_kernel": ("ptr", "ptr", "i64", "i64", "ptr", "i32"),
    "combine_kernel": ("ptr", "i64", "CombineSource", "ptr", "i64", "i32", "ptr"),
    "permute_place_kernel": ("ptr", "i64", "i32", "i32", "ptr", "ptr", "ptr", "ptr", "ptr"),
    "capacity_place_kernel": ("RankSeq", "i64", "i32", "i32", "i32", "ptr", "ptr", "ptr", "ptr"),
    "gemm_schedule_kernel": ("ptr", "i32", "i64", "i32", "ptr", "ptr"),
    "zero_outside_rows_kernel": ("ptr", "i32", "i64", "i64", "ptr"),
    "grouped_gemm_simt_kernel": ("GroupedGemmParams",),
    "grouped_gemm_wgrad_kernel": ("ptr", "ptr", "ptr", "i32", "i64", "i64", "ptr"),
    "grouped_gemm_mma_kernel": ("GroupedGemmParams",),
    "grouped_gemm_wgrad_mma_kernel": ("ptr", "ptr", "ptr", "i32", "i64", "i64", "ptr"),
}


def base_name(instantiation: str) -> str:
    return instantiation.split("<", 1)[0].strip()


def name_expression(instantiation: str) -> str:
    """The NVRTC name expression of an instantiation (nvrtcAddNameExpression)."""
    return "&" + NAMESPACE + instantiation


def header_of(instantiation: str) -> str:
    """The header (NVRTC unit) whose module holds ``instantiation``."""
    for header, names in KERNELS.items():
        if instantiation in names:
            return header
    raise KeyError(f"moe_ops: kernel {instantiation!r} is not in the NVRTC manifest (moe_ops/nvrtc/manifest.py)")
