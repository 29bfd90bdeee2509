"""Public op API: argument checks, then the backend chosen by ``moe_ops.backend``.

Every function validates its arguments *before* any kernel runs and raises ``TypeError`` (wrong
dtype/device/kind) or ``ValueError`` (wrong shape/value). Checks that need tensor *values*
(expert ids in range, monotone offsets) would be a host sync on a GPU, so they run only where
that is free: see :func:`value_checks_enabled`. Kernels never read out of bounds on bad values:
an out-of-range expert id is dropped by every backend.

Pipeline names follow vLLM's fused_moe: router (``topk_gating``) -> dispatch/permute -> experts
(``grouped_gemm``) -> combine (``unpermute`` / ``capacity_combine``).
"""
from __future__ import annotations

import math
import functools
from typing import NamedTuple, Optional, Tuple

import torch

from . import backend as _backend
from . import envs
from ._profiling import profiled, stage

# The argument limits: the same values as csrc/arg_limits.h (tests/test_limits.py checks they agree).
INT32_MAX = 2**31 - 1
MAX_EXPERTS = INT32_MAX - 1  # offsets[E + 1] and ids are int32
MAX_K = 32  # top-k per token (the gating kernels keep k candidates in registers)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
SCORINGS = ("softmax", "sigmoid")
PRIORITIES = ("kmajor", "token_major")
ACTIVATIONS = ("swiglu", "geglu")


class PermuteResult(NamedTuple):
    x_sorted: torch.Tensor        # [P, H]
    sorted_slots: torch.Tensor    # [P] int32, -1 on padding rows
    expert_offsets: torch.Tensor  # [E+1] int32
    slot_rows: torch.Tensor       # [T*k] int32, -1 for dropped (invalid-id) slots


class DispatchResult(NamedTuple):
    buf: torch.Tensor        # [E, C, H]
    slot_pos: torch.Tensor   # [T, k] int32, -1 = dropped
    demand: torch.Tensor     # [E] int32, before drops
    kept: torch.Tensor       # [E] int32


# ----------------------------------------------------------------------------------- checks

