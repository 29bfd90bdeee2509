"""moe_ops for Hugging Face transformers 5.x MoE models.

Three levels, each optional:

1. **Experts implementation** ``"moe_ops"`` registered in
   ``transformers.integrations.moe.ExpertsInterface`` on import, so
   ``from_pretrained(..., experts_implementation="moe_ops")`` and
   ``model.set_experts_implementation("moe_ops")`` work for every class decorated with
   ``@use_experts_implementation``. Dataflow: permute (group slots by expert; EP sentinel ids
   ``>= num_experts`` are dropped) -> grouped GEMM (+ per-row expert bias) -> the module's own
   ``_apply_gate`` (so GPT-OSS's interleaved, clamped ``gate*sigmoid(1.702*gate)*(up+1)`` is
   honoured) or ``act_fn`` -> grouped GEMM (+ bias) -> optional post-expert norm -> unpermute
   with the router weights (float32 accumulation). The layout flags (``is_transposed``,
   ``has_bias``, ``has_gate``, ``has_post_expert_norm``) pick ``trans_b`` and the extras.
2. **Fused routers** for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (group-limited,
   bias for selection only) and GPT-OSS: the module's class is swapped for a subclass whose
   forward is ``linear -> moe_ops.topk_gating``; parameters, buffers and the returned
   ``(router_logits, weights, ids)`` are unchanged, so checkpoints load, ``router_logits`` is
   still recorded and the auxiliary loss still works.
3. **Sparse Llama4 MoE block**: the stock ``Llama4TextMoe`` runs every expert on every token;
   the replacement routes each token only to its top-k experts (same math: Llama4 scales the
   expert *input* by ``sigmoid(logit)``).

:func:`apply_moe_ops` does all three to a built model in place.

Quantized models (FP8 ``FP8Experts`` / ``FP8Linear``, GPT-OSS MXFP4 experts kept packed):
:mod:`moe_ops.integrations.transformers_quant`, whose public names are re-exported here;
``"moe_ops"`` is registered in transformers' FP8 experts registry as well.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from .. import ops
from .._profiling import stage
from . import transformers_quant as _quant
from .transformers_quant import _row_experts
from .transformers_quant import PackedMxfp4Experts, quantize_experts_, use_mxfp4_experts  # noqa: F401 (public)

EXPERTS_IMPLEMENTATION = "moe_ops"


# ------------------------------------------------------------------------------------ experts

def moe_ops_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ExpertsInterface`` implementation: ``hidden_states[T, H]``, ``top_k_index[T, k]``,
    ``top_k_weights[T, k]`` -> ``[T, H]`` in hidden_states' dtype."""
    E = self.num_experts
    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)
    w1 = self.gate_up_proj if has_gate else self.up_proj
    b1 = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
    w2, b2 = self.down_proj, (self.down_proj_bias if has_bias else None)

    x = hidden_states.to(w1.dtype)  # autocast may hand fp32 activations to bf16 experts
    if _cpu_fused_ok(self, x, w1, w2, has_gate, transposed, has_bias, top_k_weights):
        # The CPU backend's fused expert op (one pass: gather -> GEMM1 + SwiGLU -> GEMM2 ->
        # combine), on packed weights when apply_moe_ops(..., pack_cpu=True) asked for them;
        # its three stage ranges nest around it, as in moe_forward's fused path.
        with stage("dispatch"), stage("experts"), stage("combine"):
            out = cpu_fused_experts(self, x, top_k_index, top_k_weights, w1, w2)
        return out.to(hidden_states.dtype)
    # Sentinel ids >= E (expert parallelism) are dropped by permute, never computed.
    with stage("dispatch"):
        x_sorted, _, offsets, slot_rows = ops.permute(x, top_k_index, E, allow_invalid_ids=True)
        row_e = _row_experts(offsets, x_sorted.shape[0]) if has_bias else None

    with stage("experts"):
        h = ops.grouped_gemm(x_sorted, w1, offsets, trans_b=not transposed)
        if b1 is not None:
            h = h + b1[row_e].to(h.dtype)
        h = self._apply_gate(h) if has_gate else self.act_fn(h)
        y = ops.grouped_gemm(h.to(w2.dtype), w2, offsets, trans_b=not transposed)
        if b2 is not None:
            y = y + b2[row_e].to(y.dtype)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
    with stage("combine"):
        out = ops.unpermute(y, slot_rows, top_k_weights)
    return out.to(hidden_states.dtype)


