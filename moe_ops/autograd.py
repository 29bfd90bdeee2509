"""Autograd formulas for every differentiable moe_ops op, registered per op namespace.

``torch.library.register_autograd`` attaches a backward to ``<ns>::<op>`` for each namespace
that defines the schemas (``moe_ops``, ``moe_ops_sim``, ``moe_ops_triton``). Backwards are built
from the package's own ops, run by the *same* namespace where it has a kernel for the device
(else the automatic backend), so a backend's training step uses its own kernels:

===================  ========================================================================
op                   gradient
===================  ========================================================================
topk_gating          d logits: softmax/sigmoid backward through gather + renormalisation
                     (plain torch on [T, E]); ids and correction_bias get none
permute              dx = unpermute(dx_sorted, slot_rows, None)
unpermute            dy_sorted[row(s)] = w[s] * dout[t(s)] (row scatter); dw[s] = <dout, y[row(s)]>
capacity_dispatch    dx = capacity_combine(dbuf, ids, slot_pos, None)
capacity_combine     dbuf[e, pos(s)] = w[s] * dout[t(s)]; dw[s] = <dout, buf[e, pos(s)]>
grouped_gemm         da = grouped_gemm(dc, b, trans_b=not trans_b); db = grouped_gemm_wgrad
grouped_gemm_wgrad   da = grouped_gemm(dc, ddb, trans_b=True); ddc = grouped_gemm(a, ddb)
fused_experts        (CPU extension op) recompute permute/GEMM/act with the unfused ops, then
                     chain the formulas above (activation backward in plain torch)
fused_moe            (Triton extension op, whole layer) re-route with topk_gating, the
                     fused_experts backward, then the router's d logits
===================  ========================================================================

Integer outputs (ids, offsets, slot maps) are non-differentiable. Row scatters write each kept
slot's row exactly once (rows are unique per slot by construction) and send every dropped slot
to a dump row that is cut off, so they are deterministic without atomics. Accumulation is float32
(float64 stays float64 so ``torch.autograd.gradcheck`` can run).

The reference backend is plain PyTorch and differentiates by itself; it is the oracle that the
tests compare these formulas against.
"""
from __future__ import annotations

from typing import Dict, Optional, Set

import torch

from . import _fake
from . import backend as _backend