def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether checks that read tensor values may run for ``t``.

    ``MOE_OPS_VALUE_CHECKS``: ``auto`` (default) checks CPU tensors only, ``1`` checks CUDA
    tensors too (a device sync per op: debugging only), ``0`` never. Never while tracing for
    ``torch.compile`` or capturing a CUDA graph.
    """
    mode = envs.get("MOE_OPS_VALUE_CHECKS")
    if mode == "0" or torch.compiler.is_compiling():
        return False
    if isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta":
        return False
    if t.device.type == "cuda":
        return mode == "1" and not torch.cuda.is_current_stream_capturing()
    return True


def _check_tensor(name, t, dtypes=None, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"moe_ops: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"moe_ops: {name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"moe_ops: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same_device(**tensors):
    devs = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"moe_ops: tensors must be on one device, got {devs}")


def _check_int(name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"moe_ops: {name} must be an int, got {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"moe_ops: {name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"moe_ops: {name} must be <= {hi}, got {v}")


def _check_rows(what, n):
    if n > INT32_MAX:
        raise ValueError(f"moe_ops: {what} = {n} overflows int32 row indexing (max {INT32_MAX})")


def _check_num_experts(num_experts):
    # E + 1 expert offsets and every expert id must be int32
    _check_int("num_experts", num_experts, 1, MAX_EXPERTS)


def _as_ids(ids, num_experts, name="ids", allow_invalid=False):
    """``ids[T, k]`` as the int32 the kernels take. Shape and size are checked before anything
    reads or copies the values (an expanded view may claim 2**31 elements)."""
    _check_tensor(name, ids, INDEX_DTYPES, 2)
    if not 1 <= ids.shape[1] <= MAX_K:
        raise ValueError(f"moe_ops: {name} must have k in [1, {MAX_K}] columns, got shape {tuple(ids.shape)}")
    _check_rows("T*k", ids.numel())
    if not allow_invalid and ids.numel() and value_checks_enabled(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"moe_ops: {name} must lie in [0, {num_experts}), found values in "
                             f"[{lo}, {hi}] (pass allow_invalid_ids=True to drop such slots)")
    return _to_int32_ids(ids, num_experts)


def _to_int32_ids(ids, num_experts):
    """int64 ids -> int32; an id outside ``[0, num_experts)`` becomes -1 first, since a plain cast
    would wrap ``2**32 + 1`` onto expert 1 instead of dropping it (device-side, no sync)."""
    if ids.dtype == torch.int32:
        return ids
    return torch.where((ids >= 0) & (ids < num_experts), ids, -1).to(torch.int32)


def _as_weights(weights, shape, name="weights"):
    if weights is None:
        return None
    _check_tensor(name, weights, FLOAT_DTYPES, 2)
    if tuple(weights.shape) != tuple(shape):
        raise ValueError(f"moe_ops: {name} must have shape {tuple(shape)}, got {tuple(weights.shape)}")
    return weights if weights.dtype in (torch.float32, torch.float64) else weights.float()


def _check_offsets(offsets, num_experts, m):
    _check_tensor("expert_offsets", offsets, (torch.int32,), 1)
    if offsets.numel() != num_experts + 1:
        raise ValueError(f"moe_ops: expert_offsets must have E+1 = {num_experts + 1} entries, "
                         f"got {offsets.numel()}")
    if value_checks_enabled(offsets):
        o = offsets.to(torch.int64)
        if bool((o[1:] < o[:-1]).any()) or int(o[0]) < 0:
            raise ValueError("moe_ops: expert_offsets must be non-negative and non-decreasing")
        if int(o[-1]) > m:
            raise ValueError(f"moe_ops: expert_offsets ends at {int(o[-1])}, past the {m} rows of a")


def _check_expert_range(expert_range, num_experts_global=None):
    if expert_range is None:
        return None
    if not (isinstance(expert_range, (tuple, list)) and len(expert_range) == 2):
        raise TypeError("moe_ops: expert_range must be a (start, count) pair")
    start, count = expert_range
    _check_int("expert_range start", start, 0)
    _check_int("expert_range count", count, 1)
    if num_experts_global is not None and start + count > num_experts_global:
        raise ValueError(f"moe_ops: expert_range {tuple(expert_range)} exceeds the {num_experts_global} experts")
    return int(start), int(count)


def to_local_ids(ids: torch.Tensor, expert_range: Tuple[int, int]) -> torch.Tensor:
    """Map global expert ids to the local range ``[start, start+count)`` the way vLLM's
    ``expert_map`` does: local id ``id - start``, or -1 for experts held elsewhere (every op
    drops such slots). Device-side, no host sync."""
    start, count = _check_expert_range(expert_range)
    local = ids - start  # in ids' own dtype: an int64 id past int32 must not wrap into the range
    return torch.where((local >= 0) & (local < count), local, -1).to(torch.int32)


# --------------------------------------------------------------------------------------- ops

@profiled
def topk_gating(logits: torch.Tensor, k: int, *, scoring: str = "softmax", renormalize: bool = False,
                n_group: Optional[int] = None, topk_group: Optional[int] = None,
                correction_bias: Optional[torch.Tensor] = None, scaling_factor: float = 1.0,
                expert_range: Optional[Tuple[int, int]] = None,
                backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router: score ``logits[T, E]`` and pick ``k`` experts per token.

    Returns ``(weights[T, k] float32, ids[T, k] int32)``, each row ordered by descending
    selection score (ties to the lower expert index, NaN lowest; ids distinct and in range).

    * ``scoring="softmax"``: weights are softmax probabilities over all E (Mixtral/Qwen); the
      selection score is the logit (same order as the probability).
    * ``scoring="sigmoid"``: scores ``sigmoid(logits)``; selection on ``score + correction_bias``.
    * ``n_group``/``topk_group`` (DeepSeek-V3 group-limited routing): E experts in ``n_group``
      equal groups; a group's score is the sum of its top-2 selection scores; only experts in the
      ``topk_group`` best groups are eligible.
    * weights are the unbiased scores of the chosen experts, divided by their sum (+1e-20) when
      ``renormalize``, times ``scaling_factor``.
    * ``expert_range=(start, count)`` (expert parallelism): routing is over all E experts, then
      ids are made local (:func:`to_local_ids`): ``id - start``, or -1 for experts of other ranks.
    """
    _check_tensor("logits", logits, FLOAT_DTYPES, 2)
    T, E = logits.shape
    if E < 1:
        raise ValueError("moe_ops: logits must have at least one expert column")
    _check_int("k", k, 1, min(E, MAX_K))
    if scoring not in SCORINGS:
        raise ValueError(f"moe_ops: scoring must be one of {SCORINGS}, got {scoring!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError("moe_ops: n_group and topk_group must be given together")
    if n_group is not None:
        _check_int("n_group", n_group, 1, E)
        if E % n_group:
            raise ValueError(f"moe_ops: num_experts {E} is not divisible by n_group {n_group}")
        _check_int("topk_group", topk_group, 1, n_group)
        # k may exceed the topk_group * E/n_group experts of the kept groups: then masked experts
        # (key -inf) fill the rest, lowest index first, as transformers' DeepSeek-V3 router lets
        # torch.topk pick them (its order among those ties is arbitrary; ours is the ranking rule).
    if correction_bias is not None:
        _check_tensor("correction_bias", correction_bias, FLOAT_DTYPES, 1)
        if correction_bias.numel() != E:
            raise ValueError(f"moe_ops: correction_bias must have {E} entries, got {correction_bias.numel()}")
        _check_same_device(logits=logits, correction_bias=correction_bias)
    if not isinstance(scaling_factor, (int, float)) or isinstance(scaling_factor, bool):
        raise TypeError("moe_ops: scaling_factor must be a float")
    _check_rows("T*k", T * k)
    expert_range = _check_expert_range(expert_range, E)
    fn = _backend.resolve("topk_gating", logits.device.type, backend)
    weights, ids = fn(logits, k, scoring, bool(renormalize), n_group or 0, topk_group or 0,
                      correction_bias, float(scaling_factor))
    return (weights, ids) if expert_range is None else (weights, to_local_ids(ids, expert_range))


@profiled
def permute(x: torch.Tensor, ids: torch.Tensor, num_experts: int, *, block_m: int = 1,
            allow_invalid_ids: bool = False, expert_range: Optional[Tuple[int, int]] = None,
            backend: Optional[str] = None) -> PermuteResult:
    """Dispatch: group the T*k token copies by expert (stable in slot order ``s = t*k + j``).

    ``x[T, H]``, ``ids[T, k]`` -> :class:`PermuteResult` with ``x_sorted[P, H]``,
    ``sorted_slots[P]``, ``expert_offsets[E+1]``, ``slot_rows[T*k]``;
    ``P = T*k + E*(block_m-1)``: with ``block_m > 1`` each expert's segment starts at a multiple
    of ``block_m`` and padding rows are zero with ``sorted_slots == -1``.

    ``expert_range=(start, count)``: ``ids`` are global ids in ``[0, num_experts)``; only the
    local experts ``[start, start+count)`` are kept (as experts ``0..count-1`` of the result),
    slots of other experts are dropped (``slot_rows == -1``), as with vLLM's expert map.
    """
    _check_tensor("x", x, FLOAT_DTYPES, 2)
    _check_num_experts(num_experts)
    _check_int("block_m", block_m, 1, 4096)
    ids = _as_ids(ids, num_experts, allow_invalid=allow_invalid_ids)
    if expert_range is not None:
        expert_range = _check_expert_range(expert_range, num_experts)
        ids, num_experts = to_local_ids(ids, expert_range), expert_range[1]
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ops: ids has {ids.shape[0]} rows but x has {x.shape[0]}")
    _check_same_device(x=x, ids=ids)
    T, k = ids.shape
    _check_rows("P = T*k + E*(block_m-1)", T * k + num_experts * (block_m - 1))
    fn = _backend.resolve("permute", x.device.type, backend)
    return PermuteResult(*fn(x, ids, num_experts, block_m))


@profiled
def unpermute(y_sorted: torch.Tensor, slot_rows: torch.Tensor, weights: Optional[torch.Tensor] = None,
              *, k: Optional[int] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Combine: ``out[t] = sum_j w[t,j] * y_sorted[slot_rows[t*k+j]]`` (float32 accumulation in
    j order; rows of -1 contribute nothing). ``k`` is taken from ``weights`` when given.
    Returns ``out[T, H]`` in ``y_sorted``'s dtype."""
    _check_tensor("y_sorted", y_sorted, FLOAT_DTYPES, 2)
    _check_tensor("slot_rows", slot_rows, INDEX_DTYPES)
    _check_rows("T*k", slot_rows.numel())  # before reshape(-1), which copies an expanded view
    slot_rows = slot_rows.reshape(-1)
    if weights is not None:
        _check_tensor("weights", weights, FLOAT_DTYPES, 2)
        wk = weights.shape[1]
        if k is not None and k != wk:
            raise ValueError(f"moe_ops: k={k} disagrees with weights' {wk} columns")
        k = wk
    if k is None:
        raise ValueError("moe_ops: unpermute needs k when weights is None")
    _check_int("k", k, 1, MAX_K)
    if slot_rows.numel() % k:
        raise ValueError(f"moe_ops: slot_rows has {slot_rows.numel()} entries, not a multiple of k={k}")
    T = slot_rows.numel() // k
    _check_rows("T*k", slot_rows.numel())
    weights = _as_weights(weights, (T, k))
    if slot_rows.numel() and value_checks_enabled(slot_rows):
        lo, hi = int(slot_rows.min()), int(slot_rows.max())
        if lo < -1 or hi >= y_sorted.shape[0]:
            raise ValueError(f"moe_ops: slot_rows must lie in [-1, {y_sorted.shape[0]}), found [{lo}, {hi}]")
    slot_rows = slot_rows if slot_rows.dtype == torch.int32 else slot_rows.to(torch.int32)
    _check_same_device(y_sorted=y_sorted, slot_rows=slot_rows, weights=weights)
    fn = _backend.resolve("unpermute", y_sorted.device.type, backend)
    return fn(y_sorted, slot_rows, weights, k)


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float, *,
                    min_capacity: int = 0, multiple_of: int = 1) -> int:
    """Slots per expert: ``max(min_capacity, ceil(capacity_factor * k * num_tokens / num_experts))``
    rounded up to ``multiple_of``. See docs/capacity.md for how GShard, Switch, DeepSpeed, Tutel
    and MegaBlocks map onto these arguments."""
    for n, v, lo in (("num_tokens", num_tokens, 0), ("k", k, 1), ("num_experts", num_experts, 1),
                     ("min_capacity", min_capacity, 0), ("multiple_of", multiple_of, 1)):
        _check_int(n, v, lo)
    if not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool):
        raise TypeError("moe_ops: capacity_factor must be a number")
    if not capacity_factor >= 0 or math.isinf(capacity_factor):
        raise ValueError(f"moe_ops: capacity_factor must be finite and >= 0, got {capacity_factor}")
    cap = max(min_capacity, math.ceil(capacity_factor * k * num_tokens / num_experts))
    return -(-cap // multiple_of) * multiple_of


@profiled
def capacity_dispatch(x: torch.Tensor, ids: torch.Tensor, num_experts: int, capacity: int, *,
                      priority: str = "kmajor", allow_invalid_ids: bool = False,
                      backend: Optional[str] = None) -> DispatchResult:
    """Capacity-limited dispatch into a padded ``buf[E, C, H]`` (zero where unused).

    A slot's position is the number of earlier slots routed to the same expert in priority
    order: ``kmajor`` orders (j, t) so every first choice beats every second choice
    (GShard/Tutel); ``token_major`` orders (t, j) (MegaBlocks). Kept when position < capacity;
    ``slot_pos`` is -1 for dropped slots. ``demand``/``kept`` count slots per expert before/after
    drops."""
    _check_tensor("x", x, FLOAT_DTYPES, 2)
    _check_num_experts(num_experts)
    _check_int("capacity", capacity, 0)
    if priority not in PRIORITIES:
        raise ValueError(f"moe_ops: priority must be one of {PRIORITIES}, got {priority!r}")
    ids = _as_ids(ids, num_experts, allow_invalid=allow_invalid_ids)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_ops: ids has {ids.shape[0]} rows but x has {x.shape[0]}")
    _check_same_device(x=x, ids=ids)
    _check_rows("E*C", num_experts * capacity)
    _check_rows("T*k", ids.numel())
    fn = _backend.resolve("capacity_dispatch", x.device.type, backend)
    return DispatchResult(*fn(x, ids, num_experts, capacity, priority))


@profiled
def capacity_combine(buf_out: torch.Tensor, ids: torch.Tensor, slot_pos: torch.Tensor,
                     weights: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> torch.Tensor:
    """``out[t] = sum_j w[t,j] * buf_out[ids[t,j], slot_pos[t,j]]`` over kept slots (float32
    accumulation in j order; dropped slots contribute 0, no renormalisation)."""
    _check_tensor("buf_out", buf_out, FLOAT_DTYPES, 3)
    E, C, _ = buf_out.shape
    _check_tensor("slot_pos", slot_pos, INDEX_DTYPES, 2)
    ids = _as_ids(ids, E, allow_invalid=True)  # slots with invalid ids have slot_pos == -1
    if tuple(slot_pos.shape) != tuple(ids.shape):
        raise ValueError(f"moe_ops: slot_pos shape {tuple(slot_pos.shape)} != ids shape {tuple(ids.shape)}")
    _check_same_device(buf_out=buf_out, ids=ids, slot_pos=slot_pos)
    _check_rows("T*k", ids.numel())
    _check_rows("E*C", E * C)
    if slot_pos.numel() and value_checks_enabled(slot_pos):
        bad = (slot_pos >= C) | (slot_pos < -1) | ((slot_pos >= 0) & ((ids < 0) | (ids >= E)))
        if bool(bad.any()):
            raise ValueError(f"moe_ops: slot_pos must lie in [-1, {C}) and kept slots need ids in [0, {E})")
    slot_pos = slot_pos if slot_pos.dtype == torch.int32 else slot_pos.to(torch.int32)
    weights = _as_weights(weights, ids.shape)
    _check_same_device(buf_out=buf_out, ids=ids, slot_pos=slot_pos, weights=weights)
    fn = _backend.resolve("capacity_combine", buf_out.device.type, backend)
    return fn(buf_out, ids, slot_pos, weights)


@profiled
def grouped_gemm(a: torch.Tensor, b: torch.Tensor, expert_offsets: torch.Tensor, *, trans_b: bool = False,
                 backend: Optional[str] = None, weight_format: Optional[str] = None,
                 b_scale: Optional[torch.Tensor] = None, block_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Experts: ``c[M, N]``; rows ``offs[e]:offs[e+1]`` of ``a[M, K]`` multiply ``b[e]``
    (``b[E, K, N]``, or ``b[E, N, K]`` with ``trans_b``); rows outside ``[offs[0], offs[E])`` are 0.
    float32 accumulation; output in ``a``'s dtype.

    Quantized experts (weight-only; :mod:`moe_ops.quant`): ``weight_format`` (``fp8_e4m3``,
    ``mxfp4``, ``int8``) with ``b`` the checkpoint tensor in its ``[E, N, K]`` layout (so
    ``trans_b=True``), ``b_scale`` its scales and fp8's ``block_size``; ``a`` fp16/bf16/fp32. The
    result is ``a @ dequantize_experts(b, b_scale).T`` per expert. The ``triton`` backend (chosen,
    or automatically for CUDA tensors) dequantizes inside its GEMM mainloop
    (``moe_ops_triton::grouped_gemm_quantized``; not when ``a`` needs a gradient); every other case
    dequantizes the weights to float32 and runs the backend's float32 grouped GEMM (``a`` upcast),
    the reference's computation."""
    if weight_format is not None or b_scale is not None or block_size is not None:
        return _grouped_gemm_quantized(a, b, expert_offsets, trans_b, backend, weight_format, b_scale, block_size)
    _check_tensor("a", a, FLOAT_DTYPES, 2)
    _check_tensor("b", b, FLOAT_DTYPES, 3)
    if a.dtype != b.dtype:
        raise TypeError(f"moe_ops: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    E = b.shape[0]
    K = b.shape[2] if trans_b else b.shape[1]
    if a.shape[1] != K:
        raise ValueError(f"moe_ops: a has K={a.shape[1]} but b{' (trans_b)' if trans_b else ''} "
                         f"shape {tuple(b.shape)} needs K={K}")
    _check_offsets(expert_offsets, E, a.shape[0])
    _check_same_device(a=a, b=b, expert_offsets=expert_offsets)
    _check_rows("M", a.shape[0])
    fn = _backend.resolve("grouped_gemm", a.device.type, backend)
    return fn(a, b, expert_offsets, bool(trans_b))


QUANT_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_quantized_gemm(a, b, expert_offsets, trans_b, weight_format, b_scale, block_size):
    """grouped_gemm's arguments with quantized ``b``; returns ``(block_n, block_k)`` for the op."""
    from . import quant
    if weight_format is None or b_scale is None:
        raise ValueError("moe_ops: quantized b needs weight_format and b_scale together")
    _check_tensor("a", a, QUANT_ACT_DTYPES, 2)
    if not isinstance(b, torch.Tensor) or b.dim() != (4 if weight_format == "mxfp4" else 3):
        raise ValueError(f"moe_ops: quantized b must be the [E, ...] {weight_format} tensor, "
                         f"got {getattr(b, 'shape', type(b))}")
    N, K = quant.check_quantized(b, b_scale, weight_format, block_size)
    if not trans_b:
        raise ValueError("moe_ops: quantized b is stored [E, N, K] (the checkpoint's [out, in]): pass trans_b=True")
    if a.shape[1] != K:
        raise ValueError(f"moe_ops: a has K={a.shape[1]} but the quantized b {tuple(b.shape)} holds K={K}")
    _check_offsets(expert_offsets, b.shape[0], a.shape[0])
    _check_same_device(a=a, b=b, b_scale=b_scale, expert_offsets=expert_offsets)
    _check_rows("M", a.shape[0])
    return quant._block(block_size) if weight_format == "fp8_e4m3" else (0, 0)


def _triton_quantized_gemm(device_type: str, backend: Optional[str]):
    """``moe_ops_triton::grouped_gemm_quantized`` when the Triton backend runs this call (chosen, or
    automatically for CUDA tensors, since no other backend has a quantized GEMM kernel), else None."""
    name = backend if backend is not None else envs.get("MOE_OPS_BACKEND")
    if name == "triton":
        _backend.resolve("grouped_gemm", device_type, "triton")  # the clear error when it cannot run here
    elif name is not None or device_type != "cuda" or "triton" not in _backend.available_backends(
            "grouped_gemm", device_type):
        return None
    return torch.ops.moe_ops_triton.grouped_gemm_quantized


def _grouped_gemm_quantized(a, b, expert_offsets, trans_b, backend, weight_format, b_scale, block_size):
    bn, bk = _check_quantized_gemm(a, b, expert_offsets, trans_b, weight_format, b_scale, block_size)
    op = _triton_quantized_gemm(a.device.type, backend)
    if op is not None and not (torch.is_grad_enabled() and a.requires_grad):  # the op has no derivative
        return op(a, b, b_scale, expert_offsets, weight_format, bn, bk)
    fn = _backend.resolve("grouped_gemm", a.device.type, backend)
    from . import reference
    w = reference.dequantize_experts(b, b_scale, weight_format, (bn, bk))
    return fn(a.to(torch.float32), w, expert_offsets, True).to(a.dtype)


@profiled
def grouped_gemm_wgrad(a: torch.Tensor, dc: torch.Tensor, expert_offsets: torch.Tensor, num_experts: int, *,
                       backend: Optional[str] = None) -> torch.Tensor:
    """Weight gradient of :func:`grouped_gemm`: ``db[e] = a[offs[e]:offs[e+1]]^T @ dc[same rows]``,
    ``db[E, K, N]`` in ``a``'s dtype (zero for experts with no rows)."""
    _check_tensor("a", a, FLOAT_DTYPES, 2)
    _check_tensor("dc", dc, FLOAT_DTYPES, 2)
    if a.dtype != dc.dtype or a.shape[0] != dc.shape[0]:
        raise ValueError(f"moe_ops: a {tuple(a.shape)} {a.dtype} and dc {tuple(dc.shape)} {dc.dtype} "
                         "must share rows and dtype")
    _check_num_experts(num_experts)
    _check_offsets(expert_offsets, num_experts, a.shape[0])
    _check_same_device(a=a, dc=dc, expert_offsets=expert_offsets)
    _check_rows("M", a.shape[0])
    fn = _backend.resolve("grouped_gemm_wgrad", a.device.type, backend)
    return fn(a, dc, expert_offsets, num_experts)


def gated_activation(h: torch.Tensor, activation: str = "swiglu") -> torch.Tensor:
    """``act(gate) * up`` on ``h = [gate | up]`` (HF's ``gate_up_proj`` layout): SwiGLU (silu)
    or GeGLU (gelu), computed in float32 (float64 stays float64), cast back to ``h``'s dtype.
    The one definition every backend's unfused path and the layers use."""
    gate, up = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32).chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) if activation == "swiglu" else torch.nn.functional.gelu(gate)
    return (act * up).to(h.dtype)


@profiled
def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor, *, activation: str = "swiglu", capacity_factor: Optional[float] = None,
                    min_capacity: int = 0, priority: str = "kmajor", allow_invalid_ids: bool = False,
                    backend: Optional[str] = None) -> torch.Tensor:
    """The routed half of an MoE layer for given router output: ``out[t] = sum_j w[t,j] *
    expert_{ids[t,j]}(x[t])`` (dropless), or GShard capacity with ``capacity_factor``. Every stage
    uses ``backend`` where it has the op, else the automatic choice."""
    T, H = x.shape
    E = w_gate_up.shape[0]
    k = ids.shape[1]
    dev = x.device.type

    def be(op):
        return _backend.resolved_name(op, dev, backend, strict=False)

    if capacity_factor is None:
        with stage("dispatch"):
            x_sorted, _, offsets, slot_rows = permute(x, ids, E, allow_invalid_ids=allow_invalid_ids,
                                                      backend=be("permute"))
        with stage("experts"):
            h = grouped_gemm(x_sorted, w_gate_up, offsets, trans_b=True, backend=be("grouped_gemm"))
            y = grouped_gemm(gated_activation(h, activation), w_down, offsets, trans_b=True, backend=be("grouped_gemm"))
        with stage("combine"):
            return unpermute(y, slot_rows, weights, backend=be("unpermute"))
    C = expert_capacity(T, k, E, capacity_factor, min_capacity=min_capacity)
    with stage("dispatch"):
        d = capacity_dispatch(x, ids, E, C, priority=priority, allow_invalid_ids=allow_invalid_ids,
                              backend=be("capacity_dispatch"))
    with stage("experts"):
        offsets = torch.arange(E + 1, device=x.device, dtype=torch.int32) * C
        h = grouped_gemm(d.buf.reshape(E * C, H), w_gate_up, offsets, trans_b=True, backend=be("grouped_gemm"))
        y = grouped_gemm(gated_activation(h, activation), w_down, offsets, trans_b=True, backend=be("grouped_gemm"))
    with stage("combine"):
        return capacity_combine(y.reshape(E, C, H), ids, d.slot_pos, weights, backend=be("capacity_combine"))


class _WeightGuard:
    """Knows, without reading it, whether a weight tensor still holds the bytes it held when packed.

    Version counters cannot tell: ``w.data.mul_(2)`` writes through a tensor with a counter of its
    own, and inference tensors have none. Instead the guard shares the weight's storage
    copy-on-write (``torch._lazy_clone``): any write to that storage, through any alias, makes
    PyTorch give the writer a private copy, so "still sharing the buffer with the guard" proves
    "unchanged" in O(1) at no memory cost. When the sharing was broken (a write, or a read through
    a mutable data pointer, which PyTorch treats alike) the guard compares the bytes once and,
    if they are equal, shares again. A storage that cannot be shared copy-on-write (memory owned
    by NumPy or another library) is kept as a private copy and compared on every check: exact,
    at the cost of one read of the weights per call and one more copy in memory.
    """

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        self._meta = _meta(t)
        self._arm(t)

    def _arm(self, t: torch.Tensor) -> None:
        self.cow = False
        try:
            self._copy = torch._lazy_clone(t)
            self.cow = bool(torch._C._is_cow_tensor(t)) and t.const_data_ptr() == self._copy.const_data_ptr()
        except (RuntimeError, AttributeError):  # no COW for this storage (or this torch)
            pass
        if not self.cow:
            self._copy = t.clone()

    def fresh(self, t: torch.Tensor) -> bool:
        t = t.detach()
        if _meta(t) != self._meta:
            return False
        if self.cow and torch._C._is_cow_tensor(t) and t.const_data_ptr() == self._copy.const_data_ptr():
            return True
        if not _same_bytes(t, self._copy):
            return False
        if self.cow:
            self._arm(t)  # unchanged after all (a read materialized it): share again, free the copy
        return True


def _meta(t: torch.Tensor):
    return (t.device, t.dtype, tuple(t.shape), t.stride(), t.is_inference())


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads and -0.0 included, which ``torch.equal`` on floats is not)."""
    it = _INT_OF_SIZE[a.element_size()]
    return bool(torch.equal(a.view(it), b.view(it)))


class PackedExperts:
    """Expert weights repacked once for the CPU backend's panel GEMM (:func:`pack_experts`).

    Layout ``panel16``: ``w_gate_up[E, ceil(I/16), 2, H, 16]`` and ``w_down[E, ceil(H/16), I, 16]``,
    16-column panels of the logical ``[K, N]`` operands, in the weights' dtype (the same bytes,
    zero-padded columns). Layout ``vnni`` (bf16, for AVX512-BF16's ``vdpbf16ps`` and oneDNN's
    brgemm): 32-column blocks with the K rows as ``ceil(K/2)`` (k even, k odd) pairs,
    ``[E, ceil(I/16), ceil(H/2), 2, 16, 2]`` (each row: 16 gate | 16 up columns) and
    ``[E, ceil(H/32), ceil(I/2), 32, 2]``. :meth:`matches` says whether given weights still
    hold exactly the values packed (a copy-on-write guard, :class:`_WeightGuard`; docs/cpu.md), so
    a packing of other or since-modified weights is refused instead of silently used."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, sources):
        self.w_gate_up = w_gate_up
        self.w_down = w_down
        self._guards = tuple(_WeightGuard(t) for t in sources)

    @property
    def layout(self) -> str:
        """``"panel16"`` or ``"vnni"`` (the layout is in the rank)."""
        return "vnni" if self.w_gate_up.dim() == 6 else "panel16"

    def matches(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
        """Whether these weights still hold exactly the values that were packed."""
        return all(g.fresh(t) for g, t in zip(self._guards, (w_gate_up, w_down)))


@profiled
def pack_experts(w_gate_up: torch.Tensor, w_down: torch.Tensor, layout: str = "auto") -> PackedExperts:
    """Repack CPU expert weights (``w_gate_up[E, 2I, H]``, ``w_down[E, H, I]``; float32,
    float16 or bfloat16) for ``moe_forward(..., packed=...)`` on the ``cpu`` backend, whose
    panel GEMM needs half the loads per FMA of the as-stored layout and streams each panel
    contiguously (figures in docs/cpu.md). One pass over the weights (a load-time cost, like
    oneDNN/IPEX weight prepacking); the packed copy is as large as the weights.

    ``layout``: ``"auto"`` (``"vnni"`` for bfloat16 on a CPU with AVX512-BF16, else
    ``"panel16"``), ``"panel16"`` (AVX2/FMA kernel, any dtype) or ``"vnni"`` (bfloat16 only: the
    AVX512-BF16 kernel; on other CPUs it runs emulated, for testing -- see docs/cpu.md)."""
    _check_tensor("w_gate_up", w_gate_up, (torch.float16, torch.bfloat16, torch.float32), 3)
    _check_tensor("w_down", w_down, (torch.float16, torch.bfloat16, torch.float32), 3)
    if w_gate_up.device.type != "cpu" or w_down.device.type != "cpu":
        raise ValueError("moe_ops.pack_experts: packed weights are a CPU-backend format; got "
                         f"{w_gate_up.device} / {w_down.device}")
    E, two_i, H = w_gate_up.shape
    if two_i % 2 or tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"moe_ops.pack_experts: need w_gate_up[E, 2I, H] and w_down[E, H, I], got "
                         f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}")
    if w_gate_up.dtype != w_down.dtype:
        raise TypeError("moe_ops.pack_experts: w_gate_up and w_down must share a dtype")
    if layout not in ("auto", "panel16", "vnni"):
        raise ValueError(f"moe_ops.pack_experts: layout must be 'auto', 'panel16' or 'vnni', got {layout!r}")
    if layout == "vnni" and w_gate_up.dtype != torch.bfloat16:
        raise TypeError(f"moe_ops.pack_experts: layout 'vnni' is for bfloat16 weights, got {w_gate_up.dtype}")
    pack = _backend.native_op("pack_experts")
    if pack is None:
        raise RuntimeError("moe_ops.pack_experts needs the compiled CPU extension: "
                           f"{_backend.load_errors().get('cpu', 'moe_ops._C has no pack_experts')}")
    with torch.no_grad():
        pgu, pd = pack(w_gate_up.detach(), w_down.detach(), layout)
    return PackedExperts(pgu, pd, (w_gate_up, w_down))


