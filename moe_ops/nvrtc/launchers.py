"""The host side of csrc/cuda/*.cu in Python, for the NVRTC-compiled kernels: the same grid,
block, shared memory, workspace layout and kernel choice as the C++ launchers, line for line
(the C++ function each mirrors is named in its docstring; change both together).

Torch-free like the C++: pointers are ints, sizes ints, the element type a C++ type name of
:mod:`.manifest`. Every launch goes through ``launch(instantiation, grid, block, smem, *args)``
(:class:`moe_ops.nvrtc.driver.Launcher` on a GPU; a recorder in the tests), which, as
``moe_ops::launch``, returns at once for a grid with no blocks.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from .. import envs
from . import abi, manifest

Launch = Callable[..., None]

# csrc/kernels constants (kGatingWarpsPerBlock, kRankWarpsPerBlock, ...)
GATING_WARPS_PER_BLOCK = 4
RANK_WARPS_PER_BLOCK = 4
RANK_SCAN_THREADS = 256
GATHER_WARPS_PER_BLOCK = 8
COMBINE_WARPS_PER_BLOCK = 4
SCHED_THREADS = 1024                                       # grouped_gemm_schedule.cuh
SIMT_BM, SIMT_BN, SIMT_THREADS = 64, 64, 256               # grouped_gemm_simt.cuh
MMA_BM, MMA_BN, MMA_BK, MMA_THREADS, MMA_STAGES = 64, 64, 32, 128, 3  # grouped_gemm_mma.cuh
ACT_NONE, ACT_SWIGLU, ACT_GEGLU = 0, 1, 2                  # grouped_gemm.cuh GemmAct
ELEM_BYTES = manifest.ELEM_BYTES
# csrc/cuda/launcher_api.h / arg_limits.h
GATING_MAX_EXPERTS = 16384
GATING_MAX_GROUP_SMEM = 48 * 1024
COMBINE_MAX_K = 1024
MAX_K = 32
SCORE_SOFTMAX, SCORE_SIGMOID = 0, 1
INT32_MAX = 2147483647


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def grid_for(items: int, per_block: int) -> int:
    """launch_config.h detail::grid_for."""
    g = cdiv(items, per_block)
    if g > 0x7FFFFFFF:
        raise ValueError("moe_ops: grid too large")
    return g


def grid_stride_blocks(items: int, threads: int) -> int:
    """launch_config.h detail::grid_stride_blocks."""
    return min(cdiv(items, threads), 4096)


def align_up(n: int, a: int) -> int:
    return cdiv(n, a) * a


# ------------------------------------------------------------------------------ topk_gating


def gating_group_smem_bytes(E: int, n_group: int) -> int:
    """topk_gating.cuh gating_group_smem_bytes."""
    if n_group <= 0:
        return 0
    return (E * 4 + n_group * 5 + 15) & ~15


def topk_gating_supported(E: int, n_group: int) -> bool:
    """topk_gating.cu topk_gating_supported."""
    if E < 1 or E > GATING_MAX_EXPERTS:
        return False
    if n_group <= 0:
        return True
    per_block = gating_group_smem_bytes(E, n_group) * (GATING_WARPS_PER_BLOCK if E <= 512 else 1)
    return per_block <= GATING_MAX_GROUP_SMEM


def topk_gating(launch: Launch, logits: int, elem: str, bias: int, T: int, E: int, k: int, scoring: int,
                renormalize: bool, n_group: int, topk_group: int, scaling_factor: float, weights: int,
                ids: int) -> None:
    """topk_gating.cu topk_gating + launch_gating."""
    if not topk_gating_supported(E, n_group):
        raise ValueError(f"moe_ops: topk_gating supports 1 <= E <= {GATING_MAX_EXPERTS} (group-limited: keys of a "
                         f"row must fit {GATING_MAX_GROUP_SMEM // 1024} KiB of shared memory), got E={E}")
    if k < 1 or k > MAX_K or k > E:
        raise ValueError(f"moe_ops: topk_gating needs 1 <= k <= min(E, {MAX_K})")
    if scoring not in (SCORE_SOFTMAX, SCORE_SIGMOID):
        raise ValueError("moe_ops: topk_gating scoring must be 0 (softmax) or 1 (sigmoid)")
    if n_group > 0 and (E % n_group != 0 or topk_group < 1 or topk_group > n_group):
        raise ValueError("moe_ops: topk_gating group arguments are inconsistent")
    if elem not in manifest.GATING_TYPES:
        raise ValueError("moe_ops: topk_gating supports float32/float16/bfloat16 logits")
    if T <= 0:
        return
    p = abi.GatingParams(logits=logits, bias=bias or None, weights=weights, ids=ids, T=T, E=E, k=k,
                         scoring=scoring, renormalize=1 if renormalize else 0,
                         n_group=n_group if n_group > 0 else 0, topk_group=topk_group, scaling=scaling_factor)
    gsm = gating_group_smem_bytes(E, n_group)
    if E <= 32 * 8 or E <= 32 * 16:
        vpt = 8 if E <= 32 * 8 else 16
        launch(f"topk_gating_warp_kernel<{elem}, {vpt}>", (grid_for(T, GATING_WARPS_PER_BLOCK), 1, 1),
               (32 * GATING_WARPS_PER_BLOCK, 1, 1), gsm * GATING_WARPS_PER_BLOCK, p)
    else:
        vpt = manifest.GATING_BLOCK_VPT
        threads = cdiv(cdiv(E, vpt), 32) * 32
        launch(f"topk_gating_block_kernel<{elem}, {vpt}>", (grid_for(T, 1), 1, 1), (threads, 1, 1), gsm, p)


# ------------------------------------------------------------------- ranking (expert_rank_launch.h)


class RankPlan(NamedTuple):
    chunk: int
    nchunks: int
    ebits: int


def make_rank_plan(N: int, E: int) -> RankPlan:
    """expert_rank.cuh make_rank_plan."""
    max_cells = 1 << 20
    max_chunks = max(max_cells // (E if E > 0 else 1), 1)
    chunk = 256
    if cdiv(N, chunk) > max_chunks:
        chunk = (cdiv(N, max_chunks) + 31) // 32 * 32
    bits = 0
    while bits < 31 and (1 << bits) < E:
        bits += 1
    return RankPlan(chunk, cdiv(N, chunk), bits)


def rank_workspace_bytes(N: int, E: int) -> int:
    """expert_rank_launch.h rank_workspace_bytes."""
    plan = make_rank_plan(N, E)
    return align_up(plan.nchunks * E * 4, 256) + align_up(N * 4, 256) + align_up(E * 4, 256)


class RankWorkspace(NamedTuple):
    counts: int
    local_rank: int
    expert_count: int


def carve_rank_workspace(ws: int, N: int, E: int) -> RankWorkspace:
    """expert_rank_launch.h carve_rank_workspace."""
    plan = make_rank_plan(N, E)
    counts = ws
    local_rank = counts + align_up(plan.nchunks * E * 4, 256)
    expert_count = local_rank + align_up(N * 4, 256)
    return RankWorkspace(counts, local_rank, expert_count)


def rank_experts(launch: Launch, seq: abi.RankSeq, N: int, E: int, block_m: int, plan: RankPlan, counts: int,
                 local_rank: int, expert_count: int, kept: int, capacity: int, offsets: int) -> None:
    """expert_rank_launch.h rank_experts."""
    launch("rank_count_kernel", (grid_for(plan.nchunks, RANK_WARPS_PER_BLOCK), 1, 1), (32 * RANK_WARPS_PER_BLOCK, 1, 1),
           0, seq, N, E, plan.ebits, plan.chunk, plan.nchunks, counts, local_rank)
    launch("rank_scan_kernel", (1, 1, 1), (RANK_SCAN_THREADS, 1, 1), 0, counts, plan.nchunks, E, block_m, expert_count,
           kept, capacity, offsets)


def fill_i32(launch: Launch, p: int, n: int, value: int) -> None:
    launch("fill_i32_kernel", (grid_stride_blocks(n, 256), 1, 1), (256, 1, 1), 0, p, n, value)


def gather_rows(launch: Launch, src: int, dst: int, nrows: int, row_bytes: int, rmap: int, div: int) -> None:
    """row_gather_launch.h gather_rows: the widest word dividing the row and both pointers."""
    if nrows <= 0 or row_bytes <= 0:
        return
    bits = src | dst | row_bytes
    word = next(w for w, a in zip(manifest.GATHER_WORDS, (16, 8, 4, 2, 1)) if bits % a == 0)
    launch(f"gather_rows_kernel<{word}>", (grid_for(nrows, GATHER_WARPS_PER_BLOCK), 1, 1),
           (32 * GATHER_WARPS_PER_BLOCK, 1, 1), 0, src, dst, nrows, row_bytes, rmap, div)


def combine_smem_bytes(k: int) -> int:
    """row_combine.cuh combine_smem_bytes."""
    return COMBINE_WARPS_PER_BLOCK * k * 16


def combine(launch: Launch, y: int, elem: str, H: int, src: abi.CombineSource, weights: int, T: int, k: int,
            out: int) -> None:
    """row_combine_launch.h combine: 16-byte vectors when H and both pointers allow, else scalar."""
    if k < 1:
        raise ValueError("moe_ops: combine needs k >= 1")
    if T <= 0 or H <= 0:
        return
    vec16 = manifest.combine_vecs(elem)[0]
    vec = vec16 if H % vec16 == 0 and y % 16 == 0 and out % 16 == 0 else 1
    launch(f"combine_kernel<{elem}, {vec}>", (grid_for(T, COMBINE_WARPS_PER_BLOCK), 1, 1),
           (32 * COMBINE_WARPS_PER_BLOCK, 1, 1), combine_smem_bytes(k), y, H, src, weights or None, T, k, out)


# ------------------------------------------------------------------------ permute family (permute.cu)


def permute_workspace_bytes(T: int, k: int, E: int) -> int:
    return rank_workspace_bytes(T * k, E)


def build_slot_index(launch: Launch, ids: int, T: int, k: int, E: int, block_m: int, rank_ws: int, offsets: int,
                     sorted_slots: int, slot_rows: int) -> None:
    """slot_index_launch.h build_slot_index (permute, and the fused expert stage)."""
    N = T * k
    P = N + E * (block_m - 1)
    plan = make_rank_plan(N, E)
    ws = carve_rank_workspace(rank_ws, N, E)
    seq = abi.RankSeq(ids=ids, T=T, k=k, kmajor=0)
    rank_experts(launch, seq, N, E, block_m, plan, ws.counts, ws.local_rank, ws.expert_count, 0, 0, offsets)
    fill_i32(launch, sorted_slots, P, -1)
    launch("permute_place_kernel", (grid_stride_blocks(N, 256), 1, 1), (256, 1, 1), 0, ids, N, E, plan.chunk,
           ws.counts, ws.local_rank, offsets, slot_rows, sorted_slots)


def permute(launch: Launch, x: int, elem_bytes: int, T: int, H: int, ids: int, k: int, E: int, block_m: int,
            x_sorted: int, sorted_slots: int, expert_offsets: int, slot_rows: int, workspace: int) -> None:
    """permute.cu permute."""
    if E < 1 or block_m < 1 or k < 0 or T < 0 or H < 0:
        raise ValueError("moe_ops: permute needs E >= 1, block_m >= 1, k >= 0")
    P = T * k + E * (block_m - 1)
    build_slot_index(launch, ids, T, k, E, block_m, workspace, expert_offsets, sorted_slots, slot_rows)
    gather_rows(launch, x, x_sorted, P, H * elem_bytes, sorted_slots, k if k > 0 else 1)


def unpermute(launch: Launch, y: int, elem: str, P: int, H: int, slot_rows: int, weights: int, T: int, k: int,
              out: int) -> None:
    """permute.cu unpermute."""
    src = abi.CombineSource(slot_rows=slot_rows, ids=None, slot_pos=None, E=0, C=0, nrows=P)
    combine(launch, y, elem, H, src, weights, T, k, out)


# ----------------------------------------------------------------------- capacity family (capacity.cu)


def capacity_workspace_bytes(T: int, k: int, E: int, C: int) -> int:
    return rank_workspace_bytes(T * k, E) + align_up(E * C * 4, 256)


def capacity_dispatch(launch: Launch, x: int, elem_bytes: int, T: int, H: int, ids: int, k: int, E: int, C: int,
                      kmajor: bool, buf: int, slot_pos: int, demand: int, kept: int, workspace: int) -> None:
    """capacity.cu capacity_dispatch."""
    if E < 1 or C < 0 or k < 0 or T < 0 or H < 0:
        raise ValueError("moe_ops: capacity_dispatch needs E >= 1, C >= 0, k >= 0")
    N = T * k
    plan = make_rank_plan(N, E)
    ws = carve_rank_workspace(workspace, N, E)
    src_slot = workspace + rank_workspace_bytes(N, E)
    rows = E * C
    seq = abi.RankSeq(ids=ids, T=T, k=k, kmajor=1 if kmajor else 0)
    rank_experts(launch, seq, N, E, 1, plan, ws.counts, ws.local_rank, demand, kept, C, 0)
    fill_i32(launch, src_slot, rows, -1)
    launch("capacity_place_kernel", (grid_stride_blocks(N, 256), 1, 1), (256, 1, 1), 0, seq, N, E, C, plan.chunk,
           ws.counts, ws.local_rank, slot_pos, src_slot)
    gather_rows(launch, x, buf, rows, H * elem_bytes, src_slot, k if k > 0 else 1)


def capacity_combine(launch: Launch, buf: int, elem: str, E: int, C: int, H: int, ids: int, slot_pos: int,
                     weights: Optional[int], T: int, k: int, out: int) -> None:
    """capacity.cu capacity_combine."""
    src = abi.CombineSource(slot_rows=None, ids=ids, slot_pos=slot_pos, E=E, C=C, nrows=E * C)
    combine(launch, buf, elem, H, src, weights or 0, T, k, out)


# ------------------------------------------------- grouped GEMMs (grouped_gemm.cu, grouped_gemm_launch.h)


def gemm_schedule_bytes(E: int) -> int:
    return align_up((E + 1) * 4, 256) + align_up((E + 1) * 8, 256)


def grouped_gemm_workspace_bytes(E: int) -> int:
    return gemm_schedule_bytes(E)


def build_gemm_schedule(launch: Launch, offsets: int, E: int, M: int, ws: int):
    """grouped_gemm_launch.h build_gemm_schedule -> (offs, tiles) pointers."""
    offs, tiles = ws, ws + align_up((E + 1) * 4, 256)
    launch("gemm_schedule_kernel", (1, 1, 1), (SCHED_THREADS, 1, 1), 0, offsets, E, M, SIMT_BM, offs, tiles)
    return offs, tiles


def persistent_blocks(launch: Launch, items: int) -> int:
    """grouped_gemm_launch.h persistent_blocks: 4 blocks per SM of the device (``launch.sm_count``);
    3 where there is none to ask (the emulator build's cap, which the launch-parity test compares)."""
    sms = getattr(launch, "sm_count", None)
    cap = 4 * sms if sms else 3
    return items if items < cap and items > 0 else (1 if items <= 0 else cap)


def zero_outside_rows(launch: Launch, elem: str, offs: int, E: int, M: int, N: int, c: int) -> None:
    launch(f"zero_outside_rows_kernel<{elem}>", (grid_stride_blocks(M * N, 256), 1, 1), (256, 1, 1), 0, offs, E, M, N,
           c)


def mma_smem_bytes(gated: bool) -> int:
    """grouped_gemm_mma.cuh mma_smem_bytes."""
    return MMA_STAGES * (MMA_BM * MMA_BK + (2 if gated else 1) * MMA_BN * MMA_BK) * 2


def mma_allowed(launch: Launch, elem: str) -> bool:
    """grouped_gemm_launch.h mma_allowed: bf16/fp16 on an sm_80+ device (``launch.cc_major``; not
    asked where there is no device, as the emulator build), unless MOE_OPS_CUDA_GEMM=simt."""
    if elem not in manifest.MMA_TYPES:
        return False
    if envs.get("MOE_OPS_CUDA_GEMM") == "simt":
        return False
    major = getattr(launch, "cc_major", None)
    return major is None or major >= 8


def use_mma_wgrad(launch: Launch, elem: str, a: int, dc: int, K: int, N: int) -> bool:
    return mma_allowed(launch, elem) and K % 8 == 0 and N % 8 == 0 and a % 16 == 0 and dc % 16 == 0


def use_mma(launch: Launch, elem: str, p: abi.GroupedGemmParams) -> bool:
    """grouped_gemm_launch.h use_mma."""
    if not mma_allowed(launch, elem):
        return False
    b_kmajor = p.b_sn == 1
    if b_kmajor and p.act != ACT_NONE:
        return False
    b_row = p.b_sk if b_kmajor else p.b_sn
    return (p.K % 8 == 0 and p.lda % 8 == 0 and b_row % 8 == 0 and p.b_expert % 8 == 0 and (not b_kmajor or p.N % 8 == 0)
            and (b_kmajor or p.b_sk == 1) and (p.a or 0) % 16 == 0 and (p.b or 0) % 16 == 0)


def run_grouped_gemm(launch: Launch, elem: str, p: abi.GroupedGemmParams) -> None:
    """grouped_gemm_launch.h run_grouped_gemm (gated when p.act != 0): tensor cores when
    :func:`use_mma`, else CUDA cores."""
    tiles_bound = cdiv(p.M, SIMT_BM) + (p.E if p.E < p.M else p.M)
    gated = p.act != ACT_NONE
    if use_mma(launch, elem, p):
        grid = (persistent_blocks(launch, tiles_bound * cdiv(p.N, MMA_BN)), 1, 1)
        if p.b_sn == 1:  # k-major B: the grouped_gemm op (trans_b=False), never gated
            name = f"grouped_gemm_mma_kernel<{elem}, false, true>"
        else:
            name = f"grouped_gemm_mma_kernel<{elem}, {'true' if gated else 'false'}, false>"
        launch(name, grid, (MMA_THREADS, 1, 1), mma_smem_bytes(gated), p)
        return
    items = tiles_bound * cdiv(p.N, SIMT_BN)
    gated = "true" if p.act != ACT_NONE else "false"
    launch(f"grouped_gemm_simt_kernel<{elem}, {gated}>", (persistent_blocks(launch, items), 1, 1),
           (SIMT_THREADS, 1, 1), 0, p)


def grouped_gemm(launch: Launch, a: int, elem: str, M: int, K: int, b: int, E: int, N: int, trans_b: bool,
                 offsets: int, c: int, workspace: int) -> None:
    """grouped_gemm.cu grouped_gemm."""
    if E < 1 or M < 0 or K < 0 or N < 0:
        raise ValueError("moe_ops: grouped_gemm needs E >= 1, M, K, N >= 0")
    if M == 0 or N == 0:
        return
    offs, tiles = build_gemm_schedule(launch, offsets, E, M, workspace)
    zero_outside_rows(launch, elem, offs, E, M, N, c)
    p = abi.GroupedGemmParams(a=a, lda=K, a_rows=None, a_row_div=1, b=b, b_expert=K * N, b_sk=1 if trans_b else N,
                              b_sn=K if trans_b else 1, c=c, ldc=N, c_rows=None, row_scale=None, offs=offs,
                              tiles=tiles, E=E, M=M, N=N, K=K, act=ACT_NONE)
    run_grouped_gemm(launch, elem, p)


def grouped_gemm_wgrad(launch: Launch, a: int, dc: int, elem: str, M: int, K: int, N: int, offsets: int, E: int,
                       db: int, workspace: int) -> None:
    """grouped_gemm.cu grouped_gemm_wgrad."""
    if E < 0 or M < 0 or K < 0 or N < 0:
        raise ValueError("moe_ops: grouped_gemm_wgrad needs sizes >= 0")
    if E == 0 or K == 0 or N == 0:
        return
    offs, _ = build_gemm_schedule(launch, offsets, E, M, workspace)
    if use_mma_wgrad(launch, elem, a, dc, K, N):
        items = E * cdiv(K, MMA_BM) * cdiv(N, MMA_BN)
        launch(f"grouped_gemm_wgrad_mma_kernel<{elem}>", (persistent_blocks(launch, items), 1, 1),
               (MMA_THREADS, 1, 1), mma_smem_bytes(False), a, dc, offs, E, K, N, db)
        return
    items = E * cdiv(K, SIMT_BM) * cdiv(N, SIMT_BN)
    launch(f"grouped_gemm_wgrad_kernel<{elem}>", (persistent_blocks(launch, items), 1, 1), (SIMT_THREADS, 1, 1), 0,
           a, dc, offs, E, K, N, db)


class FusedLayout(NamedTuple):
    """grouped_gemm.cu FusedLayout: the fused stage's scratch, carved in this order."""
    rank: int
    offsets: int
    sorted_slots: int
    slot_rows: int
    sched: int
    h: int
    y: int
    total: int


def fused_layout(T: int, k: int, E: int, H: int, I: int, elem: str) -> FusedLayout:
    N, es = T * k, ELEM_BYTES[elem]
    rank = 0
    offsets = rank + align_up(rank_workspace_bytes(N, E), 256)
    sorted_slots = offsets + align_up((E + 1) * 4, 256)
    slot_rows = sorted_slots + align_up(N * 4, 256)
    sched = slot_rows + align_up(N * 4, 256)
    h = sched + align_up(gemm_schedule_bytes(E), 256)
    y = h + align_up(N * I * es, 256)
    total = y + align_up(N * H * es, 256)
    return FusedLayout(rank, offsets, sorted_slots, slot_rows, sched, h, y, total)


def fused_experts_workspace_bytes(T: int, k: int, E: int, H: int, I: int, elem: str) -> int:
    return fused_layout(T, k, E, H, I, elem).total


def fused_experts(launch: Launch, x: int, elem: str, T: int, H: int, ids: int, k: int, weights: int, w_gate_up: int,
                  w_down: int, E: int, I: int, act: int, out: int, workspace: int) -> None:
    """grouped_gemm.cu fused_experts: slot index -> GEMM1 (gather, gated) -> GEMM2 (weighted,
    scattered to slot order) -> k-sum."""
    if E < 1 or k < 1 or T < 0 or H < 0 or I < 0 or act not in (ACT_SWIGLU, ACT_GEGLU):
        raise ValueError("moe_ops: fused_experts needs E, k >= 1, sizes >= 0, act SwiGLU or GeGLU")
    if T == 0 or H == 0:
        return
    L = fused_layout(T, k, E, H, I, elem)
    offsets, sorted_slots, slot_rows = workspace + L.offsets, workspace + L.sorted_slots, workspace + L.slot_rows
    h, y = workspace + L.h, workspace + L.y
    N = T * k
    build_slot_index(launch, ids, T, k, E, 1, workspace + L.rank, offsets, sorted_slots, slot_rows)
    offs, tiles = build_gemm_schedule(launch, offsets, E, N, workspace + L.sched)
    g1 = abi.GroupedGemmParams(a=x, lda=H, a_rows=sorted_slots, a_row_div=k, b=w_gate_up, b_expert=2 * I * H, b_sk=1,
                               b_sn=H, c=h, ldc=I, c_rows=None, row_scale=None, offs=offs, tiles=tiles, E=E, M=N, N=I,
                               K=H, act=act)
    run_grouped_gemm(launch, elem, g1)
    g2 = abi.GroupedGemmParams(a=h, lda=I, a_rows=None, a_row_div=1, b=w_down, b_expert=H * I, b_sk=1, b_sn=I, c=y,
                               ldc=H, c_rows=sorted_slots, row_scale=weights or None, offs=offs, tiles=tiles, E=E,
                               M=N, N=H, K=I, act=ACT_NONE)
    run_grouped_gemm(launch, elem, g2)
    src = abi.CombineSource(slot_rows=slot_rows, ids=None, slot_pos=None, E=0, C=0, nrows=N, slot_order=True)
    combine(launch, y, elem, H, src, 0, T, k, out)