def _cpu_fused_ok(self, x, w1, w2, has_gate, transposed, has_bias, top_k_weights) -> bool:
    """Whether this call can take the CPU fused path: CPU tensors in a kernel dtype, no gradient
    needed, the plain layout (gate_up [E, 2I, H], no bias, no post-expert norm) and the default
    gate ``silu(gate) * up`` (GPT-OSS's clamped gate and other custom gates take the op-by-op
    path, which calls the module's own ``_apply_gate``)."""
    if x.device.type != "cpu" or not has_gate or transposed or has_bias or x.dtype == torch.float64:
        return False
    if getattr(self, "has_post_expert_norm", False) or _backend.native_op("fused_experts") is None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, top_k_weights)):
        return False
    if w1.dtype != x.dtype or w2.dtype != x.dtype or w1.dim() != 3 or w1.shape[1] != 2 * w2.shape[2]:
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return False
    act = getattr(self, "act_fn", None)
    return getattr(type(self), "_apply_gate", None) is _default_apply_gate and (
        isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")


def cpu_fused_experts(self, x, top_k_index, top_k_weights, w1, w2) -> torch.Tensor:
    """``moe_ops::fused_experts`` (or ``fused_experts_packed`` on the module's packed weights)."""
    ids = top_k_index.to(torch.int32)
    packed = _cpu_packing(self, w1, w2)
    if packed is not None:
        return _backend.native_op("fused_experts_packed")(x, ids, top_k_weights, packed.w_gate_up, packed.w_down,
                                                          "swiglu")
    return _backend.native_op("fused_experts")(x, ids, top_k_weights, w1, w2, "swiglu")


def _cpu_packing(self, w1, w2):
    """The module's packed weights (re-packed when the weights changed), if it asked for them."""
    if not getattr(self, "_moe_ops_pack_cpu", False) or _backend.native_op("fused_experts_packed") is None:
        return None
    self._moe_ops_packed = ops.repack_if_stale(getattr(self, "_moe_ops_packed", None), w1, w2)
    return self._moe_ops_packed


def register_experts_implementation(name: str = EXPERTS_IMPLEMENTATION) -> None:
    """Register :func:`moe_ops_experts_forward` in transformers' ``ExpertsInterface`` and
    :func:`moe_ops_fp8_experts_forward` in its FP8 experts registry ``ALL_FP8_EXPERTS_FUNCTIONS``
    (both global; the FP8 one where transformers has it)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(name, moe_ops_experts_forward)
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    except ImportError:  # a transformers without FP8 experts
        return
    type(ALL_FP8_EXPERTS_FUNCTIONS).register(name, moe_ops_fp8_experts_forward)


def moe_ops_fp8_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ALL_FP8_EXPERTS_FUNCTIONS["moe_ops"]``: transformers' ``FP8Experts`` with fp8 weights on
    :func:`~moe_ops.integrations.transformers_quant.fp8_experts_forward` (the stored tensors);
    ones holding float weights (dequantized at load) on :func:`moe_ops_experts_forward`."""
    w1 = self.gate_up_proj if getattr(self, "has_gate", True) else self.up_proj
    if w1.element_size() > 1:
        return moe_ops_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _quant.fp8_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def from_pretrained_fp8(path, *, model_class=None, **kwargs) -> nn.Module:
    """Load a pre-quantized FP8 checkpoint (DeepSeek-V3/R1, Qwen3-FP8: ``float8_e4m3fn`` weights +
    ``weight_scale_inv``) keeping it FP8 on any machine, CPU included, and apply
    :func:`apply_moe_ops`. transformers' own loader builds the FP8 modules (``FP8Linear``,
    ``FP8Experts``) and merges the per-expert tensors; only its environment check, which would
    dequantize to bf16 without a recent GPU, is skipped
    (:func:`~moe_ops.integrations.transformers_quant.fp8_kept_as_stored`). ``model_class``
    defaults to ``AutoModelForCausalLM``; ``kwargs`` go to ``from_pretrained``."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kwargs.setdefault("experts_implementation", EXPERTS_IMPLEMENTATION)
    with _quant.fp8_kept_as_stored():
        model = model_class.from_pretrained(path, **kwargs)
    return apply_moe_ops(model)


def from_pretrained_mxfp4(path, *, model_class=None, **kwargs) -> nn.Module:
    """A GPT-OSS MXFP4 checkpoint with its experts kept packed
    (:func:`~moe_ops.integrations.transformers_quant.load_mxfp4`), :func:`apply_moe_ops` applied."""
    return apply_moe_ops(_quant.load_mxfp4(path, model_class=model_class, **kwargs))


# ------------------------------------------------------------------------------------ routers

def _ids(ids: torch.Tensor) -> torch.Tensor:
    return ids.long()  # transformers' eager experts one_hot the ids: keep their int64 contract


def _router_stage(forward):
    """A patched router forward inside the ``moe_ops.router`` range (docs/profiling.md)."""
    @functools.wraps(forward)
    def routed(self, hidden_states):
        with stage("router"):
            return forward(self, hidden_states)
    return routed


@_router_stage
def _softmax_router_forward(self, hidden_states):
    """Mixtral (always renormalised, float32 weights), Qwen2/3-MoE and OLMoE (``norm_topk_prob``,
    weights in the logits' dtype)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    renorm = getattr(self, "norm_topk_prob", True)
    weights, ids = ops.topk_gating(router_logits, self.top_k, scoring="softmax", renormalize=renorm)
    if hasattr(self, "norm_topk_prob"):  # Qwen/OLMoE cast to the logits' dtype; Mixtral keeps fp32
        weights = weights.to(router_logits.dtype)
    return router_logits, weights, _ids(ids)


@_router_stage
def _deepseek_v3_router_forward(self, hidden_states):
    """DeepSeek-V3: float32 router, sigmoid scores, selection on score + e_score_correction_bias
    within the best ``topk_group`` of ``n_group`` groups, unbiased weights renormalised and
    scaled by ``routed_scaling_factor``."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    n_group = self.num_group if self.num_group and self.num_group > 1 else None
    weights, ids = ops.topk_gating(router_logits, self.top_k, scoring="sigmoid", renormalize=self.norm_topk_prob,
                                   n_group=n_group, topk_group=self.topk_group if n_group else None,
                                   correction_bias=self.e_score_correction_bias,
                                   scaling_factor=float(self.routed_scaling_factor))
    return router_logits, weights, _ids(ids)


@_router_stage
def _gpt_oss_router_forward(self, hidden_states):
    """GPT-OSS: top-k of the (biased) logits, softmax over the k chosen = renormalised softmax."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    weights, ids = ops.topk_gating(router_logits, self.top_k, scoring="softmax", renormalize=True)
    return router_logits, weights.to(router_logits.dtype), _ids(ids)


@_router_stage
def _llama4_router_forward(self, hidden_states):
    """Llama4 router for the sparse block: ``(weights[T, k], router_logits, ids[T, k])`` --
    router_logits stays at index 1, where transformers records it. Selection on the logits
    (like ``torch.topk``), weights ``sigmoid(logit)`` of the chosen experts."""
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    _, ids = ops.topk_gating(router_logits, self.top_k, scoring="softmax")
    weights = torch.sigmoid(router_logits.float().gather(1, ids.long())).to(router_logits.dtype)
    return weights, router_logits, ids


def _llama4_moe_forward(self, hidden_states):
    """Sparse Llama4 MoE: each token visits only its top-k experts; the expert input is scaled
    by the router weight (Llama4's order), the expert outputs are summed, plus the shared expert."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    weights, router_logits, ids = self.router(hidden_states)
    T, k = ids.shape
    ex = self.experts
    x_sorted, sorted_slots, offsets, slot_rows = ops.permute(hidden_states, ids, self.num_experts)
    w_flat = torch.cat([weights.reshape(-1), weights.new_zeros(1)])
    row_w = w_flat[torch.where(sorted_slots >= 0, sorted_slots.long(), torch.full_like(sorted_slots, T * k).long())]
    x_sorted = x_sorted * row_w.unsqueeze(1).to(x_sorted.dtype)
    h = ops.grouped_gemm(x_sorted.to(ex.gate_up_proj.dtype), ex.gate_up_proj, offsets, trans_b=False)
    gate, up = h.chunk(2, dim=-1)
    y = ops.grouped_gemm(up * ex.act_fn(gate), ex.down_proj, offsets, trans_b=False)
    routed = ops.unpermute(y, slot_rows, None, k=k)
    out = self.shared_expert(hidden_states)
    out = out + routed.to(out.dtype)
    return out, router_logits


# class name -> replacement forward. Matched by exact class name so subclasses in other model
# families (which may change semantics) are not patched by accident.
ROUTER_FORWARDS: Dict[str, Callable] = {
    "MixtralTopKRouter": _softmax_router_forward,
    "Qwen2MoeTopKRouter": _softmax_router_forward,
    "Qwen3MoeTopKRouter": _softmax_router_forward,
    "OlmoeTopKRouter": _softmax_router_forward,
    "DeepseekV3TopkRouter": _deepseek_v3_router_forward,
    "GptOssTopKRouter": _gpt_oss_router_forward,
}
# quantized layers that need a forward without transformers' hub kernels (on CPU)
QUANT_LAYER_FORWARDS: Dict[str, Callable] = {"FP8Linear": _quant.fp8_linear_forward}
BLOCK_FORWARDS: Dict[str, Dict[str, Callable]] = {
    # block class name -> {attribute: forward}: the block and the submodules it needs patched.
    "Llama4TextMoe": {"": _llama4_moe_forward, "router": _llama4_router_forward},
}
_SUBCLASSES: Dict[tuple, type] = {}


def _patch_class(module: nn.Module, forward: Callable) -> None:
    """Swap ``module``'s class for a cached subclass with ``forward`` (isinstance, parameter
    names, hooks and state_dict stay as they were)."""
    cls = type(module)
    if getattr(cls, "_moe_ops_patched", False):
        return
    key = (cls, forward)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        sub = type(f"MoeOps{cls.__name__}", (cls,), {"forward": forward, "_moe_ops_patched": True,
                                                     "__module__": cls.__module__})
        _SUBCLASSES[key] = sub
    module.__class__ = sub


def _unpatch(module: nn.Module) -> None:
    cls = type(module)
    if getattr(cls, "_moe_ops_patched", False):
        module.__class__ = cls.__mro__[1]


def apply_moe_ops(model: nn.Module, *, experts: bool = True, routers: bool = True,
                  sparse_blocks: bool = True, pack_cpu: bool = False) -> nn.Module:
    """Patch a built transformers model in place to run on moe_ops; returns it.

    * ``experts``: ``model.set_experts_implementation("moe_ops")`` where the model supports it
      (on CPU, inference calls with the default SiLU gate run the fused ``fused_experts`` op);
    * ``pack_cpu``: keep :func:`moe_ops.pack_experts` copies of CPU expert weights for the
      panel GEMM (packed on first use, re-packed after a weight update; one more copy of the
      expert weights in memory);
    * ``routers``: fused top-k routers (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, GPT-OSS);
    * ``sparse_blocks``: the sparse Llama4 MoE block.

    Quantized models: FP8 experts (transformers' ``FP8Experts``) follow the same experts switch
    (``ALL_FP8_EXPERTS_FUNCTIONS["moe_ops"]``) and keep their fp8 weights; with ``experts``,
    ``FP8Linear`` layers get a CPU forward that needs no hub kernel (dequantized per call, one
    layer at a time). Packed MXFP4 GPT-OSS experts (:class:`PackedMxfp4Experts`, from
    :func:`from_pretrained_mxfp4` / :func:`use_mxfp4_experts` / :func:`quantize_experts_`) stay
    packed and always run on moe_ops. docs/transformers-quantized.md.

    Parameter names are untouched: ``save_pretrained``/``load_state_dict`` work as before.
    :func:`remove_moe_ops` undoes the router/block patches.
    """
    register_experts_implementation()
    has_experts = any(hasattr(m, "has_gate") and hasattr(m, "num_experts") for m in model.modules())
    if experts and has_experts:
        can = getattr(model, "_can_set_experts_implementation", None)
        if hasattr(model, "set_experts_implementation") and (can is None or can()):
            model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        else:  # a bare block or a wrapper class transformers will not switch: set the configs directly
            for m in model.modules():
                if hasattr(m, "has_gate") and hasattr(m, "config"):
                    m.config._experts_implementation = EXPERTS_IMPLEMENTATION
    for module in list(model.modules()):
        if hasattr(module, "has_gate") and hasattr(module, "num_experts"):
            module._moe_ops_pack_cpu = pack_cpu
            module._moe_ops_packed = None
        name = type(module).__name__
        if routers and name in ROUTER_FORWARDS:
            _patch_class(module, ROUTER_FORWARDS[name])
        if experts and name in QUANT_LAYER_FORWARDS:
            _patch_class(module, QUANT_LAYER_FORWARDS[name])
        if sparse_blocks and name in BLOCK_FORWARDS:
            for attr, fwd in BLOCK_FORWARDS[name].items():
                _patch_class(module if attr == "" else getattr(module, attr), fwd)
    return model


def remove_moe_ops(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_moe_ops`'s router and block patches (the experts implementation is a
    config setting: switch it back with ``set_experts_implementation``)."""
    for module in model.modules():
        _unpatch(module)
    return model


register_experts_implementation()