def repack_if_stale(packed: Optional[PackedExperts], w_gate_up: torch.Tensor,
                    w_down: torch.Tensor) -> PackedExperts:
    """``packed`` while it is still the packing of these weights, else a fresh
    :func:`pack_experts` of them (the layers' packed-weight caches)."""
    if packed is not None and packed.matches(w_gate_up, w_down):
        return packed
    return pack_experts(w_gate_up, w_down)


def _route(x, router_logits, w_gate_up, w_down, k, correction_bias, backend, **gating):
    """The fused layers' first stage: the router on ``backend``; and whether autograd needs the
    unfused op chain (the fused expert ops have no derivative)."""
    with stage("router"):
        weights, ids = topk_gating(router_logits, k, correction_bias=correction_bias, backend=backend, **gating)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, router_logits, w_gate_up, w_down, correction_bias) if t is not None)
    return weights, ids, needs_grad


def cpu_fused_moe(x, router_logits, w_gate_up, w_down, k, *, activation="swiglu", scoring="softmax",
                  renormalize=False, n_group=None, topk_group=None, correction_bias=None,
                  scaling_factor=1.0, packed=None):
    """:func:`moe_forward`'s dropless layer on the ``cpu`` backend (its fused path, registered by
    ``moe_ops._register_native``): router kernel, then the fused expert op ``moe_ops::fused_experts``
    (csrc/cpu/fused_moe.cpp: gather -> GEMM1 + gated activation -> GEMM2 -> weighted combine,
    no intermediate permuted tensors). The fused op has no autograd formula and no float64
    kernel: those calls run the unfused ``cpu`` ops instead. With ``packed``
    (:func:`pack_experts`) the experts run ``moe_ops::fused_experts_packed``
    (csrc/cpu/fused_moe_packed.cpp), the same pipeline on the panel GEMM."""
    weights, ids, needs_grad = _route(x, router_logits, w_gate_up, w_down, k, correction_bias, "cpu",
                                      scoring=scoring, renormalize=renormalize, n_group=n_group,
                                      topk_group=topk_group, scaling_factor=scaling_factor)
    if x.dtype == torch.float64 or needs_grad:
        return experts_forward(x, weights, ids, w_gate_up, w_down, activation=activation, backend="cpu")
    # One op runs dispatch, experts and combine interleaved per expert: its three stage ranges
    # nest around it (equal spans), so every trace of the layer names all four stages.
    with stage("dispatch"), stage("experts"), stage("combine"):
        if packed is not None:
            return _backend.native_op("fused_experts_packed")(x, ids, weights, packed.w_gate_up, packed.w_down,
                                                              activation)
        return _backend.native_op("fused_experts")(x, ids, weights, w_gate_up, w_down, activation)