Tensor = torch.Tensor
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_LIBS: Dict[str, torch.library.Library] = {}
_DONE: Set[str] = set()


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _op_exists(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def same_backend_op(ns: str, name: str, device_type: str):
    """``torch.ops.<ns>.<name>`` when namespace ``ns`` has a kernel for ``device_type``; else the
    automatic backend's implementation (same positional schema signature)."""
    q = f"{ns}::{name}"
    keys = (_DEVICE_KEYS.get(device_type, "CPU"), "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    if _op_exists(q) and any(torch._C._dispatch_has_kernel_for_dispatch_key(q, k) for k in keys):
        return getattr(getattr(torch.ops, ns), name).default
    return _backend.resolve(name, device_type, None, strict=False)


# ------------------------------------------------------------------------------- shared pieces

def _slot_grads(dout: Tensor, weights: Optional[Tensor], k: int) -> Tensor:
    """Per-slot gradient rows ``w[s] * dout[s // k]`` ``[T*k, H]`` in the accumulation dtype."""
    T, H = dout.shape
    g = dout.to(_acc(dout)).unsqueeze(1).expand(T, k, H).reshape(T * k, H)
    if weights is not None:
        g = g * weights.reshape(T * k, 1).to(g.dtype)
    return g


def _scatter_rows(g: Tensor, rows: Tensor, valid: Tensor, n_rows: int) -> Tensor:
    """``out[rows[s]] = g[s]`` for valid slots, zero elsewhere: ``[n_rows, H]``. Invalid slots
    land in a dump row ``n_rows`` that is sliced off."""
    dest = torch.where(valid, rows, torch.full_like(rows, n_rows))
    out = g.new_zeros((n_rows + 1, g.shape[1]))
    return out.index_copy(0, dest, g)[:n_rows]


def _weight_grads(src: Tensor, rows: Tensor, valid: Tensor, dout: Tensor, k: int) -> Tensor:
    """``dw[t, j] = <dout[t], src[rows[t*k+j]]>`` (0 for invalid slots): ``[T, k]`` accumulation dtype."""
    T, H = dout.shape
    acc = _acc(dout)
    table = torch.cat([src.to(acc), src.new_zeros((1, src.shape[1]), dtype=acc)])
    idx = torch.where(valid, rows, torch.full_like(rows, src.shape[0]))
    picked = table.index_select(0, idx).reshape(T, k, H)
    return (picked * dout.to(acc).unsqueeze(1)).sum(-1)


# --------------------------------------------------------------------------------------- router

def _gating_setup(ctx, inputs, output):
    logits, k, scoring, renormalize, n_group, topk_group, bias, scaling = inputs
    ctx.scoring, ctx.renormalize, ctx.scaling = scoring, renormalize, scaling
    ctx.save_for_backward(logits, output[1])


def gating_logits_grad(logits: Tensor, ids: Tensor, dw: Tensor, scoring: str, renormalize: bool,
                       scaling: float) -> Tensor:
    """d logits of ``weights = scaling * renorm(scores(logits)[ids])`` given d weights."""
    x = logits.to(_acc(logits))
    scores = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    idx = ids.long()
    g = dw.to(x.dtype) * scaling
    if renormalize:
        raw = scores.gather(1, idx)
        s = raw.sum(-1, keepdim=True) + 1e-20
        g = g / s - (g * raw).sum(-1, keepdim=True) / (s * s)
    dscores = torch.zeros_like(scores).scatter(1, idx, g)  # ids are distinct per row
    if scoring == "softmax":
        dx = scores * (dscores - (dscores * scores).sum(-1, keepdim=True))
    else:
        dx = dscores * scores * (1 - scores)
    return dx.to(logits.dtype)


def _gating_backward(ctx, dw, dids):
    logits, ids = ctx.saved_tensors
    dlogits = None
    if dw is not None and ctx.needs_input_grad[0]:
        dlogits = gating_logits_grad(logits, ids, dw, ctx.scoring, ctx.renormalize, ctx.scaling)
    return dlogits, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------- dispatch

def _permute_setup(ctx, inputs, output):
    x, ids, num_experts, block_m = inputs
    ctx.k = ids.shape[1]
    ctx.save_for_backward(output[3])


def _make_permute_backward(ns):
    def backward(ctx, dx_sorted, d_slots, d_offs, d_rows):
        (slot_rows,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dx_sorted is not None:
            unpermute = same_backend_op(ns, "unpermute", dx_sorted.device.type)
            dx = unpermute(dx_sorted.contiguous(), slot_rows, None, ctx.k)
        return dx, None, None, None
    return backward


def _unpermute_setup(ctx, inputs, output):
    y_sorted, slot_rows, weights, k = inputs
    ctx.k = k
    ctx.y_dtype = y_sorted.dtype
    ctx.has_weights = weights is not None
    ctx.save_for_backward(y_sorted, slot_rows, weights)


def _unpermute_backward(ctx, dout):
    y_sorted, slot_rows, weights = ctx.saved_tensors
    k, P = ctx.k, y_sorted.shape[0]
    rows = slot_rows.reshape(-1).long()
    valid = (rows >= 0) & (rows < P)
    dy = dw = None
    if ctx.needs_input_grad[0]:
        dy = _scatter_rows(_slot_grads(dout, weights, k), rows, valid, P).to(ctx.y_dtype)
    if ctx.has_weights and ctx.needs_input_grad[2]:
        dw = _weight_grads(y_sorted, rows, valid, dout, k).to(weights.dtype)
    return dy, None, dw, None


def _dispatch_setup(ctx, inputs, output):
    x, ids, num_experts, capacity, priority = inputs
    ctx.save_for_backward(ids, output[1])


def _make_dispatch_backward(ns):
    def backward(ctx, dbuf, d_pos, d_demand, d_kept):
        ids, slot_pos = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0] and dbuf is not None:
            combine = same_backend_op(ns, "capacity_combine", dbuf.device.type)
            dx = combine(dbuf.contiguous(), ids, slot_pos, None)
        return dx, None, None, None, None
    return backward


def _combine_setup(ctx, inputs, output):
    buf_out, ids, slot_pos, weights = inputs
    ctx.buf_dtype = buf_out.dtype
    ctx.has_weights = weights is not None
    ctx.save_for_backward(buf_out, ids, slot_pos, weights)


def _combine_backward(ctx, dout):
    buf_out, ids, slot_pos, weights = ctx.saved_tensors
    E, C, H = buf_out.shape
    k = ids.shape[1]
    e, pos = ids.reshape(-1).long(), slot_pos.reshape(-1).long()
    valid = (pos >= 0) & (pos < C) & (e >= 0) & (e < E)
    rows = e * C + pos
    dbuf = dw = None
    if ctx.needs_input_grad[0]:
        dbuf = _scatter_rows(_slot_grads(dout, weights, k), rows, valid, E * C)
        dbuf = dbuf.reshape(E, C, H).to(ctx.buf_dtype)
    if ctx.has_weights and ctx.needs_input_grad[3]:
        dw = _weight_grads(buf_out.reshape(E * C, H), rows, valid, dout, k).to(weights.dtype)
    return dbuf, None, None, dw


# -------------------------------------------------------------------------------------- experts

def _gemm_setup(ctx, inputs, output):
    a, b, offsets, trans_b = inputs
    ctx.trans_b = trans_b
    ctx.save_for_backward(a, b, offsets)


def _make_gemm_backward(ns):
    def backward(ctx, dc):
        a, b, offsets = ctx.saved_tensors
        dev = dc.device.type
        gemm = same_backend_op(ns, "grouped_gemm", dev)
        wgrad = same_backend_op(ns, "grouped_gemm_wgrad", dev)
        dc = dc.contiguous().to(a.dtype)
        E = b.shape[0]
        da = db = None
        if ctx.needs_input_grad[0]:
            da = gemm(dc, b, offsets, not ctx.trans_b)       # dc @ b[e]^T  (or dc @ b[e] for trans_b)
        if ctx.needs_input_grad[1]:
            db = wgrad(dc, a, offsets, E) if ctx.trans_b else wgrad(a, dc, offsets, E)
        return da, db, None, None
    return backward


def _wgrad_setup(ctx, inputs, output):
    a, dc, offsets, num_experts = inputs
    ctx.save_for_backward(a, dc, offsets)


def _make_wgrad_backward(ns):
    def backward(ctx, ddb):
        a, dc, offsets = ctx.saved_tensors
        gemm = same_backend_op(ns, "grouped_gemm", ddb.device.type)
        ddb = ddb.contiguous().to(a.dtype)
        da = ddc = None
        if ctx.needs_input_grad[0]:
            da = gemm(dc, ddb, offsets, True)    # da[rows e] = dc[rows e] @ ddb[e]^T
        if ctx.needs_input_grad[1]:
            ddc = gemm(a, ddb, offsets, False)   # ddc[rows e] = a[rows e] @ ddb[e]
        return da, ddc, None, None
    return backward


def _fused_setup(ctx, inputs, output):
    x, ids, weights, w_gate_up, w_down, activation = inputs
    ctx.activation = activation
    ctx.has_weights = weights is not None
    ctx.save_for_backward(x, ids, weights, w_gate_up, w_down)


def _gated_act_and_grad(h: Tensor, activation: str):
    """``(act(gate)*up, d/dgate act(gate), act(gate), up)`` in the accumulation dtype."""
    g, u = h.to(_acc(h)).chunk(2, dim=-1)
    if activation == "swiglu":
        s = torch.sigmoid(g)
        act, dact = g * s, s * (1 + g * (1 - s))
    else:  # exact (erf) GELU, as torch.nn.functional.gelu
        act = torch.nn.functional.gelu(g)
        dact = 0.5 * (1 + torch.erf(g * 0.7071067811865476)) + g * torch.exp(-0.5 * g * g) * 0.3989422804014327
    return act * u, dact, act, u


def experts_backward(ns, dout, x, ids, weights, w_gate_up, w_down, activation, needs):
    """Gradients ``(dx, dweights, dw_gate_up, dw_down)`` of the dropless expert half
    ``unpermute(gemm(act(gemm(permute(x), w_gate_up)), w_down), weights)``: the intermediates
    are recomputed with namespace ``ns``'s unfused ops, then the per-op formulas are chained.
    ``needs`` = which of the four are wanted."""
    dev = x.device.type

    def op(name):
        return same_backend_op(ns, name, dev)
    E, k = w_gate_up.shape[0], ids.shape[1]
    xs, _, offsets, slot_rows = op("permute")(x, ids, E, 1)
    h = op("grouped_gemm")(xs, w_gate_up, offsets, True)
    a, dact, act, up = _gated_act_and_grad(h, activation)
    a = a.to(x.dtype)
    rows = slot_rows.reshape(-1).long()
    valid = (rows >= 0) & (rows < xs.shape[0])
    dy = _scatter_rows(_slot_grads(dout, weights, k), rows, valid, xs.shape[0]).to(x.dtype)
    dx = dw = dwgu = dwd = None
    if weights is not None and needs[1]:
        y = op("grouped_gemm")(a, w_down, offsets, True)
        dw = _weight_grads(y, rows, valid, dout, k).to(weights.dtype)
    if needs[3]:
        dwd = op("grouped_gemm_wgrad")(dy, a, offsets, E)
    if needs[0] or needs[2]:
        da = op("grouped_gemm")(dy, w_down, offsets, False).to(act.dtype)
        dh = torch.cat([da * up * dact, da * act], dim=-1).to(x.dtype)
        if needs[2]:
            dwgu = op("grouped_gemm_wgrad")(dh, xs, offsets, E)
        if needs[0]:
            dx = op("unpermute")(op("grouped_gemm")(dh, w_gate_up, offsets, False), slot_rows, None, k)
    return dx, dw, dwgu, dwd


def _make_fused_backward(ns):
    """fused_experts(x, ids, weights?, w_gate_up, w_down, activation)."""
    def backward(ctx, dout):
        x, ids, weights, w_gate_up, w_down = ctx.saved_tensors
        n = ctx.needs_input_grad
        dx, dw, dwgu, dwd = experts_backward(ns, dout, x, ids, weights, w_gate_up, w_down, ctx.activation,
                                             (n[0], n[2] and ctx.has_weights, n[3], n[4]))
        return dx, None, dw, dwgu, dwd, None
    return backward


def _fused_moe_setup(ctx, inputs, output):
    (x, logits, w_gate_up, w_down, k, activation, scoring, renormalize, n_group, topk_group, bias,
     scaling) = inputs
    ctx.args = (k, activation, scoring, renormalize, n_group, topk_group, scaling)
    ctx.save_for_backward(x, logits, w_gate_up, w_down, bias)


def _make_fused_moe_backward(ns):
    """fused_moe(x, router_logits, w_gate_up, w_down, k, activation, scoring, ...): the whole
    dropless layer. Re-route with the namespace's topk_gating, chain the experts backward, then
    the router weights' gradient into the logits."""
    def backward(ctx, dout):
        x, logits, w_gate_up, w_down, bias = ctx.saved_tensors
        k, activation, scoring, renormalize, n_group, topk_group, scaling = ctx.args
        n = ctx.needs_input_grad
        gating = same_backend_op(ns, "topk_gating", x.device.type)
        weights, ids = gating(logits, k, scoring, renormalize, n_group, topk_group, bias, scaling)
        dx, dw, dwgu, dwd = experts_backward(ns, dout, x, ids, weights, w_gate_up, w_down, activation,
                                             (n[0], n[1], n[2], n[3]))
        dlogits = gating_logits_grad(logits, ids, dw, scoring, renormalize, scaling) if n[1] else None
        return (dx, dlogits, dwgu, dwd) + (None,) * 8
    return backward


def formulas(ns: str):
    """``{op: (backward, setup_context)}`` for namespace ``ns``."""
    return {
        "topk_gating": (_gating_backward, _gating_setup),
        "permute": (_make_permute_backward(ns), _permute_setup),
        "unpermute": (_unpermute_backward, _unpermute_setup),
        "capacity_dispatch": (_make_dispatch_backward(ns), _dispatch_setup),
        "capacity_combine": (_combine_backward, _combine_setup),
        "grouped_gemm": (_make_gemm_backward(ns), _gemm_setup),
        "grouped_gemm_wgrad": (_make_wgrad_backward(ns), _wgrad_setup),
        "fused_experts": (_make_fused_backward(ns), _fused_setup),
        "fused_moe": (_make_fused_moe_backward(ns), _fused_moe_setup),
    }


def _has_autograd(qualname: str) -> bool:
    from torch._library import custom_ops
    opdef = custom_ops.OPDEFS.get(qualname)
    if opdef is not None:
        return getattr(opdef, "_backward_fn", None) is not None
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def register_for_namespace(ns: str) -> None:
    """Register the autograd formula of every op namespace ``ns`` defines (and, first, their
    fakes: see :func:`moe_ops._fake.register_for_namespace`). Idempotent; an op that already
    has an autograd formula keeps it."""
    _fake.register_for_namespace(ns)
    if ns in _DONE:
        return
    from torch._library import custom_ops
    defined = set(_fake.op_names(ns))
    for name, (bwd, setup) in formulas(ns).items():
        q = f"{ns}::{name}"
        if name not in defined or _has_autograd(q):
            continue
        if q in custom_ops.OPDEFS:
            custom_ops.OPDEFS[q].register_autograd(bwd, setup_context=setup)
            continue
        lib = _LIBS.setdefault(ns, torch.library.Library(ns, "FRAGMENT"))
        torch.library.register_autograd(q, bwd, setup_context=setup, lib=lib)
    _DONE.add(ns)


def register_all() -> None:
    """Register fakes and autograd for every moe_ops op namespace that exists now."""
    for ns in ("moe_ops", "moe_ops_sim", "moe_ops_triton"):
        if _fake.op_names(ns):
            register_for_namespace(ns)
