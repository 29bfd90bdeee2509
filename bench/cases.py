"""What one sweep point times: inputs, the timed callables and the work each op does.

A *point* is (model shape, E, k, T, dtype, device). For it, :func:`build_point` makes fresh
seeded inputs once (weights, router logits, the routing, the permuted layout) and
:func:`op_cases` returns, per op, the moe_ops backends and the baselines to time on exactly the
same tensors, plus the op's byte and FLOP counts (formulas in docs/benchmarks.md):

====================  =====================================================================
op                    baselines (besides the ``reference`` backend)
====================  =====================================================================
topk_gating           ``hf_router`` (transformers' router math on the logits)
permute               ``hf_sort_gather`` (transformers grouped_mm path: sort + gather), ``copy``
unpermute             ``hf_combine`` (transformers: inverse-permute, weight, sum over k), ``copy``
capacity_dispatch     ``copy``
capacity_combine      ``copy``
grouped_gemm          ``torch_grouped_mm``, ``hf_mm_loop`` (transformers' per-expert mm
                      fallback), ``dense`` (one mm, same FLOPs), ``weight_read``, ``floor``
moe_forward           ``hf_eager`` / ``hf_grouped_mm`` (transformers' MixtralExperts module,
                      eager loop / default grouped_mm, behind its router math), ``kt_kernel``
                      (KTransformers' bf16 MoE behind the same router math; CPU, bf16, only
                      when kt-kernel is installed: bench/kt_peer.py), ``dense``,
                      ``weight_read``, ``floor``
====================  =====================================================================

``floor`` is derived, not timed: ``bench.report.FLOOR_DEFINITION``
(max(min(dense, dense_fp32), weight_read)), the roofline lower bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

import moe_ops

from . import kt_peer
from .shapes import ModelShape

CAPACITY_FACTOR = 1.25
OPS = ("topk_gating", "permute", "unpermute", "capacity_dispatch", "capacity_combine", "grouped_gemm",
       "moe_forward")
# Every baseline name, in the order the ratio columns use.
BASELINES = ("reference", "hf_eager", "hf_grouped_mm", "kt_kernel", "torch_grouped_mm", "hf_mm_loop", "hf_router",
             "hf_sort_gather", "hf_combine", "dense", "dense_fp32", "copy", "weight_read", "floor")


@dataclass
class Point:
    shape: ModelShape   # already scaled
    E: int
    k: int
    T: int
    dtype: torch.dtype
    device: str
    n_group: Optional[int] = None
    topk_group: Optional[int] = None

    @property
    def H(self):
        return self.shape.hidden

    @property
    def I(self):  # noqa: E743
        return self.shape.intermediate

    def weight_bytes(self) -> int:
        return 3 * self.E * self.H * self.I * _elem(self.dtype)

    def memory_estimate(self) -> int:
        """Bytes this point holds at peak (weights, activations, a few copies for baselines)."""
        e = _elem(self.dtype)
        act = self.T * self.k * max(2 * self.I, self.H) * 4 * 6
        return self.weight_bytes() + act + self.T * self.H * e * 8


@dataclass
class Case:
    impl: str
    kind: str                      # "backend" | "baseline"
    fn: Callable[[], object]
    check: Optional[Callable[[object], str]] = None   # -> "ok" / "mismatch ..."
    note: str = ""
    skip: str = ""                 # non-empty: not run, reported as "skip: <why>"
    settle_s: float = 0.0          # untimed pause after its timing (threads that spin on after a call)


@dataclass
class OpBench:
    op: str
    bytes: int = 0     # logical bytes moved (0 when the op is judged by FLOPs)
    flops: int = 0
    C: Optional[int] = None
    cases: List[Case] = field(default_factory=list)
    derived_floor: bool = False   # add the derived "floor" baseline row


def _elem(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------ routing

def hf_route(logits: torch.Tensor, shape: ModelShape, k: int, n_group, topk_group,
             bias: Optional[torch.Tensor]):
    """transformers' router math from the logits on (the router's nn.Linear is not part of any
    op): Mixtral/Qwen3/OLMoE/GPT-OSS = softmax, top-k, optional renormalise;
    DeepSeek-V3 = sigmoid, group-limited top-k on score + bias (masked groups scored 0.0 as in
    DeepseekV3TopkRouter), renormalise, scale. Returns (weights f32 [T,k], ids int64 [T,k])."""
    if shape.scoring == "softmax":
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if shape.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * shape.scaling_factor if shape.scaling_factor != 1.0 else w, ids
    scores = logits.float().sigmoid()
    choice = scores + bias if bias is not None else scores
    if n_group:
        T, E = choice.shape
        g = choice.view(T, n_group, E // n_group).topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)
        gidx = torch.topk(g, k=topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(g).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~smask.bool(), 0.0)
    ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if shape.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * shape.scaling_factor, ids


# ------------------------------------------------------------------------------------- inputs

class Inputs:
    """Fresh, seeded inputs for one point (scaled so activations stay O(1))."""

    def __init__(self, pt: Point, seed: int = 0):
        self.pt = pt
        dev, dt, T, E, H, I = pt.device, pt.dtype, pt.T, pt.E, pt.H, pt.I
        g = torch.Generator(device=dev).manual_seed(seed)
        self.x = torch.randn(T, H, device=dev, dtype=dt, generator=g)
        self.logits = torch.randn(T, E, device=dev, dtype=torch.float32, generator=g)
        self.bias = (0.1 * torch.randn(E, device=dev, generator=g)) if pt.shape.correction_bias else None
        # The weights from their own stream: equal at every T of one (shape, E, seed), so a peer that
        # copies them at load (kt-kernel, which never frees that copy) loads them once per shape.
        gw = torch.Generator(device=dev).manual_seed(seed + 7919)
        self.w_gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=gw).mul_(H ** -0.5)
        self.w_down = torch.randn(E, H, I, device=dev, dtype=dt, generator=gw).mul_(I ** -0.5)
        self.weights, ids = hf_route(self.logits, pt.shape, pt.k, pt.n_group, pt.topk_group, self.bias)
        self.ids = ids.to(torch.int32)
        # The dropless layout every downstream op consumes, from the oracle.
        p = moe_ops.permute(self.x, self.ids, E, backend="reference")
        self.x_sorted, self.sorted_slots, self.offsets, self.slot_rows = p
        counts = torch.bincount(self.ids.reshape(-1).long(), minlength=E)
        self.n_hit = int((counts > 0).sum())  # setup only: a host sync is fine here
        self.C = moe_ops.expert_capacity(T, pt.k, E, CAPACITY_FACTOR)
        self.y_sorted = torch.randn(self.x_sorted.shape, device=dev, dtype=dt, generator=g)
        self.buf_out = torch.randn(E, self.C, H, device=dev, dtype=dt, generator=g)
        d = moe_ops.capacity_dispatch(self.x, self.ids, E, self.C, backend="reference")
        self.slot_pos = d.slot_pos


# ------------------------------------------------------------------------------------- checks

_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-9}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item() or 1.0
    return (a - b).norm().item() / denom


def _close(name: str, a: torch.Tensor, b: torch.Tensor, tol: float) -> str:
    if tuple(a.shape) != tuple(b.shape):
        return f"mismatch {name} shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not a.is_floating_point():
        return "ok" if torch.equal(a.to(b.dtype), b) else f"mismatch {name} differs"
    if not bool(torch.isfinite(a).all()):
        return f"mismatch {name} non-finite"
    err = _rel_err(a, b)
    return "ok" if err <= tol else f"mismatch {name} rel_err={err:.2e}"


def _checker(ref, names, tol):
    """check(out) comparing out's fields ``names`` (indices) to the reference output."""
    def check(out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        for i, nm in names:
            r = _close(nm, outs[i], refs[i], tol)
            if r != "ok":
                return r
        return "ok"
    return check


# -------------------------------------------------------------------------------------- cases

def _copy_case(device, dtype, n_elems) -> Case:
    src = torch.randn(max(1, n_elems), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return Case("copy", "baseline", lambda: dst.copy_(src), note=f"Tensor.copy_ of {n_elems} elements")


def _weight_read_case(inp: Inputs, tensors) -> Case:
    """Read the touched experts' weights once: amax over an int32 view (pure reads, no FP work).
    The first n_hit experts stand in for the touched ones (same bytes, contiguous)."""
    n = max(inp.n_hit, 1)
    flat = [w[:n].reshape(-1) for w in tensors]
    views = [f.view(torch.int32) if f.numel() * f.element_size() % 4 == 0 else f.view(torch.uint8) for f in flat]

    def fn():
        return [torch.amax(v) for v in views]
    return Case("weight_read", "baseline", fn, note=f"amax over the {inp.n_hit} touched experts' weights")


def _quantized_weights(shape, fmt: str, device, seed: int):
    """Random ``[E, N, K]`` checkpoint tensors in ``fmt`` with weights of about ``K**-0.5``, drawn
    directly as codes (quantizing a float copy would cost several float32 copies of the experts)."""
    E, N, K = shape
    g = torch.Generator(device=device).manual_seed(seed)
    if fmt == "fp8_e4m3":  # |q| ~ 0.3..448 -> scale so that q * s ~ K**-0.5
        q = (torch.randn(E, N, K, device=device, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        return q, torch.full((E, -(-N // 128), -(-K // 128)), K ** -0.5 / 100, device=device)
    if fmt == "int8":
        q = torch.randint(-127, 128, (E, N, K), device=device, generator=g, dtype=torch.int8)
        return q, torch.full((E, N), K ** -0.5 / 73, device=device)
    blocks = torch.randint(0, 256, (E, N, K // 32, 16), device=device, generator=g, dtype=torch.uint8)
    shift = round(math.log2(K ** -0.5 / 3.0))    # e2m1 values ~3 -> K**-0.5
    return blocks, torch.full((E, N, K // 32), 127 + shift, device=device, dtype=torch.uint8)


def _quantized_gemm_cases(ob: OpBench, inp: Inputs, a, offs, tol, check: bool) -> None:
    """The grouped GEMM's rows on weight-only quantized experts (issue 17): the Triton kernel that
    dequantizes in its mainloop, ``triton_<format>``, on random checkpoint-layout weights of the
    same shape as w_gate_up; checked against the triton float grouped GEMM on the dequantized
    weights in the activation dtype (a GPU-only row: the interpreter would take minutes)."""
    E, N, K = inp.w_gate_up.shape
    for fmt in ("fp8_e4m3", "mxfp4", "int8"):
        if fmt == "mxfp4" and K % 32:
            continue
        q, sc = _quantized_weights((E, N, K), fmt, a.device, seed=17)
        ref = None
        if check:
            w = moe_ops.dequantize_experts(q, sc, fmt).to(a.dtype)
            ref = moe_ops.grouped_gemm(a, w, offs, trans_b=True, backend="triton")
            del w
        bytes_per_w = {"fp8_e4m3": 1.0, "int8": 1.0, "mxfp4": 0.5 + 1 / 32}[fmt]
        ob.cases.append(Case(f"triton_{fmt}", "backend",
                             lambda q=q, sc=sc, fmt=fmt: moe_ops.grouped_gemm(
                                 a, q, offs, trans_b=True, weight_format=fmt, b_scale=sc, backend="triton"),
                             _checker(ref, [(0, "c")], tol) if check else None,
                             note=f"{fmt} weights ({bytes_per_w:g} B each) dequantized in the Triton mainloop"))


def _quantized_layer_cases(ob: OpBench, inp: Inputs, kw, tol, check: bool) -> None:
    """moe_forward's rows on weight-only quantized experts: ``triton_<format>``, the fused Triton layer
    with both GEMMs dequantizing in their mainloop, on random checkpoint-layout weights of the
    layer's shapes; checked against the triton layer on the dequantized weights in the activation
    dtype (GPU only)."""
    E, two_i, H = inp.w_gate_up.shape
    k = inp.pt.k
    for fmt in ("fp8_e4m3", "mxfp4", "int8"):
        if fmt == "mxfp4" and (H % 32 or (two_i // 2) % 32):
            continue
        q1, s1 = _quantized_weights((E, two_i, H), fmt, inp.x.device, seed=23)
        q2, s2 = _quantized_weights((E, H, two_i // 2), fmt, inp.x.device, seed=29)
        ref = None
        if check:
            w1 = moe_ops.dequantize_experts(q1, s1, fmt).to(inp.x.dtype)
            w2 = moe_ops.dequantize_experts(q2, s2, fmt).to(inp.x.dtype)
            ref = moe_ops.moe_forward(inp.x, inp.logits, w1, w2, k, backend="triton", **kw)
            del w1, w2
        ob.cases.append(Case(f"triton_{fmt}", "backend",
                             lambda q1=q1, s1=s1, q2=q2, s2=s2, fmt=fmt: moe_ops.moe_forward(
                                 inp.x, inp.logits, q1, q2, k, weight_format=fmt, w_gate_up_scale=s1,
                                 w_down_scale=s2, backend="triton", **kw),
                             _checker(ref, [(0, "out")], max(tol, 1e-3) * 2) if check else None,
                             note=f"{fmt} experts dequantized in the fused Triton layer's GEMM mainloops"))


def _hf_experts(inp: Inputs, impl: str):
    """transformers' MixtralExperts built from a tiny config, holding the benchmark's weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    pt = inp.pt
    cfg = MixtralConfig(hidden_size=pt.H, intermediate_size=pt.I, num_local_experts=pt.E,
                        num_experts_per_tok=pt.k, hidden_act="silu")
    cfg._experts_implementation = impl
    with torch.device("meta"):
        ex = MixtralExperts(cfg)
    ex.gate_up_proj = torch.nn.Parameter(inp.w_gate_up, requires_grad=False)
    ex.down_proj = torch.nn.Parameter(inp.w_down, requires_grad=False)
    return ex


def reference_gflop(op: str, pt: Point) -> float:
    """Work the reference does for a GEMM op: one full-M matmul per expert (it selects each
    expert's rows with ``where``), i.e. E times the useful FLOPs."""
    M = pt.T * pt.k
    if op == "grouped_gemm":
        return pt.E * 2 * M * pt.H * 2 * pt.I / 1e9
    if op == "moe_forward":
        return pt.E * (2 * M * pt.H * 2 * pt.I + 2 * M * pt.I * pt.H) / 1e9
    return 0.0


def op_cases(op: str, inp: Inputs, backends: List[str], baselines, check: bool,
             reference_max_gflop: Optional[float] = None) -> OpBench:
    """The timed callables for ``op`` at ``inp``'s point: one per backend, then baselines.

    The reference's GEMMs cost E times the useful FLOPs (:func:`reference_gflop`): above
    ``reference_max_gflop`` it is not timed (a ``skip`` row) but still checks the others, up to
    10x that; beyond, nothing is checked."""
    pt = inp.pt
    ref_work = reference_gflop(op, pt)
    if reference_max_gflop is not None and ref_work > reference_max_gflop and "reference" in backends:
        check = check and ref_work <= 10 * reference_max_gflop
        ob = op_cases(op, inp, [b for b in backends if b != "reference"], baselines, check)
        why = (f"reference not timed: {ref_work:.0f} GFLOP > --reference-max-gflop {reference_max_gflop:g}"
               + ("" if check else " (nor run for checks)"))
        ob.cases.insert(0, Case("reference", "backend", None, skip=why))
        return ob
    T, E, k, H, I, dt, dev = pt.T, pt.E, pt.k, pt.H, pt.I, pt.dtype, pt.device
    e = _elem(dt)
    s = pt.shape
    want = (lambda name: name in baselines) if baselines is not None else (lambda name: True)
    ob = OpBench(op)
    tol = _TOL[dt]

    if op == "topk_gating":
        kw = dict(scoring=s.scoring, renormalize=s.renormalize, n_group=pt.n_group, topk_group=pt.topk_group,
                  correction_bias=inp.bias, scaling_factor=s.scaling_factor)
        ob.bytes = T * E * 4 + T * k * 8 + (E * 4 if inp.bias is not None else 0)
        ref = moe_ops.topk_gating(inp.logits, k, backend="reference", **kw) if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend", lambda b=b: moe_ops.topk_gating(inp.logits, k, backend=b, **kw),
                                 _checker(ref, [(1, "ids"), (0, "weights")], 1e-5) if check else None))
        if want("hf_router"):
            ob.cases.append(Case("hf_router", "baseline",
                                 lambda: hf_route(inp.logits, s, k, pt.n_group, pt.topk_group, inp.bias)))

    elif op == "permute":
        ob.bytes = 2 * T * k * H * e + T * k * 4 * 3 + (E + 1) * 4
        ref = tuple(moe_ops.permute(inp.x, inp.ids, E, backend="reference")) if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend", lambda b=b: moe_ops.permute(inp.x, inp.ids, E, backend=b),
                                 _checker(ref, [(0, "x_sorted"), (1, "sorted_slots"), (2, "expert_offsets"),
                                                (3, "slot_rows")], 0.0) if check else None))
        if want("hf_sort_gather"):
            flat = inp.ids.reshape(-1).long()

            def sort_gather():
                ids_g, perm = torch.sort(flat)
                return inp.x[perm // k], ids_g
            ob.cases.append(Case("hf_sort_gather", "baseline", sort_gather,
                                 note="torch.sort + x[perm // k] (transformers grouped_mm dispatch)"))
        if want("copy"):
            ob.cases.append(_copy_case(dev, dt, T * k * H))

    elif op == "unpermute":
        ob.bytes = (T * k * H + T * H) * e + T * k * 8
        ref = moe_ops.unpermute(inp.y_sorted, inp.slot_rows, inp.weights, backend="reference") if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend",
                                 lambda b=b: moe_ops.unpermute(inp.y_sorted, inp.slot_rows, inp.weights, backend=b),
                                 _checker(ref, [(0, "out")], tol) if check else None))
        if want("hf_combine"):
            rows = inp.slot_rows.long()
            wf = inp.weights.reshape(-1, 1)

            def combine():
                return (inp.y_sorted[rows] * wf).view(T, k, H).sum(dim=1).to(dt)
            ob.cases.append(Case("hf_combine", "baseline", combine,
                                 note="y[inv_perm] * w, view(T,k,H).sum(1) (transformers grouped_mm combine)"))
        if want("copy"):
            ob.cases.append(_copy_case(dev, dt, (T * k * H + T * H) // 2))

    elif op == "capacity_dispatch":
        C = ob.C = inp.C
        kept = min(T * k, E * C)
        ob.bytes = (kept * H + E * C * H) * e + T * k * 8 + E * 8
        ref = tuple(moe_ops.capacity_dispatch(inp.x, inp.ids, E, C, backend="reference")) if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend",
                                 lambda b=b: moe_ops.capacity_dispatch(inp.x, inp.ids, E, C, backend=b),
                                 _checker(ref, [(0, "buf"), (1, "slot_pos"), (2, "demand"), (3, "kept")], 0.0)
                                 if check else None))
        if want("copy"):
            ob.cases.append(_copy_case(dev, dt, (kept * H + E * C * H) // 2))

    elif op == "capacity_combine":
        C = ob.C = inp.C
        kept = min(T * k, E * C)
        ob.bytes = (kept * H + T * H) * e + T * k * 12
        ref = moe_ops.capacity_combine(inp.buf_out, inp.ids, inp.slot_pos, inp.weights,
                                       backend="reference") if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend",
                                 lambda b=b: moe_ops.capacity_combine(inp.buf_out, inp.ids, inp.slot_pos,
                                                                      inp.weights, backend=b),
                                 _checker(ref, [(0, "out")], tol) if check else None))
        if want("copy"):
            ob.cases.append(_copy_case(dev, dt, (kept * H + T * H) // 2))

    elif op == "grouped_gemm":
        M, N = T * k, 2 * I
        ob.flops = 2 * M * H * N
        ob.bytes = inp.n_hit * N * H * e + M * (H + N) * e
        a, b_, offs = inp.x_sorted, inp.w_gate_up, inp.offsets
        ref = moe_ops.grouped_gemm(a, b_, offs, trans_b=True, backend="reference") if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend", lambda b=b: moe_ops.grouped_gemm(a, b_, offs, trans_b=True, backend=b),
                                 _checker(ref, [(0, "c")], tol) if check else None))
        ends = offs[1:].contiguous()
        bt = b_.transpose(-2, -1)
        if want("torch_grouped_mm") and hasattr(torch, "_grouped_mm"):
            ob.cases.append(Case("torch_grouped_mm", "baseline", lambda: torch._grouped_mm(a, bt, offs=ends),
                                 _checker(ref, [(0, "c")], tol) if check else None))
        if want("hf_mm_loop"):
            try:
                import transformers.integrations.moe  # noqa: F401  (registers the op)
                loop = torch.ops.transformers.grouped_mm_fallback
                ob.cases.append(Case("hf_mm_loop", "baseline", lambda: loop(a, bt, ends),
                                     _checker(ref, [(0, "c")], tol) if check else None,
                                     note="transformers' grouped_mm_fallback: one torch.mm per expert"))
            except Exception:  # transformers missing: no such baseline
                pass
        _dense_and_read(ob, inp, want, [(M, H, N)], [inp.w_gate_up])
        if "triton" in backends and dev == "cuda" and dt in (torch.float16, torch.bfloat16):
            _quantized_gemm_cases(ob, inp, a, offs, tol, check)

    elif op == "moe_forward":
        ob.flops = 2 * T * k * H * (2 * I) + 2 * T * k * I * H
        ob.bytes = inp.n_hit * 3 * H * I * e + T * H * e * 2
        kw = dict(scoring=s.scoring, renormalize=s.renormalize, n_group=pt.n_group, topk_group=pt.topk_group,
                  correction_bias=inp.bias, scaling_factor=s.scaling_factor)
        ref = moe_ops.moe_forward(inp.x, inp.logits, inp.w_gate_up, inp.w_down, k, backend="reference",
                                  **kw) if check else None
        for b in backends:
            ob.cases.append(Case(b, "backend",
                                 lambda b=b: moe_ops.moe_forward(inp.x, inp.logits, inp.w_gate_up, inp.w_down, k,
                                                                 backend=b, **kw),
                                 _checker(ref, [(0, "out")], max(tol, 1e-3) * 2) if check else None,
                                 note=_stage_note(b, dev)))
        if dev == "cpu" and "cpu" in backends and pt.dtype != torch.float64 \
                and moe_ops.backend.native_op("fused_experts_packed") is not None:
            # The cpu backend on weights packed once at load (moe_ops.pack_experts): not timed.
            packed = moe_ops.pack_experts(inp.w_gate_up, inp.w_down)
            ob.cases.append(Case("cpu_packed", "backend",
                                 lambda: moe_ops.moe_forward(inp.x, inp.logits, inp.w_gate_up, inp.w_down, k,
                                                             backend="cpu", packed=packed, **kw),
                                 _checker(ref, [(0, "out")], max(tol, 1e-3) * 2) if check else None,
                                 note=f"fused, weights from moe_ops.pack_experts ({packed.layout})"))
        for impl, name in (("eager", "hf_eager"), ("grouped_mm", "hf_grouped_mm")):
            if not want(name):
                continue
            try:
                ex = _hf_experts(inp, impl)
            except Exception as err:  # transformers missing or API changed: report, keep going
                ob.cases.append(Case(name, "baseline", _raiser(err)))
                continue

            def hf_layer(ex=ex):
                w, ids = hf_route(inp.logits, s, k, pt.n_group, pt.topk_group, inp.bias)
                return ex(inp.x, ids, w)
            ob.cases.append(Case(name, "baseline", hf_layer,
                                 _checker(ref, [(0, "out")], max(tol, 1e-3) * 2) if check else None,
                                 note=f"transformers MixtralExperts, experts_implementation={impl!r}"))
        if want("kt_kernel") and dev == "cpu" and dt == torch.bfloat16 and kt_peer.available():
            try:
                kt = kt_peer.shared(inp.w_gate_up, inp.w_down, k, max_tokens=max(T, kt_peer.SHARED_MAX_TOKENS))
            except Exception as err:  # its API changed or it refuses the shape: report, keep going
                ob.cases.append(Case("kt_kernel", "baseline", _raiser(err)))
            else:
                def kt_layer(kt=kt):
                    w, ids = hf_route(inp.logits, s, k, pt.n_group, pt.topk_group, inp.bias)
                    return kt(inp.x, ids, w)
                ob.cases.append(Case("kt_kernel", "baseline", kt_layer,
                                     _checker(ref, [(0, "out")], max(tol, 1e-3) * 2) if check else None,
                                     note=f"kt-kernel {kt_peer.variant()} {kt.kernel}, {kt.threads} threads",
                                     settle_s=kt_peer.SETTLE_S))
        _dense_and_read(ob, inp, want, [(T * k, H, 2 * I), (T * k, I, H)], [inp.w_gate_up, inp.w_down])
        if "triton" in backends and dev == "cuda" and dt in (torch.float16, torch.bfloat16):
            _quantized_layer_cases(ob, inp, kw, tol, check)
    else:
        raise ValueError(f"unknown op {op!r}")
    return ob


def _dense_and_read(ob: OpBench, inp: Inputs, want, mms, weights):
    """``dense``: the same FLOPs as plain mm(s) against one weight; ``weight_read``; ``floor``."""
    pt = inp.pt
    if want("dense"):
        mats = [(torch.randn(m, kk, device=pt.device, dtype=pt.dtype), torch.randn(kk, n, device=pt.device,
                 dtype=pt.dtype)) for m, kk, n in mms]

        def dense():
            return [a @ b for a, b in mats]
        ob.cases.append(Case("dense", "baseline", dense,
                             note=" + ".join(f"[{m}x{kk}]@[{kk}x{n}]" for m, kk, n in mms)))
    if want("dense_fp32") and pt.device == "cpu" and pt.dtype in (torch.bfloat16, torch.float16):
        # The same FLOPs in float32 (MKL sgemm): a CPU without native bf16/fp16 GEMM runs a
        # low-precision mm on a slow path, so this is its real compute ceiling.
        mats32 = [(torch.randn(m, kk), torch.randn(kk, n)) for m, kk, n in mms]
        ob.cases.append(Case("dense_fp32", "baseline", lambda: [a @ b for a, b in mats32],
                             note="float32: " + " + ".join(f"[{m}x{kk}]@[{kk}x{n}]" for m, kk, n in mms)))
    if want("weight_read"):
        ob.cases.append(_weight_read_case(inp, weights))
    ob.derived_floor = want("floor")


def _raiser(err):
    def fn():
        raise err
    return fn


def _stage_note(b: str, device: str) -> str:
    """Which backend each stage of moe_forward resolves to (a backend may lack some ops)."""
    from moe_ops import backend as _bk
    try:
        if _bk.resolve_fused_moe(device, b) is not None:
            return "fused"
        names = []
        for op in ("topk_gating", "permute", "grouped_gemm", "unpermute"):
            r = _bk.resolved_name(op, device, b, strict=False)
            if r != b:
                names.append(f"{op}={r}")
        return ("stages: " + ",".join(names)) if names else ""
    except Exception as err:  # never let a note break a run
        return f"stage lookup failed: {err}"