def cuda_fused_moe(name: str, fused_experts):
    """:func:`moe_forward`'s dropless layer on the CUDA kernels: backend ``name`` (``cuda``, or
    ``cuda_sim`` where the SIMT emulator runs them), whose ``fused_experts`` op is the expert
    stage of csrc/cuda/grouped_gemm.cu (slot index -> GEMM1 gathering x rows + activation ->
    GEMM2 * router weight scattered to slot order -> fixed-order k-sum). Every dtype, float64
    included; calls that need gradients run the unfused ops of ``name``."""
    def fused(x, router_logits, w_gate_up, w_down, k, *, activation="swiglu", scoring="softmax",
              renormalize=False, n_group=None, topk_group=None, correction_bias=None, scaling_factor=1.0):
        weights, ids, needs_grad = _route(x, router_logits, w_gate_up, w_down, k, correction_bias, name,
                                          scoring=scoring, renormalize=renormalize, n_group=n_group,
                                          topk_group=topk_group, scaling_factor=scaling_factor)
        if needs_grad:
            return experts_forward(x, weights, ids, w_gate_up, w_down, activation=activation, backend=name)
        with stage("dispatch"), stage("experts"), stage("combine"):
            return fused_experts(x, ids, weights, w_gate_up, w_down, activation)
    fused.__name__ = fused.__qualname__ = f"{name}_fused_moe"
    return fused


