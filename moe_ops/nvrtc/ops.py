"""The torch binding of csrc/cuda/ops_binding.h in Python, for the NVRTC kernels: the same checks
(raised as RuntimeError, as TORCH_CHECK does, before anything is allocated or launched), the same
output allocation and workspace, then the launchers of :mod:`.launchers` on torch's current
stream. Registered as the CUDA kernels of the ``moe_ops`` ops by :mod:`.select`.

``launcher_for(tensor)`` is the one place that touches the GPU; tests replace it with a
:class:`~moe_ops.nvrtc.driver.Recorder` and run everything else on CPU tensors.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import launchers
from ..backend import OP_NAMES

_ELEM = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
MAX_EXPERTS = launchers.INT32_MAX - 1
NAME = "cuda (nvrtc)"


# c10's ScalarType names, as TORCH_CHECK prints a dtype (the messages match ops_binding.h's)
_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool"}


def _dt(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def _check(cond: bool, *msg) -> None:
    if not cond:
        raise RuntimeError("".join(str(m) for m in msg))


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def _gpu_launcher(t: torch.Tensor):
    from .driver import Launcher
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return Launcher(index, _arch(t.device), torch.cuda.current_stream(t.device).cuda_stream,
                    props.multi_processor_count, props.major)


# The launch callable for the tensors' device (tests swap in a recorder).
launcher_for: Callable[[torch.Tensor], Callable] = _gpu_launcher
# The device type the checks require (tests run the binding on CPU tensors with a recorder).
device_type = "cuda"


class _Guard:
    def __init__(self, t: torch.Tensor):
        self.g = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.g is not None:
            self.g.__enter__()

    def __exit__(self, *exc):
        if self.g is not None:
            self.g.__exit__(*exc)


def _elem(t: torch.Tensor, name: str) -> str:
    _check(t.dtype in _ELEM, f"moe_ops: {name} must be float32/float16/bfloat16/float64, got {_dt(t.dtype)}")
    return _ELEM[t.dtype]


def _check_device(t: torch.Tensor, op: str, name: str) -> None:
    _check(t.device.type == device_type, f"moe_ops::{op} ({NAME}): {name} must be on {device_type.upper()}, "
           f"got {t.device}")


def _check_same_device(a: torch.Tensor, b: torch.Tensor, op: str, name: str) -> None:
    _check(a.device == b.device, f"moe_ops::{op}: {name} is on {b.device} but the input is on {a.device}")


def _ids_arg(x, ids, op, name):
    _check_same_device(x, ids, op, name)
    _check(ids.dtype == torch.int32, f"moe_ops::{op}: {name} must be int32, got {_dt(ids.dtype)}")
    _check(ids.dim() == 2, f"moe_ops::{op}: {name} must be 2-D [T, k], got {list(ids.shape)}")
    return ids.contiguous()


def _dispatch_args(x, ids_in, E, op):
    _check_device(x, op, "x")
    _elem(x, "x")
    _check(x.dim() == 2, f"moe_ops::{op}: x must be 2-D [T, H], got {list(x.shape)}")
    ids = _ids_arg(x, ids_in, op, "ids")
    _check(ids.shape[0] == x.shape[0], f"moe_ops::{op}: ids has {ids.shape[0]} rows but x has {x.shape[0]}")
    _check(1 <= E <= MAX_EXPERTS, f"moe_ops::{op}: num_experts must be in [1, {MAX_EXPERTS}], got {E}")
    return ids


def _weights_arg(x, w, T, k, op):
    if w is None:
        return None
    _check_same_device(x, w, op, "weights")
    _elem(w, "weights")
    _check(w.dim() == 2 and w.shape[0] == T and w.shape[1] == k,
           f"moe_ops::{op}: weights must be [{T}, {k}], got {list(w.shape)}")
    # the kernels' accumulator type: float32, float64 when the data is float64
    return w.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


def topk_gating(logits_in: torch.Tensor, k: int, scoring: str, renormalize: bool, n_group: int, topk_group: int,
                correction_bias: Optional[torch.Tensor], scaling_factor: float):
    op = "topk_gating"
    _check_device(logits_in, op, "logits")
    elem = _elem(logits_in, "logits")
    _check(elem != "double", f"moe_ops::topk_gating ({NAME}): float64 logits are not supported (the kernel computes "
           "in float32); pass float32")
    _check(logits_in.dim() == 2, f"moe_ops::topk_gating: logits must be 2-D [T, E], got {list(logits_in.shape)}")
    T, E = logits_in.shape
    _check(1 <= E <= launchers.GATING_MAX_EXPERTS,
           f"moe_ops::topk_gating ({NAME}): needs 1 <= E <= {launchers.GATING_MAX_EXPERTS}, got E={E}")
    _check(1 <= k <= min(E, launchers.MAX_K), f"moe_ops::topk_gating: k must be in [1, min(E, {launchers.MAX_K})], "
           f"got {k}")
    _check(scoring in ("softmax", "sigmoid"),
           f"moe_ops::topk_gating: scoring must be 'softmax' or 'sigmoid', got '{scoring}'")
    scoring_id = launchers.SCORE_SOFTMAX if scoring == "softmax" else launchers.SCORE_SIGMOID
    _check(n_group >= 0, f"moe_ops::topk_gating: n_group must be >= 0 (0 = off), got {n_group}")
    if n_group > 0:
        _check(E % n_group == 0, f"moe_ops::topk_gating: E={E} is not divisible by n_group={n_group}")
        _check(1 <= topk_group <= n_group, f"moe_ops::topk_gating: topk_group must be in [1, {n_group}], "
               f"got {topk_group}")
        _check(launchers.topk_gating_supported(E, n_group),
               f"moe_ops::topk_gating ({NAME}): group-limited routing with E={E} needs more than "
               f"{launchers.GATING_MAX_GROUP_SMEM // 1024} KiB of shared memory per row")
    _check(T * k <= launchers.INT32_MAX, "moe_ops::topk_gating: T*k overflows int32")
    bias = None
    if correction_bias is not None:
        _check_same_device(logits_in, correction_bias, op, "correction_bias")
        _elem(correction_bias, "correction_bias")
        _check(correction_bias.dim() == 1 and correction_bias.numel() == E,
               f"moe_ops::topk_gating: correction_bias must be 1-D with E={E} entries, got "
               f"{list(correction_bias.shape)}")
        bias = correction_bias.to(torch.float32).contiguous()
    with _Guard(logits_in):
        logits = logits_in.contiguous()
        weights = torch.empty((T, k), dtype=torch.float32, device=logits.device)
        ids = torch.empty((T, k), dtype=torch.int32, device=logits.device)
        launchers.topk_gating(launcher_for(logits), logits.data_ptr(), elem, bias.data_ptr() if bias is not None else 0,
                              T, E, k, scoring_id, renormalize, n_group, topk_group, float(scaling_factor),
                              weights.data_ptr(), ids.data_ptr())
    return weights, ids


def permute(x_in: torch.Tensor, ids_in: torch.Tensor, E: int, block_m: int):
    op = "permute"
    ids = _dispatch_args(x_in, ids_in, E, op)
    _check(1 <= block_m <= 1 << 20, f"moe_ops::permute: block_m must be in [1, 2^20], got {block_m}")
    T, k = ids.shape
    H = x_in.shape[1]
    P = T * k + E * (block_m - 1)
    _check(P <= launchers.INT32_MAX, f"moe_ops::permute: P = T*k + E*(block_m-1) = {P} overflows int32")
    with _Guard(x_in):
        x = x_in.contiguous()
        dev = x.device
        x_sorted = torch.empty((P, H), dtype=x.dtype, device=dev)
        sorted_slots = torch.empty((P,), dtype=torch.int32, device=dev)
        offsets = torch.empty((E + 1,), dtype=torch.int32, device=dev)
        slot_rows = torch.empty((T * k,), dtype=torch.int32, device=dev)
        ws = torch.empty((launchers.permute_workspace_bytes(T, k, E),), dtype=torch.uint8, device=dev)
        launchers.permute(launcher_for(x), x.data_ptr(), x.element_size(), T, H, ids.data_ptr(), k, E, block_m,
                          x_sorted.data_ptr(), sorted_slots.data_ptr(), offsets.data_ptr(), slot_rows.data_ptr(),
                          ws.data_ptr())
    return x_sorted, sorted_slots, offsets, slot_rows


def unpermute(y_in: torch.Tensor, slot_rows_in: torch.Tensor, weights_in: Optional[torch.Tensor], k: int):
    op = "unpermute"
    _check_device(y_in, op, "y_sorted")
    elem = _elem(y_in, "y_sorted")
    _check(y_in.dim() == 2, f"moe_ops::unpermute: y_sorted must be 2-D [P, H], got {list(y_in.shape)}")
    _check_same_device(y_in, slot_rows_in, op, "slot_rows")
    _check(slot_rows_in.dtype == torch.int32, f"moe_ops::unpermute: slot_rows must be int32, got {_dt(slot_rows_in.dtype)}")
    _check(1 <= k <= launchers.MAX_K, f"moe_ops::unpermute: k must be in [1, {launchers.MAX_K}], got {k}")
    _check(slot_rows_in.numel() % k == 0, f"moe_ops::unpermute: slot_rows has {slot_rows_in.numel()} entries, not a "
           f"multiple of k={k}")
    T, H = slot_rows_in.numel() // k, y_in.shape[1]
    weights = _weights_arg(y_in, weights_in, T, k, op)
    with _Guard(y_in):
        y = y_in.contiguous()
        slot_rows = slot_rows_in.contiguous()
        out = torch.empty((T, H), dtype=y.dtype, device=y.device)
        launchers.unpermute(launcher_for(y), y.data_ptr(), elem, y.shape[0], H, slot_rows.data_ptr(),
                            weights.data_ptr() if weights is not None else 0, T, k, out.data_ptr())
    return out


def capacity_dispatch(x_in: torch.Tensor, ids_in: torch.Tensor, E: int, C: int, priority: str):
    op = "capacity_dispatch"
    ids = _dispatch_args(x_in, ids_in, E, op)
    _check(C >= 0, f"moe_ops::capacity_dispatch: capacity must be >= 0, got {C}")
    _check(E * C <= launchers.INT32_MAX, "moe_ops::capacity_dispatch: E*C overflows int32")
    _check(priority in ("kmajor", "token_major"),
           f"moe_ops::capacity_dispatch: priority must be 'kmajor' or 'token_major', got '{priority}'")
    T, k = ids.shape
    H = x_in.shape[1]
    _check(T * k <= launchers.INT32_MAX, "moe_ops::capacity_dispatch: T*k overflows int32")
    with _Guard(x_in):
        x = x_in.contiguous()
        dev = x.device
        buf = torch.empty((E, C, H), dtype=x.dtype, device=dev)
        slot_pos = torch.empty((T, k), dtype=torch.int32, device=dev)
        demand = torch.empty((E,), dtype=torch.int32, device=dev)
        kept = torch.empty((E,), dtype=torch.int32, device=dev)
        ws = torch.empty((launchers.capacity_workspace_bytes(T, k, E, C),), dtype=torch.uint8, device=dev)
        launchers.capacity_dispatch(launcher_for(x), x.data_ptr(), x.element_size(), T, H, ids.data_ptr(), k, E, C,
                                    priority == "kmajor", buf.data_ptr(), slot_pos.data_ptr(), demand.data_ptr(),
                                    kept.data_ptr(), ws.data_ptr())
    return buf, slot_pos, demand, kept


def capacity_combine(buf_in: torch.Tensor, ids_in: torch.Tensor, slot_pos_in: torch.Tensor,
                     weights_in: Optional[torch.Tensor]):
    op = "capacity_combine"
    _check_device(buf_in, op, "buf_out")
    elem = _elem(buf_in, "buf_out")
    _check(buf_in.dim() == 3, f"moe_ops::capacity_combine: buf_out must be 3-D [E, C, H], got {list(buf_in.shape)}")
    ids = _ids_arg(buf_in, ids_in, op, "ids")
    slot_pos = _ids_arg(buf_in, slot_pos_in, op, "slot_pos")
    _check(slot_pos.shape == ids.shape, f"moe_ops::capacity_combine: slot_pos shape {list(slot_pos.shape)} != ids "
           f"shape {list(ids.shape)}")
    E, C, H = buf_in.shape
    T, k = ids.shape
    _check(E * C <= launchers.INT32_MAX, "moe_ops::capacity_combine: E*C overflows int32")
    _check(k <= launchers.COMBINE_MAX_K, f"moe_ops::capacity_combine: k must be <= {launchers.COMBINE_MAX_K}, got {k}")
    weights = _weights_arg(buf_in, weights_in, T, k, op)
    with _Guard(buf_in):
        buf = buf_in.contiguous()
        if k == 0:
            return torch.zeros((T, H), dtype=buf.dtype, device=buf.device)
        out = torch.empty((T, H), dtype=buf.dtype, device=buf.device)
        launchers.capacity_combine(launcher_for(buf), buf.data_ptr(), elem, E, C, H, ids.data_ptr(),
                                   slot_pos.data_ptr(), weights.data_ptr() if weights is not None else 0, T, k,
                                   out.data_ptr())
    return out


def _gemm_args(a, b, offs, E, op, b_name):
    _check_device(a, op, "a")
    _elem(a, "a")
    _check_same_device(a, b, op, b_name)
    _check_same_device(a, offs, op, "expert_offsets")
    _check(a.dtype == b.dtype, f"moe_ops::{op} ({NAME}): operands must share a dtype, got {_dt(a.dtype)} and "
           f"{_dt(b.dtype)}")
    _check(offs.dtype == torch.int32, f"moe_ops::{op}: expert_offsets must be int32, got {_dt(offs.dtype)}")
    _check(offs.dim() == 1 and offs.numel() == E + 1, f"moe_ops::{op}: expert_offsets needs E+1 = {E + 1} entries, "
           f"got {list(offs.shape)}")
    _check(a.shape[0] <= launchers.INT32_MAX, f"moe_ops::{op}: M overflows int32")


def grouped_gemm(a_in: torch.Tensor, b_in: torch.Tensor, offs_in: torch.Tensor, trans_b: bool):
    op = "grouped_gemm"
    _check(a_in.dim() == 2 and b_in.dim() == 3, f"moe_ops::grouped_gemm: need a[M,K], b[E,.,.], got "
           f"{list(a_in.shape)} and {list(b_in.shape)}")
    E, (M, K) = b_in.shape[0], a_in.shape
    N = b_in.shape[1] if trans_b else b_in.shape[2]
    _check(1 <= E <= MAX_EXPERTS, f"moe_ops::grouped_gemm: b needs 1 <= E <= {MAX_EXPERTS} experts, got {E}")
    _check((b_in.shape[2] if trans_b else b_in.shape[1]) == K, f"moe_ops::grouped_gemm: a has K={K} but b is "
           f"{list(b_in.shape)}" + (" (trans_b)" if trans_b else ""))
    _gemm_args(a_in, b_in, offs_in, E, op, "b")
    with _Guard(a_in):
        a, b, offs = a_in.contiguous(), b_in.contiguous(), offs_in.contiguous()
        c = torch.empty((M, N), dtype=a.dtype, device=a.device)
        ws = torch.empty((launchers.grouped_gemm_workspace_bytes(E),), dtype=torch.uint8, device=a.device)
        launchers.grouped_gemm(launcher_for(a), a.data_ptr(), _ELEM[a.dtype], M, K, b.data_ptr(), E, N, bool(trans_b),
                               offs.data_ptr(), c.data_ptr(), ws.data_ptr())
    return c


def grouped_gemm_wgrad(a_in: torch.Tensor, dc_in: torch.Tensor, offs_in: torch.Tensor, E: int):
    op = "grouped_gemm_wgrad"
    _check(a_in.dim() == 2 and dc_in.dim() == 2 and a_in.shape[0] == dc_in.shape[0],
           f"moe_ops::grouped_gemm_wgrad: need a[M,K], dc[M,N], got {list(a_in.shape)} and {list(dc_in.shape)}")
    _check(0 <= E <= MAX_EXPERTS, f"moe_ops::grouped_gemm_wgrad: num_experts must be in [0, {MAX_EXPERTS}], got {E}")
    _gemm_args(a_in, dc_in, offs_in, E, op, "dc")
    (M, K), N = a_in.shape, dc_in.shape[1]
    with _Guard(a_in):
        a, dc, offs = a_in.contiguous(), dc_in.contiguous(), offs_in.contiguous()
        db = torch.empty((E, K, N), dtype=a.dtype, device=a.device)
        ws = torch.empty((launchers.grouped_gemm_workspace_bytes(E),), dtype=torch.uint8, device=a.device)
        launchers.grouped_gemm_wgrad(launcher_for(a), a.data_ptr(), dc.data_ptr(), _ELEM[a.dtype], M, K, N,
                                     offs.data_ptr(), E, db.data_ptr(), ws.data_ptr())
    return db


def fused_experts(x_in: torch.Tensor, ids_in: torch.Tensor, weights_in: Optional[torch.Tensor], wgu_in: torch.Tensor,
                  wd_in: torch.Tensor, activation: str):
    op = "fused_experts"
    _check_device(x_in, op, "x")
    elem = _elem(x_in, "x")
    _check(x_in.dim() == 2, f"moe_ops::fused_experts: x must be 2-D [T, H], got {list(x_in.shape)}")
    ids = _ids_arg(x_in, ids_in, op, "ids")
    (T, H), k = x_in.shape, ids.shape[1]
    _check(ids.shape[0] == T, f"moe_ops::fused_experts: ids has {ids.shape[0]} rows but x has {T}")
    _check(1 <= k <= launchers.MAX_K, f"moe_ops::fused_experts: k must be in [1, {launchers.MAX_K}], got {k}")
    _check(T * k <= launchers.INT32_MAX, "moe_ops::fused_experts: T*k overflows int32")
    _check_same_device(x_in, wgu_in, op, "w_gate_up")
    _check_same_device(x_in, wd_in, op, "w_down")
    _check(wgu_in.dtype == x_in.dtype and wd_in.dtype == x_in.dtype,
           "moe_ops::fused_experts: x, w_gate_up and w_down must share a dtype")
    _check(wgu_in.dim() == 3 and wgu_in.shape[1] % 2 == 0 and wgu_in.shape[2] == H,
           f"moe_ops::fused_experts: w_gate_up must be [E, 2I, H={H}], got {list(wgu_in.shape)}")
    E, I = wgu_in.shape[0], wgu_in.shape[1] // 2
    _check(1 <= E <= MAX_EXPERTS, "moe_ops::fused_experts: needs E >= 1 experts")
    _check(wd_in.dim() == 3 and tuple(wd_in.shape) == (E, H, I),
           f"moe_ops::fused_experts: w_down must be [E={E}, H={H}, I={I}], got {list(wd_in.shape)}")
    _check(activation in ("swiglu", "geglu"),
           f"moe_ops::fused_experts: activation must be 'swiglu' or 'geglu', got '{activation}'")
    act = launchers.ACT_SWIGLU if activation == "swiglu" else launchers.ACT_GEGLU
    weights = _weights_arg(x_in, weights_in, T, k, op)
    with _Guard(x_in):
        x, wgu, wd = x_in.contiguous(), wgu_in.contiguous(), wd_in.contiguous()
        out = torch.empty((T, H), dtype=x.dtype, device=x.device)
        ws = torch.empty((launchers.fused_experts_workspace_bytes(T, k, E, H, I, elem),), dtype=torch.uint8,
                         device=x.device)
        launchers.fused_experts(launcher_for(x), x.data_ptr(), elem, T, H, ids.data_ptr(), k,
                                weights.data_ptr() if weights is not None else 0, wgu.data_ptr(), wd.data_ptr(), E, I,
                                act, out.data_ptr(), ws.data_ptr())
    return out


# Every op of the contract, plus the native-only fused_experts (the cuda backend's fused layer,
# ops.cuda_fused_moe).
IMPLS = {name: globals()[name] for name in (*OP_NAMES, "fused_experts")}