def _check_quantized_layer(x, router_logits, w_gate_up, w_down, weight_format, gu_scale, d_scale, block_size):
    """moe_forward's arguments with quantized weights, checked once before anything runs."""
    from . import quant
    if weight_format is None or gu_scale is None or d_scale is None:
        raise ValueError("moe_ops: quantized weights need weight_format, w_gate_up_scale and w_down_scale together")
    _check_tensor("x", x, FLOAT_DTYPES, 2)
    shapes = []
    for name, w, s in (("w_gate_up", w_gate_up, gu_scale), ("w_down", w_down, d_scale)):
        if not isinstance(w, torch.Tensor) or w.dim() != (4 if weight_format == "mxfp4" else 3):
            raise ValueError(f"moe_ops: quantized {name} must be the [E, ...] {weight_format} tensor, "
                             f"got {getattr(w, 'shape', type(w))}")
        shapes.append((w.shape[0], *quant.check_quantized(w, s, weight_format, block_size)))
    (E, N, K), (Ed, Nd, Kd) = shapes
    if N % 2 or K != x.shape[1] or (Ed, Nd, Kd) != (E, x.shape[1], N // 2):
        raise ValueError(f"moe_ops: quantized w_gate_up must hold [E, 2I, H={x.shape[1]}] and w_down [E, H, I], got "
                         f"{(E, N, K)} and {(Ed, Nd, Kd)}")
    _check_tensor("router_logits", router_logits, FLOAT_DTYPES, 2)
    if tuple(router_logits.shape) != (x.shape[0], E):
        raise ValueError(f"moe_ops: router_logits must be [T={x.shape[0]}, E={E}], got {tuple(router_logits.shape)}")
    _check_same_device(x=x, router_logits=router_logits, w_gate_up=w_gate_up, w_down=w_down)


@functools.lru_cache(maxsize=None)
def _cpu_quantized_kernels() -> str:
    """Which kernels ``moe_ops::fused_experts_quantized`` runs here: ``avx512_bf16``, ``avx2`` or
    ``""`` (none: the op refuses). Fixed for the process: the C++ reads the CPU and
    MOE_OPS_CPU_EMULATE_AVX512 once."""
    from . import build_info
    return str(build_info().get("cpu", {}).get("quantized_experts") or "")


def _quantized_op_takes(x: torch.Tensor, weight_format: str, bk: int) -> bool:
    """Whether ``moe_ops::fused_experts_quantized`` runs this call here: bf16 ``x`` on CPU, the op
    built, its kernels present (:func:`_cpu_quantized_kernels`), an even fp8 k block (a multiple
    of 32 on the AVX2 kernels). Gradients and the rest of the call are the caller's to check."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or _backend.native_op("fused_experts_quantized") is None:
        return False
    kernels = _cpu_quantized_kernels()
    if weight_format == "fp8_e4m3" and bk % (32 if kernels == "avx2" else 2):
        return False
    return bool(kernels)


def _quantized_cpu_path(x, router_logits, w_gate_up, w_down, weight_format, gu_scale, d_scale, block_size,
                        capacity_factor, backend):
    """``(ids, weights, activation) -> out`` through the CPU's quantized fused expert op when it
    applies (dropless, bf16 x on CPU, the cpu backend, AVX512-BF16 kernels or AVX2 -- there fp8 k
    blocks of a multiple of 32 --, no gradient), else None.
    The arguments are checked (:func:`_check_quantized_layer`)."""
    from . import quant
    bn, bk = quant._block(block_size)
    if (capacity_factor is not None or backend not in (None, "cpu") or not _quantized_op_takes(x, weight_format, bk)
            or (torch.is_grad_enabled() and (x.requires_grad or router_logits.requires_grad))):
        return None
    op = _backend.native_op("fused_experts_quantized")
    return lambda ids, weights, act: op(x, ids, weights, w_gate_up, gu_scale, w_down, d_scale, weight_format,
                                        bn, bk, act)


def _dequantized_weights(w_gate_up, w_down, weight_format, gu_scale, d_scale, block_size):
    """moe_forward's quantized weights (checked) as float32 tensors: the fallback of every backend
    without a quantized expert kernel."""
    from . import quant
    with torch.no_grad():
        return (quant.dequantize_experts(w_gate_up, gu_scale, weight_format, block_size=block_size),
                quant.dequantize_experts(w_down, d_scale, weight_format, block_size=block_size))


def _quantized_triton_layer(x, router_logits, w_gate_up, w_down, k, weight_format, gu_scale, d_scale, block_size,
                            backend, *, activation, capacity_factor, min_capacity, priority, **gating):
    """moe_forward on quantized weights (checked by :func:`_check_quantized_layer`) through the
    Triton quantized grouped GEMM, the weights dequantized in its mainloop (no float32 copy): when
    Triton runs this call (``backend="triton"``, or CUDA tensors with no backend chosen) and no
    gradient is needed (the op has no derivative) and ``x`` is fp16/bf16/fp32; else None. Dropless:
    the fused Triton layer (``triton_kernels.fused_moe.fused_moe_quantized_forward``); capacity: the
    other stages as :func:`experts_forward`, on the same backend choice."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, router_logits, gating.get("correction_bias")))
    op = None if needs_grad or x.dtype not in QUANT_ACT_DTYPES else _triton_quantized_gemm(x.device.type, backend)
    if op is None:
        return None
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_ops: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if priority not in PRIORITIES:
        raise ValueError(f"moe_ops: priority must be one of {PRIORITIES}, got {priority!r}")
    T, H = x.shape
    E = w_gate_up.shape[0]
    _check_int("k", k, 1, min(E, MAX_K))
    _check_rows("T*k", T * k)
    from . import quant
    bn, bk = quant._block(block_size)
    dev = x.device.type

    def be(name):
        return _backend.resolved_name(name, dev, backend, strict=False)

    def experts(a, offsets):
        h = op(a, w_gate_up, gu_scale, offsets, weight_format, bn, bk)
        return op(gated_activation(h, activation), w_down, d_scale, offsets, weight_format, bn, bk)

    if capacity_factor is None:  # the fused Triton layer (its own router, index build and combine)
        import importlib
        tk = importlib.import_module("moe_ops.triton_kernels")  # loaded already (the backend's loader)
        return tk.fused_moe_quantized_forward(x, router_logits, w_gate_up, gu_scale, w_down, d_scale, weight_format,
                                              bn, bk, k, activation=activation, **gating)
    with stage("router"):
        weights, ids = topk_gating(router_logits, k, backend=be("topk_gating"), **gating)
    C = expert_capacity(T, k, E, capacity_factor, min_capacity=min_capacity)
    with stage("dispatch"):
        d = capacity_dispatch(x, ids, E, C, priority=priority, backend=be("capacity_dispatch"))
    with stage("experts"):
        offsets = torch.arange(E + 1, device=x.device, dtype=torch.int32) * C
        y = experts(d.buf.reshape(E * C, H), offsets)
    with stage("combine"):
        return capacity_combine(y.reshape(E, C, H), ids, d.slot_pos, weights, backend=be("capacity_combine"))


@profiled
def moe_forward(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                k: int, *, activation: str = "swiglu", scoring: str = "softmax", renormalize: bool = False,
                n_group: Optional[int] = None, topk_group: Optional[int] = None,
                correction_bias: Optional[torch.Tensor] = None, scaling_factor: float = 1.0,
                capacity_factor: Optional[float] = None, min_capacity: int = 0, priority: str = "kmajor",
                backend: Optional[str] = None, packed: Optional[PackedExperts] = None,
                weight_format: Optional[str] = None, w_gate_up_scale: Optional[torch.Tensor] = None,
                w_down_scale: Optional[torch.Tensor] = None,
                block_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A whole MoE layer: router -> dispatch -> experts -> combine.

    ``x[T, H]``, ``router_logits[T, E]``, ``w_gate_up[E, 2I, H]`` (rows ``[gate; up]``),
    ``w_down[E, H, I]`` -> ``out[T, H]`` in ``x``'s dtype. Expert ``e`` computes
    ``w_down[e] @ act(w_gate_up[e] @ x)`` with ``act`` = SwiGLU (``silu(gate) * up``) or GeGLU.
    Dropless when ``capacity_factor`` is None, else GShard capacity
    (:func:`expert_capacity` with ``min_capacity``) and ``priority``.
    ``backend`` picks every stage's kernel; stages that backend lacks use the automatic choice.
    ``packed`` (:func:`pack_experts` of these weights): the ``cpu`` backend's dropless path runs
    its panel GEMM on them when no gradient is needed (otherwise, and on other backends, the
    weights are used as usual). Results agree with the unpacked path to rounding, not bitwise.
    ``weight_format`` (``fp8_e4m3``, ``mxfp4``, ``int8``; :mod:`moe_ops.quant`): the two weights
    are quantized checkpoint tensors with scales ``w_gate_up_scale`` / ``w_down_scale`` (and fp8's
    ``block_size``); the output is in ``x``'s dtype. Dropless bf16 layers on the ``cpu`` backend
    run ``moe_ops::fused_experts_quantized`` (the weights read quantized and dequantized exactly
    in registers, no gradient; AVX512-BF16 kernels, else AVX2 --
    ``build_info()["cpu"]["quantized_experts"]``, docs/quantization.md); with ``backend="triton"``
    (or CUDA tensors and no backend) the Triton quantized grouped GEMMs dequantize in their
    mainloop; everything else dequantizes the weights to float32 on every call (a float32 copy of
    both, freed after the call) and runs the layer in float32 (``x`` upcast), the oracle's
    computation.
    """
    if weight_format is not None or w_gate_up_scale is not None or w_down_scale is not None:
        _check_quantized_layer(x, router_logits, w_gate_up, w_down, weight_format, w_gate_up_scale, w_down_scale,
                               block_size)
        fast = _quantized_cpu_path(x, router_logits, w_gate_up, w_down, weight_format, w_gate_up_scale,
                                   w_down_scale, block_size, capacity_factor, backend)
        if fast is not None:
            weights, ids = topk_gating(router_logits, k, scoring=scoring, renormalize=renormalize,
                                       n_group=n_group, topk_group=topk_group, correction_bias=correction_bias,
                                       scaling_factor=scaling_factor, backend="cpu")
            with stage("dispatch"), stage("experts"), stage("combine"):
                return fast(ids, weights, activation)
        out = _quantized_triton_layer(x, router_logits, w_gate_up, w_down, k, weight_format, w_gate_up_scale,
                                      w_down_scale, block_size, backend, activation=activation,
                                      capacity_factor=capacity_factor, min_capacity=min_capacity, priority=priority,
                                      scoring=scoring, renormalize=renormalize, n_group=n_group,
                                      topk_group=topk_group, correction_bias=correction_bias,
                                      scaling_factor=scaling_factor)
        if out is not None:
            return out
        w_gate_up, w_down = _dequantized_weights(w_gate_up, w_down, weight_format, w_gate_up_scale, w_down_scale,
                                                 block_size)
        out = moe_forward(x.to(torch.float32), router_logits, w_gate_up, w_down, k, activation=activation,
                          scoring=scoring, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                          correction_bias=correction_bias, scaling_factor=scaling_factor,
                          capacity_factor=capacity_factor, min_capacity=min_capacity, priority=priority,
                          backend=backend)
        return out.to(x.dtype)
    if block_size is not None:
        raise ValueError("moe_ops: block_size is for quantized weights (weight_format='fp8_e4m3')")
    _check_tensor("x", x, FLOAT_DTYPES, 2)
    _check_tensor("router_logits", router_logits, FLOAT_DTYPES, 2)
    _check_tensor("w_gate_up", w_gate_up, FLOAT_DTYPES, 3)
    _check_tensor("w_down", w_down, FLOAT_DTYPES, 3)
    _check_same_device(x=x, router_logits=router_logits, w_gate_up=w_gate_up, w_down=w_down)
    if priority not in PRIORITIES:
        raise ValueError(f"moe_ops: priority must be one of {PRIORITIES}, got {priority!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_ops: activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, H = x.shape
    E, two_i, h2 = w_gate_up.shape
    if h2 != H or two_i % 2:
        raise ValueError(f"moe_ops: w_gate_up must be [E, 2I, H={H}], got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (E, H, two_i // 2):
        raise ValueError(f"moe_ops: w_down must be [E={E}, H={H}, I={two_i // 2}], got {tuple(w_down.shape)}")
    if tuple(router_logits.shape) != (T, E):
        raise ValueError(f"moe_ops: router_logits must be [T={T}, E={E}], got {tuple(router_logits.shape)}")
    if not (x.dtype == w_gate_up.dtype == w_down.dtype):
        raise TypeError("moe_ops: x, w_gate_up and w_down must share a dtype")
    _check_int("k", k, 1, min(E, MAX_K))
    _check_rows("T*k", T * k)  # before anything picks a backend or allocates

    extra = {}
    if packed is not None:
        if not isinstance(packed, PackedExperts):
            raise TypeError(f"moe_ops: packed must come from moe_ops.pack_experts, got {type(packed).__name__}")
        if not packed.matches(w_gate_up, w_down):
            raise ValueError("moe_ops: packed was made from other weights, or they changed since "
                             "moe_ops.pack_experts (call it again after updating them)")
        if x.device.type == "cpu":
            extra["packed"] = packed
    fused = _backend.resolve_fused_moe(x.device.type, backend)
    if fused is not None and capacity_factor is None:  # it opens the stage ranges it runs
        return fused(x, router_logits, w_gate_up, w_down, k, activation=activation, scoring=scoring,
                     renormalize=renormalize, n_group=n_group, topk_group=topk_group,
                     correction_bias=correction_bias, scaling_factor=scaling_factor, **extra)

    # Router: validated by topk_gating, then run through the chosen backend's kernel.
    with stage("router"):
        weights, ids = topk_gating(router_logits, k, scoring=scoring, renormalize=renormalize, n_group=n_group,
                                   topk_group=topk_group, correction_bias=correction_bias,
                                   scaling_factor=scaling_factor,
                                   backend=_backend.resolved_name("topk_gating", x.device.type, backend, strict=False))
    return experts_forward(x, weights, ids, w_gate_up, w_down, activation=activation,
                           capacity_factor=capacity_factor, min_capacity=min_capacity, priority=priority,
                           backend=backend)
